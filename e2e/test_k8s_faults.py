"""The Kubernetes side under faults, against the real API server, under the chart's RBAC.

Each test installs the chart in its namespace and runs `kubetasks run`
processes as its pods (harness.py), then breaks something real: the API
server or PostgreSQL behind a toxiproxy that only the operators go through
(tests/faults/toxiproxy.py; the test keeps talking to the real servers, so
it sees the truth), a
SIGKILL, an object re-created under the same name, a `helm uninstall`, a
second release in the same namespace and database. Windows are short
(status resync 2 s, peering lifetime 6 s, leader timeout 10 s) so the whole
file takes a few minutes. What each scenario measured is added to the table
printed at the end of the session (e2e/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.faults.toxiproxy import Proxy, Toxiproxy

from e2e.conftest import Cluster
from e2e.harness import (
    FAST,
    Operators,
    Release,
    apiserver_port,
    apply,
    cronjoblock,
    db_rows,
    install,
    objects,
    phases,
    task_manifest,
    wait_leading,
    wait_ready,
    wait_until,
)
from kubetasks.k8s.status import PHASES

pytestmark = pytest.mark.timeout(600)
LEADER_TIMEOUT = 10.0  # the default: "a leader that cannot reach PostgreSQL for more than 10 s"


@pytest.fixture
def release(cluster: Cluster, namespace: str, db: str) -> Iterator[Release]:
    rel = install(cluster, namespace, db, "namespaced")
    yield rel
    rel.uninstall()


@pytest.fixture
def operators(release: Release, tmp_path: Path) -> Iterator[Operators]:
    ops = Operators(release, tmp_path)
    yield ops
    ops.stop_all()


@pytest.fixture
def toxiproxy(tmp_path: Path) -> Iterator[Toxiproxy]:
    """Toxiproxy (tests/faults/toxiproxy.py, built from its Go module on first use)."""
    tp = Toxiproxy.start(tmp_path / "toxiproxy.log")
    yield tp
    tp.stop()


def cut(link: Proxy) -> None:
    """The link is down: open connections closed, new ones refused (a server gone away)."""
    link.set_enabled(False)


def restore(link: Proxy) -> None:
    link.heal()
    link.set_enabled(True)


def with_port(url: str, port: int) -> str:
    """``url`` with its port replaced (postgresql://user@127.0.0.1:5432/db)."""
    head, tail = url.rsplit("@", 1)
    host_port, rest = tail.split("/", 1)
    return f"{head}@{host_port.rsplit(':', 1)[0]}:{port}/{rest}"


def pg_port(url: str) -> int:
    return int(url.rsplit("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


async def rows_by_name(db: str, ns: str) -> dict[str, list[asyncpg.Record]]:
    out: dict[str, list[asyncpg.Record]] = {}
    for r in await db_rows(db, ns):
        out.setdefault(r["cr_name"], []).append(r)
    return out


def wrong_statuses(objs: dict[str, dict[str, Any]], rows: dict[str, list[asyncpg.Record]]) -> dict[str, str]:
    """Objects whose status is not their row's: name -> 'object phase != row phase'."""
    wrong = {}
    for name, obj in objs.items():
        rs = [r for r in rows.get(name, []) if r["cr_uid"] == obj["metadata"]["uid"]]
        st = obj.get("status") or {}
        if len(rs) != 1:
            wrong[name] = f"{len(rs)} rows"
            continue
        want = PHASES[rs[0]["status"]]
        if st.get("phase") != want or st.get("taskId") != str(rs[0]["id"]):
            wrong[name] = f"{st.get('phase')} (task {st.get('taskId')}) != {want} (task {rs[0]['id']})"
    return wrong


@pytest.mark.parametrize("fault", ["refused", "blackhole"])
async def test_api_server_away_past_the_resync_window(
    cluster: Cluster,
    namespace: str,
    toxiproxy: Toxiproxy,  # before operators: torn down after them
    operators: Operators,
    scenarios: list[dict[str, Any]],
    fault: str,
) -> None:
    """The API server unreachable for 15 s (resync window 2 x 2 s) while tasks finish and new
    Tasks are created: afterwards every object shows its row's true phase, none is lost."""
    api = toxiproxy.create("apiserver", apiserver_port(cluster))
    operators.start("kt-a", api_port=api.port)
    await wait_ready(operators, ["kt-a"])
    apply(
        cluster,
        namespace,
        [task_manifest(f"ok-{i}", handler="side.sleep", payload={"s": 4}) for i in range(5)]
        + [
            task_manifest(
                f"doomed-{i}", handler="side.sleep", payload={"s": 60}, timeoutSeconds=3, maxAttempts=1
            )
            for i in range(3)
        ],
    )
    await wait_until(
        lambda: set(phases(cluster, namespace).values()) == {"Running"}, 30, "every object to show Running"
    )
    cut(api) if fault == "refused" else api.blackhole()
    t_cut = time.monotonic()
    apply(cluster, namespace, [task_manifest(f"late-{i}", payload={"n": i}) for i in range(3)])

    async def all_rows_finished() -> bool:
        rows = await db_rows(operators.db, namespace)
        return len(rows) == 8 and all(r["status"] in ("succeeded", "failed") for r in rows)

    await wait_until(all_rows_finished, 30, "the rows to finish while the API server is away")
    assert set(phases(cluster, namespace).values()) == {"Running", ""}, (
        "nothing was written during the outage"
    )
    await asyncio.sleep(max(0.0, 15.0 - (time.monotonic() - t_cut)))
    restore(api)
    t_heal = time.monotonic()
    names = (
        {f"ok-{i}" for i in range(5)} | {f"doomed-{i}" for i in range(3)} | {f"late-{i}" for i in range(3)}
    )

    async def converged() -> bool:
        objs = objects(cluster, namespace)
        rows = await rows_by_name(operators.db, namespace)
        return (
            set(objs) == names
            and not wrong_statuses(objs, rows)
            and all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values())
        )

    try:
        await wait_until(converged, 60, "every object to show its true phase", interval=0.25)
        took = time.monotonic() - t_heal
    finally:
        objs = objects(cluster, namespace)
        rows = await rows_by_name(operators.db, namespace)
        wrong = wrong_statuses(objs, rows)
        lost = len(names - {n for n, rs in rows.items() if rs})
        scenarios.append({
            "scenario": f"API server away 15 s ({fault}), resync window 4 s",
            "converge_s": None if wrong or lost else time.monotonic() - t_heal,
            "lost": lost,
            "wrong": len(wrong),
            "note": f"{len(names)} objects; after it came back",
        })  # fmt: skip
    assert not wrong and not lost, (wrong, lost)
    res = cluster.run(
        "wait", "--for=condition=Succeeded", "task/ok-0", "task/late-0", "-n", namespace, "--timeout=5s"
    )
    assert res.returncode == 0
    print(
        f"\n[e2e] API server away ({fault}) for {t_heal - t_cut:.1f}s: every status right {took:.1f}s after"
    )


async def test_database_away_while_tasks_are_created_and_deleted(
    cluster: Cluster,
    namespace: str,
    toxiproxy: Toxiproxy,  # before operators: torn down after them
    operators: Operators,
    scenarios: list[dict[str, Any]],
) -> None:
    """PostgreSQL unreachable for 20 s (past the leader timeout) while Tasks are created and
    deleted: every Task ingested once, every deletion's row cancelled within 30 s of its return,
    no object stuck, no process restarted."""
    pg = toxiproxy.create("postgres", pg_port(operators.db))
    via = with_port(operators.db, pg.port)
    for name in ("kt-a", "kt-b"):
        operators.start(name, db_url=via)
    await wait_ready(operators, ["kt-a", "kt-b"])
    pids = {n: p.pid for n, p in operators.procs.items()}
    apply(
        cluster,
        namespace,
        [task_manifest(f"busy-{i}", handler="side.sleep", payload={"s": 3600}) for i in range(4)]
        + [task_manifest(f"queued-{i}", delaySeconds=3600) for i in range(3)],
    )

    async def ingested(n: int) -> bool:
        return len(await db_rows(operators.db, namespace)) == n

    await wait_until(lambda: ingested(7), 30, "7 rows")
    cut(pg)
    t_cut = time.monotonic()
    created = [f"new-{i}" for i in range(10)]
    deleted = ["busy-0", "busy-1", "queued-0"]
    apply(cluster, namespace, [task_manifest(n, payload={"n": i}) for i, n in enumerate(created)])
    t_del = time.monotonic()
    cluster.run("delete", "task", *deleted, "-n", namespace, "--timeout=10s")
    delete_took = time.monotonic() - t_del
    apply(cluster, namespace, [task_manifest("ephemeral", delaySeconds=3600)])
    cluster.run("delete", "task", "ephemeral", "-n", namespace, "--timeout=10s")
    await asyncio.sleep(max(0.0, 20.0 - (time.monotonic() - t_cut)))
    restore(pg)
    t_heal = time.monotonic()

    async def settled() -> bool:
        by = await rows_by_name(operators.db, namespace)
        return (
            all(len(by.get(n, [])) == 1 and by[n][0]["status"] == "succeeded" for n in created)
            and all(by[n][0]["status"] == "cancelled" for n in deleted)
            and all(r["status"] in ("cancelled",) for r in by.get("ephemeral", []))
        )

    ok = True
    try:
        await wait_until(settled, 30, "ingestion and cancellations within 30 s of the database's return")
    except AssertionError:
        ok = False
    took = time.monotonic() - t_heal
    by = await rows_by_name(operators.db, namespace)
    lost = sum(1 for n in created if not by.get(n))
    dup = sum(1 for rs in by.values() if len(rs) > 1)
    not_cancelled = [n for n in deleted if by[n][0]["status"] != "cancelled"]
    left = set(objects(cluster, namespace))
    scenarios.append({
        "scenario": "PostgreSQL away 20 s; 10 Tasks created, 4 deleted",
        "converge_s": took if ok else None,
        "lost": lost,
        "wrong": dup + len(not_cancelled),
        "note": f"deletes returned in {delete_took:.1f}s; no restart",
    })  # fmt: skip
    assert ok, {n: [r["status"] for r in rs] for n, rs in by.items()}
    assert lost == 0 and dup == 0 and not not_cancelled
    assert not set(deleted) & left and "ephemeral" not in left, "a deleted object is still there"
    assert delete_took < 5, f"kubectl delete waited {delete_took:.1f}s for an operator"
    survivors = {n: by[n][0]["status"] for n in ("busy-2", "busy-3", "queued-1", "queued-2")}
    assert all(s in ("pending", "running") for s in survivors.values()), survivors
    assert {n: p.pid for n, p in operators.procs.items() if p.poll() is None} == pids, "a process restarted"
    print(
        f"\n[e2e] database away 20s: settled {took:.1f}s after it came back; deletes took {delete_took:.1f}s"
    )


async def test_leader_without_the_database_steps_down(
    cluster: Cluster,
    namespace: str,
    toxiproxy: Toxiproxy,  # before operators: torn down after them
    operators: Operators,
    scenarios: list[dict[str, Any]],
) -> None:
    """The leader's own link to PostgreSQL hangs (a partition: its sessions stay open on the
    server): within 10 s it gives up both the lease and kopf peering, and the other replica
    leads -- new Tasks are ingested, run and shown -- within the peering lifetime + 10 s."""
    links = {n: toxiproxy.create(f"pg-{n}", pg_port(operators.db)) for n in ("kt-a", "kt-b")}
    operators.start("kt-a", db_url=with_port(operators.db, links["kt-a"].port))
    await wait_ready(operators, ["kt-a"])
    assert await wait_leading(operators) == "kt-a"
    operators.start("kt-b", db_url=with_port(operators.db, links["kt-b"].port))
    await wait_ready(operators, ["kt-a", "kt-b"])
    apply(cluster, namespace, [task_manifest("before", payload={"n": 0})])
    await wait_until(lambda: phases(cluster, namespace).get("before") == "Succeeded", 30, "before Succeeded")
    links["kt-a"].blackhole()
    t_cut = time.monotonic()
    apply(cluster, namespace, [task_manifest("probe", payload={"n": 1})])
    bound = float(FAST["KUBETASKS_PEERING_LIFETIME"]) + LEADER_TIMEOUT

    async def b_leads() -> bool:
        return await operators.leader() == "kt-b"

    t_lease = await wait_until(b_leads, bound + 20, "kt-b to hold the lease", interval=0.1)
    t_probe = await wait_until(
        lambda: phases(cluster, namespace).get("probe") == "Succeeded", bound + 20, "the probe Succeeded"
    )
    t_probe = time.monotonic() - t_cut

    def a_peers() -> bool:
        peering = cluster.json("get", "kopfpeering", operators.release.peering, "-n", namespace)
        return "kt-a" in (peering.get("status") or {})

    await wait_until(lambda: "giving up leadership" in operators.log("kt-a"), 5, "kt-a to give up")
    await wait_until(
        lambda: not a_peers(), float(FAST["KUBETASKS_PEERING_LIFETIME"]), "kt-a to leave kopf peering"
    )
    scenarios.append({
        "scenario": "leader's PostgreSQL link hangs (partition)",
        "converge_s": t_probe,
        "lost": 0 if phases(cluster, namespace).get("probe") == "Succeeded" else 1,
        "wrong": 0,
        "note": f"other replica leads {t_lease:.1f}s after; bound lifetime+10 = {bound:.0f}s",
    })  # fmt: skip
    print(
        f"\n[e2e] leader cut from PostgreSQL: kt-b leads after {t_lease:.1f}s; new Task done {t_probe:.1f}s"
    )
    assert t_lease <= bound and t_probe <= bound + 3, (t_lease, t_probe, bound)
    restore(links["kt-a"])
    await asyncio.sleep(3)
    assert await operators.leader() == "kt-b", "a healed former leader must not take the lease back"


async def test_two_releases_in_one_namespace_and_database(
    cluster: Cluster, namespace: str, db: str, tmp_path: Path, scenarios: list[dict[str, Any]]
) -> None:
    """Two releases in one namespace, one database: starting and losing pods of either never
    declares the other's workers dead, and none of its tasks runs twice."""
    a = install(cluster, namespace, db, "namespaced", name="kta", sets=("peering.name=kta",))
    b = install(cluster, namespace, db, "namespaced", name="ktb", sets=("peering.name=ktb",))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ops_a, ops_b = Operators(a, tmp_path / "a"), Operators(b, tmp_path / "b")
    ops_b.sidelog = ops_a.sidelog
    try:
        ops_b.start("ktb-0")
        await wait_ready(ops_b, ["ktb-0"])
        apply(
            cluster,
            namespace,
            [task_manifest(f"b-{i}", handler="side.sleep", payload={"s": 3600}) for i in range(3)],
        )

        async def b_runs() -> bool:
            rows = await db_rows(db, namespace)
            return len(rows) == 3 and all(r["status"] == "running" and r["pod_id"] == "ktb-0" for r in rows)

        await wait_until(b_runs, 30, "release B to run its tasks")
        # Release A's first pod starts (and compares its own pods with the workers);
        # then one of A's pods goes for good while the other A pod watches.
        ops_a.start("kta-0")
        ops_a.start("kta-1")
        await wait_ready(ops_a, ["kta-0", "kta-1"])
        ops_a.kill("kta-1")
        cluster.run("delete", "pod", "kta-1", "-n", namespace, "--grace-period=0", "--force", "--wait=false")
        await asyncio.sleep(5)
        conn = await asyncpg.connect(db)
        try:
            workers = {
                r["pod_id"]: r["status"]
                for r in await conn.fetch("SELECT pod_id, status FROM kubetasks.workers ORDER BY started_at")
            }
        finally:
            await conn.close()
        rows = await db_rows(db, namespace)
        starts = [ln for ln in ops_a.sidelog.read_text().splitlines() if ln.startswith("start")]
        touched = sum(
            1 for r in rows if r["status"] != "running" or r["attempt"] != 1 or r["pod_id"] != "ktb-0"
        )
        scenarios.append({
            "scenario": "two releases, one namespace and database",
            "converge_s": None,
            "lost": 0,
            "wrong": touched + (0 if workers.get("ktb-0") == "active" else 1),
            "note": f"workers {workers}",
        })  # fmt: skip
        assert workers.get("ktb-0") == "active", f"release B's worker was declared dead: {workers}"
        assert workers.get("kta-1") == "dead", f"release A's own lost pod was not recovered: {workers}"
        assert touched == 0, [(r["cr_name"], r["status"], r["attempt"], r["pod_id"]) for r in rows]
        assert len(starts) == 3, starts
    finally:
        ops_a.stop_all()
        ops_b.stop_all()
        a.uninstall()
        b.uninstall()


async def test_replace_force_gives_the_new_object_its_own_status_and_schedule(
    cluster: Cluster, namespace: str, operators: Operators, scenarios: list[dict[str, Any]]
) -> None:
    """`kubectl replace --force` of a running Task: the old row is cancelled, and its status never
    lands on the new object. Of a CronJobLock, again and again: the schedule is always the new
    object's, and it keeps running."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    await wait_leading(operators)
    wrong = 0
    for round_ in range(3):
        name = f"rep-{round_}"
        apply(cluster, namespace, [task_manifest(name, handler="side.sleep", payload={"s": 3600})])
        await wait_until(lambda n=name: phases(cluster, namespace).get(n) == "Running", 30, f"{name} Running")
        new = task_manifest(name, handler="side.sleep", payload={"s": 3600, "v": 2})
        cluster.run("replace", "--force", "-n", namespace, "-f", "-", input=json.dumps(new))
        seen: set[tuple[str, str]] = set()
        end = time.monotonic() + 6
        while time.monotonic() < end:
            obj = objects(cluster, namespace).get(name)
            if obj:
                st = obj.get("status") or {}
                seen.add((str(st.get("phase")), str(st.get("taskId"))))
            await asyncio.sleep(0.1)
        by = await rows_by_name(operators.db, namespace)
        old, fresh = by[name][0], by[name][-1]
        assert old["id"] != fresh["id"] and old["status"] == "cancelled", [dict(r) for r in by[name]]
        stale = {s for s in seen if s[1] == str(old["id"]) or s[0] == "Cancelled"}
        wrong += len(stale)
        assert not stale, f"the replaced object showed the old row's status: {sorted(seen)}"
        st = objects(cluster, namespace)[name].get("status") or {}
        assert st.get("taskId") == str(fresh["id"]), st

    apply(cluster, namespace, [cronjoblock("cj", "* * * * * */2")])

    async def schedule_uid() -> str | None:
        conn = await asyncpg.connect(operators.db)
        try:
            return await conn.fetchval(
                "SELECT cr_uid FROM kubetasks.schedules WHERE name = $1", f"{namespace}/cj"
            )
        finally:
            await conn.close()

    for round_ in range(5):
        body = cronjoblock("cj", f"* * * * * */{2 + round_ % 2}")
        cluster.run("replace", "--force", "-n", namespace, "-f", "-", input=json.dumps(body))
        uid = cluster.json("get", "cronjoblock", "cj", "-n", namespace)["metadata"]["uid"]

        async def ours(u: str = uid) -> bool:
            return await schedule_uid() == u

        await wait_until(ours, 15, f"the schedule to be the new object's (round {round_})")
        await asyncio.sleep(2.5)  # a prune or a late event of the old object would remove it now
        if await schedule_uid() != uid:
            wrong += 1
            raise AssertionError(f"round {round_}: the new CronJobLock lost its schedule")
    scenarios.append({
        "scenario": "replace --force: 3 running Tasks, 5 CronJobLocks",
        "converge_s": None,
        "lost": 0,
        "wrong": wrong,
        "note": "old rows cancelled; no old status on a new object",
    })  # fmt: skip


async def test_namespace_deleted_after_helm_uninstall(
    cluster: Cluster,
    namespace: str,
    release: Release,
    operators: Operators,
    db: str,
    scenarios: list[dict[str, Any]],
) -> None:
    """After `helm uninstall`, deleting the namespace with unfinished Tasks completes within 60 s.
    Their rows are kept as they were (no operator is left to cancel them) and are cancelled by the
    first operator that watches that namespace again."""
    operators.start("kt-a")
    await wait_ready(operators, ["kt-a"])
    apply(
        cluster,
        namespace,
        [task_manifest(f"busy-{i}", handler="side.sleep", payload={"s": 3600}) for i in range(2)]
        + [task_manifest(f"later-{i}", delaySeconds=3600) for i in range(2)],
    )
    await wait_until(
        lambda: sorted(phases(cluster, namespace).values()) == ["Pending", "Pending", "Running", "Running"],
        30,
        "2 Running, 2 Pending",
    )
    release.uninstall()
    operators.stop_all()  # what the kubelet does to the Deployment's pods
    t0 = time.monotonic()
    cluster.run("delete", "namespace", namespace, "--wait=false")

    def gone() -> bool:
        return cluster.run("get", "namespace", namespace, check=False).returncode != 0

    try:
        await wait_until(gone, 60, "the namespace to be deleted", interval=0.5)
        took: float | None = time.monotonic() - t0
    except AssertionError:
        took = None
    rows = await db_rows(db, namespace)
    scenarios.append({
        "scenario": "helm uninstall, then kubectl delete namespace",
        "converge_s": took,
        "lost": 0,
        "wrong": 0 if took is not None else 4,
        "note": "rows kept: " + ",".join(sorted(r["status"] for r in rows)),
    })  # fmt: skip
    assert took is not None, "the namespace is stuck Terminating"
    print(
        f"\n[e2e] namespace deleted {took:.1f}s after `helm uninstall`; rows: {[r['status'] for r in rows]}"
    )
    assert sorted(r["status"] for r in rows) == ["pending"] * 4, "rows are kept (running ones handed back)"

    cluster.run("create", "namespace", namespace)
    again = install(cluster, namespace, db, "namespaced", name="kt2")
    (operators.tmp / "again").mkdir()
    ops2 = Operators(again, operators.tmp / "again")
    try:
        ops2.start("kt2-a", extra={"KUBETASKS_RECONCILE_INTERVAL": "600"})

        async def cancelled() -> bool:
            return {r["status"] for r in await db_rows(db, namespace)} == {"cancelled"}

        await wait_until(cancelled, 30, "the next operator of the namespace to cancel them")
        assert {r["error"] for r in await db_rows(db, namespace)} == {"the Task object was deleted"}
    finally:
        ops2.stop_all()
        again.uninstall()


async def test_new_leader_reconciles_what_happened_while_nobody_led(
    cluster: Cluster, namespace: str, operators: Operators, scenarios: list[dict[str, Any]]
) -> None:
    """The leader and a worker are SIGKILLed and their pods deleted, and a Task object deleted,
    while no replica leads: the replica that takes over recovers the lost pods' tasks at once
    (not when their 60 s leases run out) and cancels the deleted Task's row."""
    slow_lease = {"KUBETASKS_LEASE_TTL": "60", "KUBETASKS_HEARTBEAT_INTERVAL": "2"}
    # The first to start leads; its kopf peering priority is also the highest, so that
    # nothing but its death hands leadership over.
    operators.start("kt-lead", priority=300, extra=slow_lease)
    await wait_ready(operators, ["kt-lead"])
    assert await wait_leading(operators) == "kt-lead"
    operators.start("kt-victim", priority=200, extra=slow_lease)
    operators.start("kt-next", priority=100, concurrency=1, extra={"KUBETASKS_RECONCILE_INTERVAL": "600"})
    await wait_ready(operators, ["kt-lead", "kt-victim", "kt-next"])
    apply(
        cluster,
        namespace,
        [task_manifest(f"long-{i}", handler="side.sleep", payload={"s": 3600}) for i in range(6)]
        + [task_manifest("to-delete", delaySeconds=3600)],
    )

    async def spread() -> bool:
        rows = await db_rows(operators.db, namespace)
        return len(rows) == 7 and sum(r["status"] == "running" for r in rows) == 6

    await wait_until(spread, 30, "6 running, 1 pending")
    # Every replica's start-up listing is over: what follows happens to running operators.
    await asyncio.sleep(5)
    lost_pods = ("kt-lead", "kt-victim")
    held = {r["id"] for r in await db_rows(operators.db, namespace) if r["pod_id"] in lost_pods}
    assert held, "the lost pods held no task"
    for n in lost_pods:
        operators.kill(n)
    t0 = time.monotonic()
    cluster.run("delete", "pod", *lost_pods, "-n", namespace, "--grace-period=0", "--force", "--wait=false")
    gone = "to-delete"
    cluster.run("delete", "task", gone, "-n", namespace)

    async def released() -> bool:
        rows = {r["id"]: r for r in await db_rows(operators.db, namespace)}
        return all(rows[i]["status"] != "running" or rows[i]["pod_id"] == "kt-next" for i in held)

    async def cancelled() -> bool:
        return any(
            r["cr_name"] == gone and r["status"] == "cancelled"
            for r in await db_rows(operators.db, namespace)
        )

    await wait_until(released, 30, "the lost pods' tasks to be released")
    t_pods = time.monotonic() - t0
    await wait_until(cancelled, 30, "the deleted Task's row to be cancelled by the next leader")
    took = time.monotonic() - t0
    assert await operators.leader() == "kt-next"
    scenarios.append({
        "scenario": "leader + worker killed, pods and a Task deleted, no leader",
        "converge_s": took,
        "lost": 0,
        "wrong": 0,
        "note": f"{len(held)} tasks of lost pods released after {t_pods:.1f}s (leases: 60 s)",
    })  # fmt: skip
    print(f"\n[e2e] takeover: {len(held)} tasks released in {t_pods:.1f}s, Task cancelled {took:.1f}s")
    assert t_pods < 5, "the lost pods' tasks waited for their leases"
    assert took < 30, "recovered only when the leases ran out"
