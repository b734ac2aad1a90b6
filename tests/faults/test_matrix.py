"""The fault matrix: each scenario injects a real fault, the history checker judges.

Every scenario ends in the same five figures, each asserted to be 0 (see
history.py): lost, accepted duplicates, (task, attempt) started twice, a task
running under a non-active worker past the TTL, attempts spent without a
process death. Leases are short (heartbeat 0.5 s, TTL 2 s) so a fault longer
than the TTL fits in seconds. Each scenario also asserts that its fault
really happened (processes killed, connections reset, tasks recovered...),
so a scenario that stopped injecting anything cannot pass by doing nothing.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter

import pytest

from tests.faults import history
from tests.faults.harness import TTL, Scenario, Target, WorkerProc
from tests.faults.history import Figures
from tests.faults.toxiproxy import Toxiproxy
from tests.pgcluster import PgCluster

pytestmark = pytest.mark.faults


# Defects a scenario still reproduces, by the figure they break: `make test` would report a run
# whose only failures are listed here as xfail, with the reason and the figures; any other failure
# fails, and `make faults` (FAULTS_STRICT=1) fails them all. None is listed: every defect of issue 13
# that these scenarios reproduced is fixed (items 3-6 and 8 by d1d2c28 and migration 0011, item 7 by
# 0009), and each scenario now guards its fix. A new entry needs an open issue naming it.
KNOWN: dict[str, dict[str, str]] = {}


async def running_at_least(sc: Scenario, n: int) -> None:
    async def cond() -> bool:
        return await sc.count("status = 'running'") >= n

    await sc.wait_until(f"{n} running tasks", cond, 60)


def at_least(name: str, value: int, least: int) -> None:
    assert value >= least, f"the fault did not bite: {name}={value}, expected at least {least}"


async def test_sigkill(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """Workers SIGKILLed every 2 s and restarted, under the same pod id or a new one."""
    async with Scenario("sigkill", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(600, ms=(20, 300))
        ws = [sc.start_worker(f"pod-{i}") for i in range(4)]
        sc.trickle(0.05)
        await sc.all_busy(ws)
        for k in range(6):
            await asyncio.sleep(2)
            i = random.randrange(len(ws))
            victim = ws[i]
            sc.kill(victim)
            ws[i] = sc.start_worker(victim.pod if k % 2 == 0 else f"pod-{i}-r{k}")
        sc.faults_stopped()
    assert sc.figures is not None
    at_least("attempts of killed workers re-run", sc.figures.extra["attempts_excused"], 1)


async def test_sigstop_past_ttl(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """A worker SIGSTOPped past its TTL, then SIGCONTed, twice: peers recover, its late writes bounce."""
    async with Scenario("sigstop", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(200, ms=(300, 1500))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.2, ms=(300, 1500))
        await sc.all_busy(ws)
        for victim in ws[:2]:
            sc.stop_signal(victim)
            await asyncio.sleep(TTL + 2.5)
            at_least("seconds the stopped worker was silent", int(await sc.silence([victim])), int(TTL))
            # Excused up to now, before SIGCONT: the lease it takes after waking is not.
            await sc.excuse(victim, "SIGSTOPped past the TTL")
            sc.cont_signal(victim)
            await asyncio.sleep(2)
        sc.faults_stopped()
    assert sc.figures is not None
    at_least("tasks of stopped workers recovered", sc.figures.extra["attempts_excused"], 1)


@pytest.mark.parametrize("kind", ["blackhole", "freeze"])
async def test_network_stall_all_workers(
    run: int, kind: str, tmp_path, fault_target: Target, toxi: Toxiproxy
) -> None:
    """Every worker loses PostgreSQL for 2.5 x the TTL at once; every process stays alive.

    blackhole: bytes dropped, connections closed when the network returns;
    freeze: bytes held and delivered late, in order (a TCP stall).
    Expected: 0 attempts spent -- nobody died.
    """
    async with Scenario(f"stall_all[{kind}]", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(200, ms=(300, 1500))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.2, ms=(300, 1500))
        await sc.all_busy(ws)
        for w in ws:
            assert w.proxy is not None
            getattr(w.proxy, kind)()
        await asyncio.sleep(TTL * 2.5)
        at_least("seconds the workers were silent", int(await sc.silence(ws)), int(TTL * 2))
        for w in ws:
            assert w.proxy is not None
            w.proxy.heal()
        sc.faults_stopped()


async def test_network_partition_one_worker(
    run: int, tmp_path, fault_target: Target, toxi: Toxiproxy
) -> None:
    """One worker's link frozen past the TTL: peers recover its tasks (the attempt counts), and when
    the link returns its held writes arrive late and must all be fenced."""
    async with Scenario("partition_one", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(200, ms=(300, 1500))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.2, ms=(300, 1500))
        await sc.all_busy(ws)
        cut = ws[0]
        assert cut.proxy is not None
        cut.proxy.freeze()
        await asyncio.sleep(TTL + 3)
        at_least("seconds the cut-off worker was silent", int(await sc.silence([cut])), int(TTL))
        await sc.excuse(cut, "cut off alone past the TTL")
        cut.proxy.heal()
        await asyncio.sleep(2)
        sc.faults_stopped()
    assert sc.figures is not None
    at_least("tasks of the cut-off worker recovered", sc.figures.extra["attempts_excused"], 1)


async def test_slow_commits(run: int, tmp_path, toxi: Toxiproxy) -> None:
    """A synchronous standby behind a slow link: synchronous commits take 0-4 s, many longer than
    the TTL (heartbeats, completions, registrations; a claim alone commits asynchronously)."""
    cluster = PgCluster.start()
    try:
        repl = toxi.create(f"repl-{run}-{id(cluster)}", cluster.primary.port)
        sb = cluster.add_standby("standby1", via_port=repl.port)
        cluster.make_synchronous(sb)
        target = Target(admin_url=cluster.primary.url("{db}"), upstream_port=cluster.primary.port)
        async with Scenario("slow_commits", tmp_path, target, toxi, known=KNOWN) as sc:
            await sc.enqueue(400, ms=(50, 400))
            ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
            sc.trickle(0.1)
            await sc.all_busy(ws)
            # Phases of commit latency: some below the TTL, some past it (a claim and a completion
            # written together then commit after the lease they were checked against).
            for latency, jitter in [(1000, 1000), (0, 0), (3500, 500), (0, 0), (2000, 1500)]:
                toxic = repl.latency(latency, jitter, stream="downstream") if latency else None
                await asyncio.sleep(3)
                if toxic:
                    repl.remove(toxic)
            sc.faults_stopped()
        toxi.request("DELETE", f"/proxies/{repl.name}")
    finally:
        cluster.stop()


async def test_claim_commits_after_reap(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """A claim checked against a live lease commits late (a commit stalled on I/O for TTL + 1.5 s)
    while its worker is cut off: by the time the claim lands, peers have reaped that worker.

    The claimed tasks must not stay `running` under the dead worker past the TTL.
    """
    async with Scenario("late_claim_commit", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        conn = await sc.conn()
        try:
            await conn.execute(history.SLOW_CLAIMS)
        finally:
            await conn.close()
        await sc.enqueue(400, ms=(20, 150))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.1, ms=(20, 150))
        await sc.all_busy(ws)
        cut = ws[0]
        assert cut.proxy is not None
        await sc.fetchval(
            "INSERT INTO faultcheck.slow_claims VALUES ($1, $2) RETURNING 1", cut.pod, TTL + 1.5
        )
        await asyncio.sleep(0.5)  # its next claim is now committing, slowly
        cut.proxy.freeze()
        await asyncio.sleep(TTL + 3)
        await sc.fetchval("DELETE FROM faultcheck.slow_claims RETURNING 1")
        await sc.excuse(cut, "cut off alone past the TTL")
        cut.proxy.heal()
        slowed = await sc.fetchval(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM faultcheck.claims_slowed"
        )
        at_least("claims whose commit was held back", int(slowed), 1)
        await asyncio.sleep(2)
        sc.faults_stopped()


async def test_connection_resets(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """TCP resets, again and again, of requests (mid-claim, mid-completion) and of replies (committed
    but never acknowledged) on the workers' connections."""
    async with Scenario("conn_resets", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(800, ms=(10, 80))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.05, ms=(10, 80))
        await sc.all_busy(ws)
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        resets = Counter[str]()
        while loop.time() < end:
            w = random.choice(ws)
            assert w.proxy is not None
            stream = random.choice(["upstream", "downstream"])
            toxic = w.proxy.reset_next(stream)
            await asyncio.sleep(random.uniform(0.02, 0.15))
            w.proxy.remove(toxic)
            resets[stream] += 1
            await asyncio.sleep(random.uniform(0.05, 0.3))
        sc.faults_stopped()

        def where_they_hit(f: Figures) -> None:
            # Reported, not asserted: the workers' own words for what a reset interrupted.
            logs = "".join(w.log.read_text(errors="replace") for w in sc.workers)
            f.extra["claims_interrupted"] = logs.count("claim failed")
            f.extra["outcome_writes_interrupted"] = logs.count("outcome(s) failed")
            f.extra["resets"] = dict(resets)

        sc.derive(where_they_hit)
    assert sc.figures is not None
    at_least("resets of requests", resets["upstream"], 20)
    at_least("resets of replies", resets["downstream"], 20)


async def test_postgres_restart(
    run: int, tmp_path, fault_pg: PgCluster, fault_target: Target, toxi: Toxiproxy
) -> None:
    """PostgreSQL stopped at once (like a crash), down for longer than the TTL, started again."""
    async with Scenario("pg_restart", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(600, ms=(20, 300))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.05)
        await sc.all_busy(ws)
        await asyncio.to_thread(fault_pg.primary.restart, TTL + 1.5)
        await asyncio.sleep(2)
        sc.faults_stopped()


async def test_failover_to_sync_standby(run: int, tmp_path, pg_pair: PgCluster, toxi: Toxiproxy) -> None:
    """The primary SIGKILLed under load; the synchronous standby promoted after longer than the TTL.

    Workers and the enqueuer use a multi-host URL with target_session_attrs=read-write. Nothing
    acknowledged may be lost: no enqueue, no outcome (the sampler remembers every final status
    it saw on the old primary).
    """
    target = Target(admin_url=pg_pair.primary.url("{db}"), upstream_port=None, client_url=pg_pair.url("{db}"))
    async with Scenario("failover", tmp_path, target, toxi, known=KNOWN) as sc:
        await sc.enqueue(600, ms=(20, 300))
        ws = [sc.start_worker(f"pod-{i}", proxy=False) for i in range(3)]
        tr = sc.trickle(0.05)
        await sc.all_busy(ws)
        acked_before = len(tr.acked)
        pg_pair.primary.kill()
        await asyncio.sleep(TTL + 1)
        await asyncio.to_thread(pg_pair.promote)
        await asyncio.sleep(3)
        sc.faults_stopped()
    at_least("enqueues acknowledged after the failover", len(tr.acked) - acked_before, 1)


async def test_cpu_bound_handler(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """An async handler that holds its worker's event loop for 2 x the TTL (CPU-bound code that
    never awaits). The process is alive and its task well within its timeout: its lease must
    hold, nobody may run the task a second time, and no attempt may be spent."""
    async with Scenario("cpu_bound", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(200, ms=(50, 300))
        ws = [sc.start_worker(f"pod-{i}") for i in range(3)]
        sc.trickle(0.2)
        await sc.all_busy(ws)
        assert sc.app is not None
        for i in range(2):
            tid = await sc.app.enqueue("fx.spin", {"n": i, "s": TTL * 2}, max_attempts=20, timeout=60)
            sc.acked.add(tid)
        await asyncio.sleep(TTL * 2 + 3)
        sc.faults_stopped()


async def test_rolling_upgrade(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """Three v1 pods replaced one by one by v2 pods, which add the handler fx.new.

    A v1 pod must neither claim nor fail an fx.new task: they wait, pending, for a v2 pod.
    """
    async with Scenario("rolling_upgrade", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(300, ms=(20, 300))
        await sc.enqueue(100, ms=(20, 300), handler="fx.new")
        old = [sc.start_worker(f"v1-{i}", version=1) for i in range(3)]
        sc.trickle(0.1)
        sc.trickle(0.2, handler="fx.new")
        await sc.all_busy(old)
        await asyncio.sleep(2)
        for i, w in enumerate(old):
            sc.start_worker(f"v2-{i}", version=2)
            await asyncio.sleep(1.5)
            assert await sc.term(w) == 0, f"{w.pod} did not stop cleanly (log: {w.log})"
            await asyncio.sleep(1)
        sc.faults_stopped()
        v1_pids = {w.pid for w in old}

        def wrong_claims(f: Figures) -> None:
            v1_workers = {w["w"] for w in f.details["workers"] if w["pid"] in v1_pids}
            bad = [
                (t["task_id"], t["new_attempt"])
                for t in f.details["transitions"]
                if t["new_status"] == "running" and t["handler"] == "fx.new" and t["nw"] in v1_workers
            ]
            f.extra["v1_claimed_fx_new"] = len(bad)
            f.details["v1_claimed_fx_new"] = bad[:8]

        sc.derive(wrong_claims)
        sc.limit("v1_claimed_fx_new", 0)


async def test_two_processes_one_pod_id(run: int, tmp_path, fault_target: Target, toxi: Toxiproxy) -> None:
    """Two live processes under one pod id (two workers on one VM, `kubectl exec ... kubetasks worker`).

    Neither may supersede the other back and forth: the pod id registers at most twice.
    """
    async with Scenario("two_procs_one_pod", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(400, ms=(50, 400))
        first = [sc.start_worker("twin"), sc.start_worker("solo")]
        await sc.all_busy(first)
        sc.start_worker("twin")
        sc.trickle(0.1)
        await asyncio.sleep(12)
        sc.faults_stopped()

        def twin_registrations(f: Figures) -> None:
            f.extra["twin_registrations"] = sum(
                1 for w in f.details["workers"] if w["pod_id"].startswith("twin")
            )

        sc.derive(twin_registrations)
        sc.limit("twin_registrations", 2)


async def test_db_stall_during_heartbeat_storm(
    run: int, tmp_path, fault_pg: PgCluster, fault_target: Target, toxi: Toxiproxy
) -> None:
    """80 workers (4 processes x 20); PostgreSQL frozen (SIGSTOP) past the TTL, then thawed: 80
    heartbeats land at once. 0 live workers declared dead, 0 deadlocks, 0 attempts spent."""
    async with Scenario("hb_storm", tmp_path, fault_target, toxi, known=KNOWN) as sc:
        await sc.enqueue(400, ms=(500, 3000))
        procs: list[WorkerProc] = []
        for p in range(4):
            procs.append(
                sc.start_worker(
                    f"storm{p}",
                    proxy=False,
                    concurrency=2,
                    command=[sys.executable, "-m", "tests.faults.many_workers", "20", f"storm{p}-"],
                )
            )

        async def all_active() -> bool:
            n = await sc.fetchval("SELECT count(*) FROM kubetasks.workers WHERE status = 'active'")
            return int(n) == 80

        await sc.wait_until("80 active workers", all_active, 90)
        await sc.all_busy(procs)
        await running_at_least(sc, 40)
        fault_pg.primary.pause()
        try:
            await asyncio.sleep(TTL + 1.5)
        finally:
            fault_pg.primary.resume()
        await asyncio.sleep(3)
        sc.faults_stopped()
        sc.limit("deadlocks", 0)
        sc.limit("live_declared_dead", 0)
