"""The operator end to end: a real kube-apiserver, real kubectl, real `kubetasks run` processes.

Each test gets its own namespace and database, and a release of the chart in
that namespace (harness.py): the operators run with the environment the
chart renders and a token of the release's ServiceAccount, never the admin
certificate -- so every feature here works under the chart's own RBAC. Every
test that runs operators runs twice: a namespaced release and a cluster-wide
one, on the same cluster. Pods are created by hand, with a nodeSelector no
node matches (they stay Pending even while the local node runs), which is
all the pod watcher needs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.integration.helpers import audit

from e2e.conftest import Cluster
from e2e.harness import (
    Operators,
    Release,
    apply,
    cronjoblock,
    db_rows,
    install,
    phases,
    task_manifest,
    wait_leading,
    wait_ready,
    wait_until,
)
from kubetasks import devenv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["namespaced", "clusterwide"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def release(
    cluster: Cluster, namespace: str, db: str, mode: str, request: pytest.FixtureRequest
) -> Iterator[Release]:
    """The chart installed in the test's namespace (replicaCount=0: the test runs the pods).

    ``@pytest.mark.webhook(policy)`` turns the webhook on in url mode on a free port."""
    sets: list[str] = []
    marker = request.node.get_closest_marker("webhook")
    if marker is not None:
        sets += [
            "webhook.enabled=true",
            "webhook.mode=url",
            "webhook.host=127.0.0.1",
            f"webhook.port={devenv.free_port()}",
            f"webhook.failurePolicy={marker.args[0] if marker.args else 'Ignore'}",
            "replicaCount=1",
        ]
    rel = install(cluster, namespace, db, mode, sets=tuple(sets))
    yield rel
    rel.uninstall()


@pytest.fixture
def operators(release: Release, tmp_path: Path) -> Iterator[Operators]:
    ops = Operators(release, tmp_path)
    yield ops
    ops.stop_all()


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
    rows = await db_rows(operators.db, namespace)
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
    assert one["metadata"].get("finalizers") in (None, []), "no finalizer is held"
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


NO_ROTATE = (
    "no active worker serves handler 'images.rotate' in queue 'default'; "
    "served: side.fanout, side.sleep, side.work"
)


async def test_unknown_handler_waits_says_why_then_runs_and_oversized_payload_fails(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A Task for a handler no pod has stays Pending, not Runnable, saying why within one heartbeat
    interval, and runs once a pod of a release that has it starts; an oversized payload fails."""
    interval = 3.0
    operators.start("kt-a", extra={"KUBETASKS_HEARTBEAT_INTERVAL": str(interval)})
    await wait_ready(operators, ["kt-a"])
    # The operator watches Tasks and writes statuses once a first Task has gone through.
    apply(cluster, namespace, [task_manifest("warm-up")])
    await wait_until(lambda: phases(cluster, namespace).get("warm-up") == "Succeeded", 30, "warm-up")
    t0 = time.monotonic()
    res = apply(cluster, namespace, [task_manifest("nobody-home", handler="images.rotate")])
    assert res.returncode == 0, res.stderr

    def waiting() -> bool:
        st = cluster.json("get", "task", "nobody-home", "-n", namespace).get("status") or {}
        runnable = {c["type"]: c for c in st.get("conditions") or []}.get("Runnable") or {}
        return (
            st.get("phase") == "Pending"
            and st.get("message") == NO_ROTATE
            and (runnable.get("status"), runnable.get("reason"), runnable.get("message"))
            == ("False", "NoWorker", NO_ROTATE)
        )

    await wait_until(waiting, 30, "nobody-home Pending, not Runnable, saying why", interval=0.05)
    took = time.monotonic() - t0
    # `kubectl create` keeps no last-applied copy, so 200 KiB reaches the API server.
    big = task_manifest("big-payload", payload={"blob": "y" * (200 * 1024)})
    cluster.run("create", "-n", namespace, "-f", "-", input=json.dumps(big))
    await wait_until(
        lambda: phases(cluster, namespace).get("big-payload") == "Failed", 30, "big-payload Failed"
    )
    msg = cluster.run(
        "get", "task", "big-payload", "-n", namespace, "-o", "jsonpath={.status.message}"
    ).stdout
    assert msg.startswith("spec.payload: is 204811 bytes as JSON; the limit for a Task object is 131072")
    (rotate,) = [r for r in await db_rows(operators.db, namespace) if r["handler"] == "images.rotate"]
    assert (rotate["status"], rotate["attempt"]) == ("pending", 0)
    events = cluster.run("get", "events", "-n", namespace, "--field-selector", "reason=NoWorker").stdout
    assert "nobody-home" in events, events
    # The release that has images.rotate rolls out.
    operators.start("kt-b", app="tests.integration.apps.upgraded:app")
    await wait_until(lambda: phases(cluster, namespace).get("nobody-home") == "Succeeded", 30, "it ran")
    ends = [line.split() for line in operators.sidelog.read_text().splitlines() if line.startswith("end")]
    assert [e[4] for e in ends if e[1] == str(rotate["id"])] == ["kt-b"], ends
    print(
        f"\n[e2e] unknown handler reported on the Task {took:.2f}s after kubectl apply"
        f" (heartbeat {interval}s)"
    )
    assert took <= interval


async def test_delete_running_task_cancels_and_suspend_resume(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """Deleting a running Task cancels its handler and the object goes; suspend then resume ends Succeeded."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    apply(cluster, namespace, [task_manifest("long", handler="side.sleep", payload={"s": 60})])
    await wait_until(lambda: phases(cluster, namespace).get("long") == "Running", 30, "long Running")
    fin = cluster.run("get", "task", "long", "-n", namespace, "-o", "jsonpath={.metadata.finalizers}").stdout
    assert fin == "", "no finalizer: a namespace must never wait for an operator that is gone"
    cluster.run("delete", "task", "long", "-n", namespace, "--timeout=30s")
    t0 = time.monotonic()

    async def cancelled() -> bool:
        return [r["status"] for r in await db_rows(operators.db, namespace)] == ["cancelled"]

    took = await wait_until(cancelled, 10, "the row cancelled")
    print(f"\n[e2e] running Task deleted: its row cancelled {took:.2f}s after the delete returned")
    assert cluster.run("get", "task", "long", "-n", namespace, check=False).returncode != 0
    await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
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


def condition(cluster: Cluster, namespace: str, name: str, kind: str) -> dict[str, Any]:
    st = cluster.json("get", "task", name, "-n", namespace).get("status") or {}
    return next((c for c in st.get("conditions", []) if c["type"] == kind), {})


async def test_suspend_patched_on_a_running_task_says_which_happened(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """spec.suspend patched onto running Tasks: the status says the pause is asked, then which
    happened -- paused at a checkpoint of the handler (then suspend:false runs it again to
    Succeeded), paused after an attempt that would have retried, or moot (the attempt ended the
    task first) -- never nothing."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    apply(cluster, namespace, [
        task_manifest("looks", handler="side.sleep", payload={"s": 10, "checkpoints": True}),
        task_manifest("deaf", handler="side.sleep", payload={"s": 8, "stage": "nap"}),
        task_manifest("fails", handler="side.sleep", payload={"s": 8, "fail": True}, maxAttempts=3,
                      retryDelaySeconds=0),
    ])  # fmt: skip
    names = ("looks", "deaf", "fails")
    await wait_until(
        lambda: all(phases(cluster, namespace).get(n) == "Running" for n in names), 30, "all three Running"
    )
    t0 = time.monotonic()
    for n in names:
        cluster.run("patch", "task", n, "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    await wait_until(lambda: phases(cluster, namespace).get("looks") == "Paused", 20, "looks Paused")
    took = time.monotonic() - t0
    print(f"\n[e2e] suspend on a running Task: Paused at its checkpoint {took:.2f}s after the patch")
    looks = condition(cluster, namespace, "looks", "Paused")
    assert (looks["status"], looks["reason"]) == ("True", "PausedAtCheckpoint"), looks
    # The two that never look still run, and say a pause is asked.
    await wait_until(
        lambda: condition(cluster, namespace, "deaf", "Paused").get("reason") == "PauseRequested",
        20, "deaf to say a pause is asked",
    )  # fmt: skip
    assert phases(cluster, namespace)["deaf"] == "Running"
    # Its progress's stage and metadata reach the object (not pruned by the CRD's schema).
    deaf_st = cluster.json("get", "task", "deaf", "-n", namespace)["status"]
    assert (deaf_st["progressStage"], deaf_st["progressMetadata"]) == ("nap", {"s": 8.0}), deaf_st
    wide = cluster.run("get", "task", "deaf", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert "STAGE" in wide[0].split() and "nap" in wide[1].split(), wide
    asked = cluster.json("get", "task", "deaf", "-n", namespace)["status"]["message"]
    assert asked.startswith("pause requested at ") and "when the attempt ends" in asked
    await wait_until(lambda: phases(cluster, namespace).get("deaf") == "Succeeded", 30, "deaf Succeeded")
    await wait_until(
        lambda: condition(cluster, namespace, "deaf", "Paused").get("reason") == "PauseMoot", 20, "deaf moot"
    )
    deaf = cluster.json("get", "task", "deaf", "-n", namespace)["status"]
    assert deaf["message"].startswith("a pause was requested, but attempt 1 ended the task (succeeded) first")
    await wait_until(lambda: phases(cluster, namespace).get("fails") == "Paused", 30, "fails Paused")
    fails = cluster.json("get", "task", "fails", "-n", namespace)["status"]
    assert fails["attempts"] == 1, "paused instead of retried"
    assert condition(cluster, namespace, "fails", "Paused")["reason"] == "PausedAfterAttempt"
    assert fails["message"].startswith("paused after attempt 1 ended")
    events = cluster.run(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=deaf", "-o",
        "jsonpath={.items[*].reason}",
    ).stdout.split()  # fmt: skip
    assert "PauseRequested" in events, events
    # Resume works after a checkpoint pause: the handler runs again from the top, to its end.
    cluster.run(
        "patch", "task", "looks", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":false}}'
    )
    res = cluster.run("wait", "--for=condition=Succeeded", "task/looks", "-n", namespace, "--timeout=40s")
    print(f"[e2e] {res.stdout.strip()}")
    rows = {r["cr_name"]: r for r in await db_rows(operators.db, namespace)}
    assert rows["looks"]["attempt"] == 2 and rows["looks"]["uncharged"] == 1
    assert rows["fails"]["status"] == "paused" and rows["fails"]["attempt"] == 1


async def attempt_gaps(db: str, namespace: str, name: str) -> list[float]:
    """Seconds from each ended attempt of a Task's row to the start of the next one."""
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch(
            "SELECT a.attempt, a.started_at, a.finished_at FROM kubetasks.task_attempts_all a "
            "JOIN kubetasks.tasks t ON t.id = a.task_id WHERE t.cr_namespace = $1 AND t.cr_name = $2 "
            "ORDER BY a.attempt",
            namespace, name,
        )  # fmt: skip
    finally:
        await conn.close()
    return [(b["started_at"] - a["finished_at"]).total_seconds() for a, b in itertools.pairwise(rows)]


async def test_a_task_retries_with_the_backoff_and_cap_of_its_spec(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """retryDelaySeconds 1, retryBackoff 2.5, maxRetryDelaySeconds 4 on a Task that always fails:
    the waits between its four attempts are 1 s, 2.5 s and 4 s (x2.5 each time, capped) -- not the
    app's backoff (x2: 2 s) nor an uncapped 6.25 s -- each within its +-10 % jitter."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    spec = {"retryDelaySeconds": 1, "retryBackoff": 2.5, "maxRetryDelaySeconds": 4, "maxAttempts": 4}
    flaky = task_manifest("flaky", handler="side.sleep", payload={"s": 0, "fail": True}, **spec)
    res = apply(cluster, namespace, [flaky])
    assert res.returncode == 0, res.stderr
    await wait_until(lambda: phases(cluster, namespace).get("flaky") == "Failed", 60, "flaky Failed")
    row = (await db_rows(operators.db, namespace))[0]
    assert (row["retry_delay_s"], row["retry_backoff"], row["max_retry_delay_s"]) == (1.0, 2.5, 4.0)
    assert row["attempt"] == 4
    gaps = await attempt_gaps(operators.db, namespace, "flaky")
    print(f"\n[e2e] waits between attempts: {', '.join(f'{g:.2f}s' for g in gaps)} (policy 1, 2.5, 4)")
    slack = 1.0  # claim latency on a loaded machine; the lower bounds are the policy's own
    for got, want in zip(gaps, (1.0, 2.5, 4.0), strict=True):
        assert want * 0.9 - 0.05 <= got <= want * 1.1 + slack, (gaps, want)
    st = cluster.json("get", "task", "flaky", "-n", namespace)["status"]
    assert st["attempts"] == 4 and "fails after sleeping" in st["message"]


async def test_the_charts_default_queues_serve_each_handlers_own_queue(
    cluster: Cluster, namespace: str, release: Release, operators: Operators
) -> None:
    """The chart's default (queues: [], no KUBETASKS_QUEUES) runs an app whose handlers live in
    queues other than default: a Task of each queue succeeds, none waits unserved."""
    assert "KUBETASKS_QUEUES" not in release.env, release.env
    operators.start("kt-a", app="tests.integration.apps.metricsapp:app")
    await wait_ready(operators, ["kt-a"])
    conn = await asyncpg.connect(operators.db)
    try:
        queues = await conn.fetchval("SELECT queues FROM kubetasks.workers WHERE status = 'active'")
    finally:
        await conn.close()
    assert sorted(queues) == ["mq", "other"], queues
    apply(cluster, namespace, [
        task_manifest("in-mq", handler="m.ok", payload={"n": 1}),
        task_manifest("in-other", handler="m.flaky", queue="other"),
    ])  # fmt: skip
    await wait_until(
        lambda: phases(cluster, namespace) == {"in-mq": "Succeeded", "in-other": "Succeeded"},
        30,
        "both Succeeded",
    )
    rows = {r["cr_name"]: r for r in await db_rows(operators.db, namespace)}
    assert (rows["in-mq"]["queue"], rows["in-other"]["queue"]) == ("mq", "other")
    assert rows["in-other"]["attempt"] == 2


async def test_leader_killed_other_takes_over(cluster: Cluster, namespace: str, operators: Operators) -> None:
    """Two operators: one leads, both run tasks; SIGKILL the leader and 50 new Tasks still succeed."""
    operators.start("kt-a")
    operators.start("kt-b")
    await wait_ready(operators, ["kt-a", "kt-b"])
    await wait_leading(operators)
    apply(cluster, namespace, [task_manifest(f"w-{i}", payload={"n": i, "ms": [50, 100]}) for i in range(60)])
    await wait_until(
        lambda: list(phases(cluster, namespace).values()).count("Succeeded") == 60, 60, "60 Succeeded"
    )
    pods = {r["pod_id"] for r in await db_rows(operators.db, namespace)}
    assert pods == {"kt-a", "kt-b"}, f"both replicas should run tasks, got {pods}"
    leader = await operators.leader()
    assert leader is not None
    operators.kill(leader)
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
    new = await operators.leader()
    took = time.monotonic() - t0
    print(f"\n[e2e] leader {leader} killed: {new} leads; 50 new Tasks Succeeded {took:.1f}s later")
    assert new is not None and new != leader


async def test_pod_deleted_task_runs_again_within_seconds(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """A worker killed and its Pod deleted: its task runs again elsewhere within 2 s of the deletion."""
    victim, other = "kt-victim", "kt-other"
    operators.start(victim)
    await wait_ready(operators, [victim])
    apply(
        cluster,
        namespace,
        [task_manifest(f"slow-{i}", handler="side.sleep", payload={"s": 60}) for i in range(5)],
    )

    async def victim_runs_all() -> bool:
        rows = await db_rows(operators.db, namespace)
        return len(rows) == 5 and all(r["status"] == "running" and r["pod_id"] == victim for r in rows)

    await wait_until(victim_runs_all, 30, "the victim to run the tasks", interval=0.2)
    task_id = int((await db_rows(operators.db, namespace))[0]["id"])
    operators.start(other)
    await wait_ready(operators, [victim, other])
    await asyncio.sleep(1.0)  # its pod watch is open (every replica watches its release's pods)
    operators.kill(victim)
    t0 = time.monotonic()
    cluster.run("delete", "pod", victim, "-n", namespace, "--grace-period=0", "--force", "--wait=false")

    async def rerun() -> bool:
        rows = {r["id"]: r for r in await db_rows(operators.db, namespace)}
        return rows[task_id]["status"] == "running" and rows[task_id]["pod_id"] == other

    await wait_until(rerun, 10, "the task to run again", interval=0.05)
    took = time.monotonic() - t0
    print(f"\n[e2e] pod {victim} deleted: its task ran again on {other} {took:.2f}s later")
    assert took <= 2.0


@pytest.mark.webhook("Ignore")
async def test_webhook_refuses_oversized_payload_naming_the_field(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """With the webhook on, even a server-side apply (no annotation copy) of a 300 KiB payload is refused."""
    operators.start("kt-hook")
    await wait_ready(operators, ["kt-hook"])
    name = operators.release.webhook_configuration

    def ca_injected() -> bool:
        cfg = cluster.json("get", "validatingwebhookconfiguration", name)
        return all(w["clientConfig"].get("caBundle") for w in cfg["webhooks"])

    await wait_until(ca_injected, 30, "the operator to set the caBundle")
    big = task_manifest("too-big", payload={"blob": "x" * (300 * 1024)})
    res = cluster.run(
        "apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(big), check=False
    )
    assert res.returncode != 0, res.stdout
    assert "spec.payload: is 307211 bytes as JSON; the limit for a Task object is 131072 bytes" in res.stderr
    print(f"\n[e2e] webhook: {res.stderr.strip()[:300]}")
    small = task_manifest("fits", payload={"blob": "x" * 1024})
    ok = cluster.run("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(small))
    assert ok.returncode == 0 and "Warning" not in ok.stderr, ok.stderr
    # Admitted, with the reason it will wait: no pod serves the handler.
    unserved = task_manifest("rotate-me", handler="images.rotate")
    res = cluster.run("apply", "-n", namespace, "-f", "-", input=json.dumps(unserved))
    assert res.returncode == 0 and f"Warning: {NO_ROTATE}" in res.stderr, res.stderr
    operators.stop_all()
    # failurePolicy Ignore: a webhook that is down blocks nothing.
    late = task_manifest("while-down", payload={"n": 1})
    assert cluster.run("apply", "-n", namespace, "-f", "-", input=json.dumps(late)).returncode == 0


@pytest.mark.webhook("Fail")
async def test_webhook_validates_on_create_and_update_and_never_blocks_metadata(
    cluster: Cluster, namespace: str, operators: Operators
) -> None:
    """The webhook refuses a CronJobLock that never fires or names an unknown time zone, on
    create and on update, naming the field. With failurePolicy Fail and the webhook down,
    creations and spec changes wait for it, but metadata-only updates go through."""
    operators.start("kt-hook")
    await wait_ready(operators, ["kt-hook"])
    name = operators.release.webhook_configuration

    def ca_injected() -> bool:
        return all(
            w["clientConfig"].get("caBundle")
            for w in cluster.json("get", "validatingwebhookconfiguration", name)["webhooks"]
        )

    await wait_until(ca_injected, 30, "the operator to set the caBundle")
    refused = {
        "create, never fires": apply(cluster, namespace, [cronjoblock("feb-31", "0 0 31 2 *")]),
        "create, unknown zone": apply(
            cluster, namespace, [cronjoblock("mars", "0 3 * * *", timeZone="Mars/Base")]
        ),
    }
    assert (
        apply(
            cluster, namespace, [cronjoblock("fine", "0 3 * * *"), task_manifest("t", delaySeconds=3600)]
        ).returncode
        == 0
    )
    for what, spec in (
        ("update, never fires", {"schedule": "0 0 30 2 *"}),
        ("update, unknown zone", {"timeZone": "Moon/Crater"}),
    ):
        refused[what] = cluster.run(
            "patch",
            "cronjoblock",
            "fine",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": spec}),
            check=False,
        )
    for what, res in refused.items():
        print(f"  {what:<22} rc={res.returncode} {res.stderr.strip()[-160:]}")
        assert res.returncode != 0, what
    assert "spec.schedule: '0 0 31 2 *' never fires" in refused["create, never fires"].stderr
    assert "spec.timeZone: unknown time zone 'Mars/Base'" in refused["create, unknown zone"].stderr
    assert "spec.schedule: '0 0 30 2 *' never fires" in refused["update, never fires"].stderr
    assert "spec.timeZone: unknown time zone 'Moon/Crater'" in refused["update, unknown zone"].stderr
    spec = cluster.json("get", "cronjoblock", "fine", "-n", namespace)["spec"]
    assert (spec["schedule"], spec.get("timeZone")) == ("0 3 * * *", None), "a refused update changed nothing"
    assert [o["metadata"]["name"] for o in cluster.json("get", "cronjoblocks", "-n", namespace)["items"]] == [
        "fine"
    ]

    operators.stop_all()  # the webhook is down; failurePolicy Fail
    down = apply(cluster, namespace, [task_manifest("while-down")])
    assert down.returncode != 0 and "failed calling webhook" in down.stderr, down.stderr
    spec_change = cluster.run(
        "patch",
        "cronjoblock",
        "fine",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"suspend":true}}',
        check=False,
    )
    assert spec_change.returncode != 0 and "failed calling webhook" in spec_change.stderr, spec_change.stderr
    for args in (
        ("label", "task", "t", "team=a"),
        ("annotate", "cronjoblock", "fine", "note=b"),
        ("patch", "task", "t", "--type=merge", "-p", '{"metadata":{"finalizers":["example.com/hold"]}}'),
        ("patch", "task", "t", "--type=merge", "-p", '{"metadata":{"finalizers":null}}'),
    ):
        res = cluster.run(*args, "-n", namespace, check=False)
        assert res.returncode == 0, (args, res.stderr)


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
