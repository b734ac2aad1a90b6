"""The operator end to end: a real kube-apiserver, real kubectl, real `kubetasks run` processes.

Each test gets its own namespace and database. Operators run as separate
processes with KUBECONFIG pointing at the local control plane; Pods are
created by hand, with a nodeSelector no node matches (they stay Pending even
while the local node runs), which is all a Pod watcher needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.conftest import create_db, dev_state, drop_db, template_db  # noqa: F401 - fixtures
from tests.integration.helpers import audit

from e2e.conftest import NO_NODE, Cluster, wait_default_service_account
from kubetasks import devenv

ROOT = Path(__file__).resolve().parent.parent
SELECTOR = "app.kubernetes.io/name=kubetasks-e2e"


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    cluster.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.run("wait", "--for=condition=Established", "crd/tasks.kubetasks.dev", "crd/kopfpeerings.kopf.dev")
    return cluster


@pytest.fixture
def namespace(crds: Cluster) -> Iterator[str]:
    """A fresh namespace with kopf's peering object; its Tasks and itself deleted afterwards."""
    cluster = crds
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.run("create", "namespace", ns)
    wait_default_service_account(cluster, ns)
    cluster.run(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(
            {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "default"}}
        ),
    )
    yield ns
    # Finalizers are ours and held only while unfinished: nothing can hang here.
    cluster.run("delete", "tasks", "--all", "-n", ns, "--wait=false", check=False)
    cluster.run("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
async def db(dev_state: devenv.DevState, template_db: str) -> AsyncIterator[str]:  # noqa: F811
    name = await create_db(dev_state, template_db)
    yield dev_state.admin_url(name)
    await drop_db(dev_state, name)


class Operators:
    """`kubetasks run` processes, each posing as a pod of one Deployment."""

    def __init__(self, cluster: Cluster, namespace: str, db: str, tmp: Path) -> None:
        self.cluster, self.namespace, self.db, self.tmp = cluster, namespace, db, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sidelog = tmp / "side.log"

    def pod(self, name: str) -> None:
        self.cluster.run(
            "apply",
            "-n",
            self.namespace,
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kubetasks-e2e"}},
                    "spec": {
                        "containers": [{"name": "kubetasks", "image": "kubetasks:e2e"}],
                        "nodeSelector": NO_NODE,  # a stand-in: the local node must never run it
                    },
                }
            ),
        )

    def start(
        self,
        name: str,
        concurrency: int = 20,
        priority: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        self.pod(name)
        env = dict(os.environ)
        env.update(
            KUBECONFIG=self.cluster.kubeconfig,
            KUBETASKS_DATABASE_URL=self.db,
            POD_NAME=name,
            POD_ID=name,  # kopf's peering identity
            POD_NAMESPACE=self.namespace,
            KUBETASKS_WATCH_NAMESPACES=self.namespace,
            KUBETASKS_POD_SELECTOR=SELECTOR,
            KUBETASKS_PEERING_LIFETIME="6",
            KUBETASKS_HEARTBEAT_INTERVAL="1",
            KUBETASKS_LEASE_TTL="10",
            KUBETASKS_CONCURRENCY=str(concurrency),
            SIDELOG=str(self.sidelog),
            PYTHONPATH=str(ROOT),
        )
        if priority is not None:
            env["KUBETASKS_PEERING_PRIORITY"] = str(priority)
        env.update(extra or {})
        with open(self.tmp / f"{name}.log", "ab") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "kubetasks", "run", "--app", "tests.integration.apps.sidelog:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = p
        return p

    def leader(self) -> str | None:
        peering = self.cluster.json("get", "kopfpeering", "default", "-n", self.namespace)
        peers = {k: v for k, v in (peering.get("status") or {}).items() if isinstance(v, dict)}
        live = {k: v for k, v in peers.items() if k in self.procs and self.procs[k].poll() is None}
        if not live:
            return None
        return max(live, key=lambda k: live[k].get("priority", 0))

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def operators(cluster: Cluster, namespace: str, db: str, tmp_path: Path) -> Iterator[Operators]:
    ops = Operators(cluster, namespace, db, tmp_path)
    yield ops
    ops.stop_all()


def task_manifest(name: str, handler: str = "side.work", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetasks.dev/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {"handler": handler, **spec},
    }


def apply(
    cluster: Cluster, ns: str, manifests: list[dict[str, Any]], *extra: str
) -> subprocess.CompletedProcess[str]:
    doc = {"apiVersion": "v1", "kind": "List", "items": manifests}
    return cluster.run("apply", "-n", ns, *extra, "-f", "-", input=json.dumps(doc), check=False)


def phases(cluster: Cluster, ns: str) -> dict[str, str]:
    items = cluster.json("get", "tasks", "-n", ns)["items"]
    return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items}


async def wait_until(cond: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_ready(ops: Operators, names: list[str]) -> None:
    async def up() -> bool:
        conn = await asyncpg.connect(ops.db)
        try:
            n = await conn.fetchval(
                "SELECT count(*) FROM kubetasks.workers WHERE status='active' AND pod_id = ANY($1)", names
            )
        finally:
            await conn.close()
        return int(n) == len(names)

    end = time.monotonic() + 60
    while not await up():
        for n in names:
            assert ops.procs[n].poll() is None, (ops.tmp / f"{n}.log").read_text()[-3000:]
        assert time.monotonic() < end, "operators did not register"
        await asyncio.sleep(0.2)


async def db_rows(db: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db)
    try:
        return await conn.fetch("SELECT * FROM kubetasks.tasks ORDER BY id")
    finally:
        await conn.close()


async def test_two_hundred_tasks_in_one_apply(cluster: Cluster, namespace: str, operators: Operators) -> None:
    """200 Tasks in one `kubectl apply` all succeed, each run once; time to the last Succeeded printed."""
    operators.start("kt-a", concurrency=50)
    await wait_ready(operators, ["kt-a"])
    await asyncio.sleep(1.0)  # the operator's watch is open
    manifests = [task_manifest(f"t-{i:03d}", payload={"n": i, "ms": [5, 20]}) for i in range(200)]
    t_apply = time.monotonic()
    res = apply(cluster, namespace, manifests)
    assert res.returncode == 0, res.stderr
    t0 = time.monotonic()
    await wait_until(
        lambda: list(phases(cluster, namespace).values()).count("Succeeded") == 200,
        60,
        "200 Succeeded",
        interval=0.25,
    )
    took = time.monotonic() - t0
    rows = await db_rows(operators.db)
    ids = [r["id"] for r in rows]
    result = await audit(operators.db, ids, operators.sidelog)
    print(
        f"\n[e2e] 200 Tasks: `kubectl apply` took {t0 - t_apply:.2f}s; "
        f"from its return to the last Succeeded {took:.2f}s"
    )
    assert len(rows) == 200 and {r["status"] for r in rows} == {"succeeded"}
    assert result.lost == set() and result.duplicated == set() and result.unexpected == set()
    assert set(result.runs.values()) == {1} and len(result.runs) == 200
    one = cluster.json("get", "task", "t-000", "-n", namespace)
    kopf_marks = [k for k in (one["metadata"].get("annotations") or {}) if "kopf" in k]
    assert kopf_marks == [], "kopf writes nothing onto Task objects (a payload copy would land there)"
    assert one["metadata"].get("finalizers") in (None, []), "a finished Task keeps no finalizer"
    wide = cluster.run("get", "tasks", "-n", namespace, "-o", "wide").stdout.splitlines()
    print("\n".join(wide[:4]))
    assert wide[0].split()[:7] == ["NAME", "HANDLER", "QUEUE", "PHASE", "ATTEMPTS", "POD", "AGE"]


async def test_bad_manifests_refused_by_the_api_server(cluster: Cluster, namespace: str) -> None:
    """The API server refuses bad Tasks with a message naming the field."""
    cases = [
        (
            {
                "apiVersion": "kubetasks.dev/v1alpha1",
                "kind": "Task",
                "metadata": {"name": "no-handler"},
                "spec": {"payload": {}},
            },
            "spec.handler: Required value",
        ),
        (task_manifest("prio", priority=5000), "spec.priority"),
        (task_manifest("neg-timeout", timeoutSeconds=-1), "spec.timeoutSeconds"),
        (task_manifest("both", runAt="2030-01-01T00:00:00Z", delaySeconds=5), "mutually exclusive"),
        (task_manifest("bad-name", handler="has space"), "spec.handler"),
    ]
    for manifest, expected in cases:
        res = cluster.run("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)
        assert res.returncode != 0 and expected in res.stderr, (manifest["metadata"]["name"], res.stderr)
    cluster.run(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(task_manifest("fixed", delaySeconds=3600))
    )
    res = cluster.run(
        "patch",
        "task",
        "fixed",
        "-n",
        namespace,
        "--type",
        "merge",
        "-p",
        '{"spec":{"queue":"other"}}',
        check=False,
    )
    assert res.returncode != 0 and "spec.queue: Forbidden: spec.queue is immutable" in res.stderr, res.stderr
    ok = cluster.run(
        "patch", "task", "fixed", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":true}}'
    )
    assert "patched" in ok.stdout
    big = task_manifest("too-big", payload={"blob": "x" * (300 * 1024)})
    res = cluster.run("apply", "-n", namespace, "-f", "-", input=json.dumps(big), check=False)
    assert res.returncode != 0 and "Too long" in res.stderr, res.stderr[-500:]
    print(f"\n[e2e] payload of 300 KiB refused: {res.stderr.strip()[-200:]}")


async def test_unknown_handler_and_oversized_payload_end_failed(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """Accepted by the API server but not runnable: the status says why (known handlers listed)."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    apply(cluster, namespace, [task_manifest("nobody-home", handler="images.rotate")])
    # `kubectl create` keeps no last-applied copy, so 200 KiB reaches the API server.
    big = task_manifest("big-payload", payload={"blob": "y" * (200 * 1024)})
    cluster.run("create", "-n", namespace, "-f", "-", input=json.dumps(big))
    await wait_until(
        lambda: phases(cluster, namespace) == {"nobody-home": "Failed", "big-payload": "Failed"},
        30,
        "both Failed",
    )
    msg = {
        n: cluster.run("get", "task", n, "-n", namespace, "-o", "jsonpath={.status.message}").stdout
        for n in ("nobody-home", "big-payload")
    }
    assert msg["nobody-home"] == (
        "handler: unknown handler 'images.rotate'; known handlers: side.fanout, side.sleep, side.work"
    ), msg
    assert msg["big-payload"].startswith(
        "spec.payload: is 204811 bytes as JSON; the limit for a Task object is 131072"
    )


async def test_delete_running_task_cancels_and_suspend_resume(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """Deleting a running Task cancels its handler and the object goes; suspend then resume ends Succeeded."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    apply(cluster, namespace, [task_manifest("long", handler="side.sleep", payload={"s": 60})])
    await wait_until(lambda: phases(cluster, namespace).get("long") == "Running", 30, "long Running")
    fin = cluster.run("get", "task", "long", "-n", namespace, "-o", "jsonpath={.metadata.finalizers}").stdout
    assert "kubetasks.dev/cancel-on-delete" in fin
    cluster.run("delete", "task", "long", "-n", namespace, "--timeout=30s")
    rows = await db_rows(operators.db)
    assert [r["status"] for r in rows] == ["cancelled"]
    assert cluster.run("get", "task", "long", "-n", namespace, check=False).returncode != 0
    await asyncio.sleep(0.5)
    ends = [line for line in operators.sidelog.read_text().splitlines() if line.startswith("end")]
    assert ends == [], "the cancelled handler ran to its end"

    apply(cluster, namespace, [task_manifest("held", handler="side.sleep", payload={"s": 0.1}, suspend=True)])
    await wait_until(lambda: phases(cluster, namespace).get("held") == "Paused", 30, "held Paused")
    await asyncio.sleep(1.0)
    assert phases(cluster, namespace)["held"] == "Paused"
    cluster.run(
        "patch", "task", "held", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":false}}'
    )
    res = cluster.run("wait", "--for=condition=Succeeded", "task/held", "-n", namespace, "--timeout=30s")
    print(f"\n[e2e] {res.stdout.strip()}")
    describe = cluster.run("describe", "task", "held", "-n", namespace).stdout
    print(describe[-900:])
    assert "Succeeded" in describe and "kubetasks" in describe


async def test_leader_killed_other_takes_over(cluster: Cluster, namespace: str, operators: Operators) -> None:
    """Two operators: one handles events, both run tasks; kill the leader and 50 new Tasks still succeed."""
    operators.start("kt-a")
    operators.start("kt-b")
    await wait_ready(operators, ["kt-a", "kt-b"])
    await wait_until(lambda: operators.leader() is not None, 30, "a peering leader")
    apply(cluster, namespace, [task_manifest(f"w-{i}", payload={"n": i, "ms": [50, 100]}) for i in range(60)])
    await wait_until(
        lambda: list(phases(cluster, namespace).values()).count("Succeeded") == 60, 60, "60 Succeeded"
    )
    pods = {r["pod_id"] for r in await db_rows(operators.db)}
    assert pods == {"kt-a", "kt-b"}, f"both replicas should run tasks, got {pods}"
    leader = operators.leader()
    assert leader is not None
    operators.procs[leader].kill()
    operators.procs[leader].wait()
    t0 = time.monotonic()
    apply(cluster, namespace, [task_manifest(f"after-{i}", payload={"n": i}) for i in range(50)])
    await wait_until(
        lambda: (
            sum(
                1
                for n, p in phases(cluster, namespace).items()
                if n.startswith("after-") and p == "Succeeded"
            )
            == 50
        ),
        90,
        "50 Succeeded after the leader died",
    )
    print(f"\n[e2e] leader {leader} killed: 50 new Tasks Succeeded {time.monotonic() - t0:.1f}s later")


async def test_pod_deleted_task_runs_again_within_seconds(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A worker killed and its Pod deleted: its task runs again elsewhere within 2 s of the deletion."""
    victim, leader = "kt-victim", "kt-leader"
    operators.start(victim, priority=1)
    await wait_ready(operators, [victim])
    apply(
        cluster,
        namespace,
        [task_manifest(f"slow-{i}", handler="side.sleep", payload={"s": 60}) for i in range(5)],
    )

    async def victim_runs_all() -> bool:
        rows = await db_rows(operators.db)
        return len(rows) == 5 and all(r["status"] == "running" and r["pod_id"] == victim for r in rows)

    end = time.monotonic() + 30
    while not await victim_runs_all():
        assert time.monotonic() < end, "the victim never ran the tasks"
        await asyncio.sleep(0.2)
    task_id = int((await db_rows(operators.db))[0]["id"])
    operators.start(leader, priority=100)  # the higher priority handles events from now on
    await wait_ready(operators, [victim, leader])
    await wait_until(lambda: operators.leader() == leader, 30, "the new replica to lead")
    await asyncio.sleep(1.0)  # its Pod watch is open
    operators.procs[victim].kill()
    operators.procs[victim].wait()
    t0 = time.monotonic()
    cluster.run("delete", "pod", victim, "-n", namespace, "--grace-period=0", "--force", "--wait=false")

    async def rerun() -> bool:
        rows = {r["id"]: r for r in await db_rows(operators.db)}
        return rows[task_id]["status"] == "running" and rows[task_id]["pod_id"] == leader

    while not await rerun():
        assert time.monotonic() - t0 < 10, "task not recovered within 10 s"
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    print(f"\n[e2e] pod {victim} deleted: its task ran again on {leader} {took:.2f}s later")
    assert took <= 2.0


async def test_webhook_refuses_oversized_payload_naming_the_field(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """With the webhook on, even a server-side apply (no annotation copy) of a 300 KiB payload is refused."""
    port = devenv.free_port()
    operators.start("kt-hook", extra={"KUBETASKS_WEBHOOK_PORT": str(port)})
    await wait_ready(operators, ["kt-hook"])

    def configured() -> bool:
        res = cluster.run("get", "validatingwebhookconfiguration", "kubetasks.dev", "-o", "json", check=False)
        return res.returncode == 0 and bool(json.loads(res.stdout).get("webhooks"))

    await wait_until(configured, 30, "the webhook configuration")
    big = task_manifest("too-big", payload={"blob": "x" * (300 * 1024)})
    res = cluster.run(
        "apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(big), check=False
    )
    assert res.returncode != 0, res.stdout
    assert "spec.payload: is 307211 bytes as JSON; the limit for a Task object is 131072 bytes" in res.stderr
    print(f"\n[e2e] webhook: {res.stderr.strip()[:300]}")
    small = task_manifest("fits", payload={"blob": "x" * 1024})
    assert (
        cluster.run("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(small)).returncode
        == 0
    )
    operators.stop_all()
    # A graceful exit removes the non-persistent entry: Tasks are never blocked by a dead URL.
    await wait_until(lambda: not configured(), 30, "the webhook entry to go")


def cronjoblock(name: str, schedule: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetasks.dev/v1alpha1",
        "kind": "CronJobLock",
        "metadata": {"name": name},
        "spec": {"schedule": schedule, "handler": "side.work", "payload": {"ms": [1, 5]}, **spec},
    }


async def count_runs(db: str, tag_prefix: str = "cron:") -> int:
    conn = await asyncpg.connect(db)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM kubetasks.cron_ticks WHERE outcome = 'enqueued'")
        )
    finally:
        await conn.close()


async def test_cronjoblock_status_patch_suspend_delete(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A CronJobLock's status fills in; a schedule change and suspend take effect; deleting it stops runs."""
    operators.start("kt-cron")
    await wait_ready(operators, ["kt-cron"])
    apply(cluster, namespace, [cronjoblock("every-2s", "* * * * * */2", lockTTLSeconds=30)])

    def status() -> dict[str, Any]:
        return cluster.json("get", "cronjoblock", "every-2s", "-n", namespace).get("status") or {}

    await wait_until(lambda: status().get("lastResult") == "Succeeded", 30, "a first successful run")
    st = status()
    assert st["nextScheduleTime"] and st["lastScheduleTime"] and st["lastSuccessfulTime"]
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"Ready": "True"}
    table = cluster.run("get", "cronjoblocks", "-n", namespace).stdout
    print(f"\n[e2e] $ kubectl get cronjoblocks\n{table.rstrip()}")
    assert table.split("\n")[0].split()[:4] == ["NAME", "SCHEDULE", "SUSPEND", "HOLDER"]

    cluster.run("patch", "cronjoblock", "every-2s", "-n", namespace, "--type", "merge",
                "-p", '{"spec":{"schedule":"* * * * * */3"}}')  # fmt: skip
    await wait_until(
        lambda: "*/3" in cluster.run("get", "cronjoblock", "every-2s", "-n", namespace).stdout,
        10,
        "the new schedule",
    )

    def seconds_of_new_ticks() -> set[int]:
        return {int(h["scheduledTime"][17:19]) for h in status().get("history", []) if h.get("scheduledTime")}

    await wait_until(lambda: any(s % 3 == 0 and s % 2 == 1 for s in seconds_of_new_ticks()), 20,
                     "a tick only the new schedule has")  # fmt: skip

    cluster.run("patch", "cronjoblock", "every-2s", "-n", namespace, "--type", "merge",
                "-p", '{"spec":{"suspend":true}}')  # fmt: skip
    await asyncio.sleep(4)  # one tick of slack for the change to reach the scheduler
    before = await count_runs(operators.db)
    await asyncio.sleep(6)
    assert await count_runs(operators.db) == before, "a suspended CronJobLock still ran"

    cluster.run("patch", "cronjoblock", "every-2s", "-n", namespace, "--type", "merge",
                "-p", '{"spec":{"suspend":false}}')  # fmt: skip
    await wait_until(lambda: status().get("nextScheduleTime") is not None, 10, "resumed")
    await asyncio.sleep(4)
    assert await count_runs(operators.db) > before, "resuming did not bring runs back"

    cluster.run("delete", "cronjoblock", "every-2s", "-n", namespace)
    await asyncio.sleep(2)
    after_delete = await count_runs(operators.db)
    await asyncio.sleep(6)
    assert await count_runs(operators.db) == after_delete, "runs followed the deletion"


async def test_cronjoblock_that_never_fires_is_not_ready(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A schedule that never fires is accepted by the schema but shown Ready=False with the reason."""
    operators.start("kt-cron")
    await wait_ready(operators, ["kt-cron"])
    apply(
        cluster,
        namespace,
        [cronjoblock("feb-31", "0 0 31 2 *"), cronjoblock("mars", "0 3 * * *", timeZone="Mars/Base")],
    )

    def ready(name: str) -> dict[str, Any] | None:
        st = cluster.json("get", "cronjoblock", name, "-n", namespace).get("status") or {}
        return next((c for c in st.get("conditions", []) if c["type"] == "Ready"), None)

    await wait_until(
        lambda: ready("feb-31") is not None and ready("mars") is not None, 30, "Ready conditions"
    )
    feb, mars = ready("feb-31"), ready("mars")
    assert feb is not None and feb["status"] == "False" and feb["reason"] == "InvalidSchedule"
    assert feb["message"] == "spec.schedule: '0 0 31 2 *' never fires", feb
    assert mars is not None and mars["status"] == "False"
    assert mars["message"].startswith("spec.timeZone: unknown time zone 'Mars/Base'"), mars


async def test_task_object_as_workflow_root_shows_children(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A Task whose handler fans out shows Waiting with its children's counts, then Succeeded with the sum."""
    operators.start("kt-flow")
    await wait_ready(operators, ["kt-flow"])
    apply(cluster, namespace, [task_manifest("fan", handler="side.fanout", payload={"n": 8})])

    def status() -> dict[str, Any]:
        return cluster.json("get", "task", "fan", "-n", namespace).get("status") or {}

    def waiting_on(n: int) -> bool:
        st = status()
        return st.get("phase") == "Waiting" and sum((st.get("children") or {}).values()) == n

    await wait_until(lambda: waiting_on(8), 30, "the root Waiting on 8 children")
    print(f"\n[e2e] workflow root while waiting: children={status()['children']}")
    await wait_until(lambda: status().get("phase") == "Succeeded", 60, "the root Succeeded")
    st = status()
    assert st["result"] == {"sum": 28, "children": 8}
    assert st.get("children") == {"succeeded": 8}


async def test_ttl_seconds_after_finished_deletes_the_object(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A finished Task with ttlSecondsAfterFinished goes away by itself; its row stays for the record."""
    operators.start("kt-ttl")
    await wait_ready(operators, ["kt-ttl"])
    apply(cluster, namespace, [task_manifest("short-lived", payload={"n": 1}, ttlSecondsAfterFinished=2)])
    await wait_until(lambda: phases(cluster, namespace).get("short-lived") == "Succeeded", 30, "Succeeded")
    t0 = time.monotonic()
    await wait_until(lambda: "short-lived" not in phases(cluster, namespace), 30, "the object to be deleted")
    print(f"\n[e2e] ttlSecondsAfterFinished=2: deleted {time.monotonic() - t0:.1f}s after Succeeded was seen")
    rows = await db_rows(operators.db)
    assert [r["status"] for r in rows] == ["succeeded"]
