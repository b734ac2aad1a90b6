"""Workers claim only the handlers they have; a task nobody serves waits, says why, and runs later.

Against a real PostgreSQL: the claim's plan with 100,000 unserved tasks ahead
of it, the parking pass's cost, a rolling upgrade that adds a handler, a
cluster-wide limit that a pod without it obeys, and the ways a task enters
without the enqueuing pod having its handler (a Task object, a CronJobLock).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from prometheus_client import generate_latest

from kubetasks import App, EnqueueRequest, TaskContext, UnknownHandler, cron, metrics
from kubetasks.k8s import handlers as k8s_handlers
from kubetasks.k8s import opcontext
from tests.integration.helpers import ROOT, RunningWorker, wait_for
from tests.support import connect, explain_claim


def new_app(db_url: str, pod: str, **kw: Any) -> App:
    kw.setdefault("heartbeat_interval", 0.5)
    kw.setdefault("lease_ttl", 2.0)
    return App(database_url=db_url, pod_id=pod, **kw)


async def statuses(conn: asyncpg.Connection, ids: list[int]) -> Counter[str]:
    return Counter(r["status"] for r in await conn.fetch("SELECT status FROM tasks WHERE id = ANY ($1)", ids))


async def parked(conn: asyncpg.Connection, ids: list[int]) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM tasks WHERE id = ANY ($1) AND parked", ids))


def returns(value: Any) -> Callable[[TaskContext], Awaitable[Any]]:
    """An async handler returning ``value`` (a plain one must be importable by name)."""

    async def handler(ctx: TaskContext) -> Any:
        return value

    return handler


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(plan_nodes(child))
    return out


def picked_scan(plan: dict[str, Any]) -> dict[str, Any]:
    """The scan of tasks under the claim's `picked` CTE that ran: how the claim reads the tasks it
    picks (without a cursor, the range of every priority; the range after a cursor never runs)."""
    picked = next(n for n in plan_nodes(plan["Plan"]) if n.get("Subplan Name") == "CTE picked")
    return next(
        n
        for n in plan_nodes(picked)
        if "Scan" in n["Node Type"] and n.get("Relation Name") == "tasks" and n.get("Actual Loops", 0) > 0
    )


class TestClaimPlan:
    async def test_claim_ignores_100k_unserved_tasks_ahead_of_it(self, app: App, db_url: str) -> None:
        """100,000 pending tasks of a handler no worker has, all ahead in claim order: once parked,
        the claim is the same index scan reading the same buffers as without them, in the plan it
        runs (claim_batch's generic plan, made once per session and again after ANALYZE)."""
        claim = app.store.queries["claim"].sql
        conn = await connect(db_url)
        try:
            await conn.execute(
                "INSERT INTO tasks (handler, queue, payload) "
                "SELECT 'served.h', 'default', '{}'::jsonb FROM generate_series(1, 10000)"
            )
            await conn.execute("ANALYZE tasks")
            wid = uuid.uuid4()
            await conn.fetchrow(
                "SELECT * FROM register_worker($1, 'plan-pod', 'h', 1, ARRAY['default'], 50, 60)", wid
            )
            await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['served.h'], '{}', '[]', 1000)", wid)

            async def measure() -> tuple[dict[str, Any], float]:
                args = (wid, "plan-pod", ["default"], 10, [], [], [], [], [], [], [])
                tx = conn.transaction()
                await tx.start()
                try:
                    plan = await explain_claim(conn, *args)
                finally:
                    await tx.rollback()
                times = []
                stmt = await conn.prepare(claim)
                for _ in range(25):
                    tx = conn.transaction()
                    await tx.start()
                    t0 = time.perf_counter()
                    rows = await stmt.fetch(*args)
                    times.append(time.perf_counter() - t0)
                    await tx.rollback()
                    assert [r["handler"] for r in rows] == ["served.h"] * 10
                return plan, statistics.median(times) * 1000

            base, base_ms = await measure()
            # A typo'd or not-yet-deployed handler, at a higher priority: ahead of every served task.
            await conn.execute(
                "INSERT INTO tasks (handler, queue, priority, payload) "
                "SELECT 'ghost.h', 'default', 10, '{}'::jsonb FROM generate_series(1, 100000)"
            )
            await conn.execute("ANALYZE tasks")
            walking, walking_ms = await measure()
            t0 = time.perf_counter()
            passes = 0
            while True:
                row = await conn.fetchrow("SELECT * FROM park_unserved(ARRAY['served.h'], 1, true, 20000)")
                passes += 1
                if not row["more"]:
                    break
            park_s = time.perf_counter() - t0
            assert await conn.fetchval("SELECT count(*) FROM tasks WHERE parked") == 100000
            await conn.execute("VACUUM ANALYZE tasks")
            after, after_ms = await measure()

        finally:
            await conn.close()

        def facts(plan: dict[str, Any]) -> tuple[str, str | None, int, int]:
            scan = picked_scan(plan)
            blocks = int(scan.get("Shared Hit Blocks", 0)) + int(scan.get("Shared Read Blocks", 0))
            return (
                scan["Node Type"],
                scan.get("Index Name"),
                int(scan.get("Rows Removed by Filter", 0)),
                blocks,
            )

        print(
            f"\n[served] claim of 10 behind 100,000 unserved: {base_ms:.3f} ms and {facts(base)}"
            f" without them, {walking_ms:.3f} ms and {facts(walking)} before parking,"
            f" {after_ms:.3f} ms and {facts(after)}"
            f" once parked ({passes} pass(es), {park_s:.2f} s)"
        )
        for plan in (base, after):
            kind, index, removed, blocks = facts(plan)
            assert (kind, index, removed) == ("Index Scan", "tasks_pending_claim", 0), facts(plan)
            assert blocks <= facts(base)[3] + 5, (facts(base), facts(plan))
        assert facts(walking)[2] == 100000  # what parking saves every claim from

    async def test_parking_pass_costs_the_pairs_not_the_pending_set(self, app: App, db_url: str) -> None:
        """The pass reads one index descent per distinct (queue, handler): quadrupling the pending
        set under the same 200 pairs leaves the buffers it reads about where they were."""
        conn = await connect(db_url)
        handlers = [f"many.h{i}" for i in range(200)]
        try:
            wid = uuid.uuid4()
            await conn.fetchrow(
                "SELECT * FROM register_worker($1, 'pass-pod', 'h', 1, ARRAY['default', 'other'], 50, 60)",
                wid,
            )
            await conn.fetchrow("SELECT * FROM worker_serves($1, $2, '{}', '[]', 1000)", wid, handlers)

            async def add(n: int) -> None:
                await conn.execute(
                    "INSERT INTO tasks (handler, queue, payload) "
                    "SELECT ($1::text[])[1 + i % 200], "
                    "CASE WHEN i % 2 = 0 THEN 'default' ELSE 'other' END, '{}'::jsonb "
                    "FROM generate_series(1, $2) AS i",
                    handlers,
                    n,
                )
                await conn.execute("VACUUM ANALYZE tasks")

            async def pass_blocks() -> tuple[int, float]:
                raw = await conn.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM park_unserved($1, 0, true, 20000)",
                    handlers,
                )
                plan = json.loads(raw)[0]
                top = plan["Plan"]
                return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0)), float(
                    plan["Execution Time"]
                )

            await add(50000)
            small = await pass_blocks()
            await add(150000)
            large = await pass_blocks()
            pending = await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'pending'")
            heap_pages = await conn.fetchval("SELECT relpages FROM pg_class WHERE relname = 'tasks'")
        finally:
            await conn.close()
        print(
            f"\n[served] parking pass over 400 pairs: {small[0]} buffers, {small[1]:.1f} ms at 50,000"
            f" pending; {large[0]} buffers, {large[1]:.1f} ms at {pending:,} pending"
            f" ({heap_pages} heap pages)"
        )
        assert large[0] <= small[0] * 1.5 + 50
        assert large[0] < heap_pages / 2


class TestParking:
    async def test_a_stalled_worker_keeps_its_tasks_until_it_is_declared_dead(
        self, app: App, db_url: str
    ) -> None:
        """A worker whose lease ran out but that nobody declared dead yet still serves its handlers
        (a stall it recovers from renews the lease, never re-registering); once declared dead, its
        tasks are parked, and a new registration unparks them at once, waking the queue."""
        conn = await connect(db_url)
        try:
            wid = uuid.uuid4()
            await conn.fetchrow(
                "SELECT * FROM register_worker($1, 'stall', 'h', 1, ARRAY['default'], 5, 60)", wid
            )
            await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['st.h'], '{}', '[]', 1000)", wid)
            await conn.execute(
                "INSERT INTO tasks (handler, queue) SELECT 'st.h', 'default' FROM generate_series(1, 5)"
            )
            await conn.execute(
                "UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE worker_id = $1", wid
            )
            row = await conn.fetchrow("SELECT * FROM park_unserved('{}', 0, true, 1000)")
            assert (row["ran"], row["parked"]) == (True, 0)
            await conn.execute("SELECT * FROM reap_expired_workers()")
            row = await conn.fetchrow("SELECT * FROM park_unserved('{}', 0, true, 1000)")
            assert (row["ran"], row["parked"]) == (True, 5)
            woken: list[str] = []
            await conn.add_listener("kubetasks_enqueued", lambda *a: woken.append(a[3]))
            again = uuid.uuid4()
            await conn.fetchrow(
                "SELECT * FROM register_worker($1, 'stall', 'h', 1, ARRAY['default'], 5, 60)", again
            )
            row = await conn.fetchrow(
                "SELECT * FROM worker_serves($1, ARRAY['st.h'], '{}', '[]', 1000)", again
            )
            assert (row["unparked"], row["more"]) == (5, False)
            await wait_for(lambda: _true(bool(woken)), 5, "the queue to be woken")
            assert woken == ["default"]
        finally:
            await conn.close()


async def _true(v: bool) -> bool:
    return v


class TestRollingUpgrade:
    async def test_old_pod_neither_claims_nor_fails_the_new_handler(self, app: App, db_url: str) -> None:
        """An old pod without the new handler runs the old one's tasks and leaves the new one's
        pending (parked, attempt 0); a new pod runs them at once when it registers, and later ones
        through NOTIFY (its heartbeat is far too slow to explain it). Rolled back, they wait again."""
        old = new_app(db_url, "old-pod")
        new = new_app(db_url, "new-pod", heartbeat_interval=5.0, lease_ttl=15.0)
        ran: list[tuple[str, int, str]] = []

        for a in (old, new):

            @a.task("up.a")
            async def up_a(ctx: TaskContext) -> None:
                ran.append((ctx.handler, ctx.id, ctx.pod_id))

        @new.task("up.b", queue="upq")
        async def up_b(ctx: TaskContext) -> None:
            ran.append((ctx.handler, ctx.id, ctx.pod_id))

        conn = await connect(db_url)
        try:
            async with RunningWorker(old, queues=["default", "upq"]):
                ids_b = await new.enqueue_many([EnqueueRequest("up.b") for _ in range(20)])
                ids_a = await new.enqueue_many([EnqueueRequest("up.a") for _ in range(20)])

                async def old_done() -> bool:
                    return (await statuses(conn, ids_a))["succeeded"] == 20

                await wait_for(old_done, 10, "the old pod to run up.a")
                await asyncio.sleep(3 * old.settings.heartbeat_interval)
                assert await statuses(conn, ids_b) == {"pending": 20}
                assert await conn.fetchval("SELECT max(attempt) FROM tasks WHERE id = ANY ($1)", ids_b) == 0
                assert await conn.fetchval("SELECT count(*) FROM task_attempts") == 0
                assert await parked(conn, ids_b) == 20
                unserved = (await old.stats())["unserved"]
                assert unserved == [
                    {
                        "handler": "up.b",
                        "queue": "upq",
                        "tasks": 20,
                        "message": "no active worker serves handler 'up.b' in queue 'upq'; served: up.a",
                    }
                ]
                loop = asyncio.get_running_loop()
                async with RunningWorker(new, queues=["default", "upq"]):
                    t0 = loop.time()

                    async def b_done() -> bool:
                        return (await statuses(conn, ids_b))["succeeded"] == 20

                    await wait_for(b_done, 10, "the new pod to run the parked up.b")
                    took_parked = loop.time() - t0
                    t1 = loop.time()
                    late = await new.enqueue("up.b")

                    async def late_done() -> bool:
                        return (await statuses(conn, [late]))["succeeded"] == 1

                    await wait_for(late_done, 10, "a later up.b to run")
                    took_late = loop.time() - t1
                # Rolled back: the new pod left, gracefully; its handler's tasks wait again.
                back = await new.enqueue_many([EnqueueRequest("up.b") for _ in range(3)])

                async def back_parked() -> bool:
                    return await parked(conn, back) == 3

                await wait_for(back_parked, 5, "up.b to be parked after the rollback")
        finally:
            await conn.close()
            await old.close()
            await new.close()
        print(
            f"\n[served] parked up.b ran {took_parked * 1000:.0f} ms after the new pod registered;"
            f" a later one {took_late * 1000:.0f} ms after its enqueue (new pod's heartbeat: 5 s)"
        )
        assert took_parked < 2.0 and took_late < 1.0
        assert all(pod == "new-pod" for h, _, pod in ran if h == "up.b")
        assert Counter(h for h, _, _ in ran) == {"up.a": 20, "up.b": 21}

    async def test_a_handler_registered_while_running_is_served(self, app: App, db_url: str) -> None:
        """A handler added to a running worker's app is recorded at its next claim and its parked tasks
        run; one removed between a claim and its start is handed back (attempt returned), never failed."""
        app.strict_handlers = False
        app.register("live.a", returns("a"))
        conn = await connect(db_url)
        try:
            async with RunningWorker(app) as worker:
                tid = await app.enqueue("live.b", {})

                async def parked() -> bool:
                    return bool(await conn.fetchval("SELECT parked FROM tasks WHERE id = $1", tid))

                await wait_for(parked, 5, "live.b to be parked")
                app.register("live.b", returns("b"))
                await app.enqueue("live.a", {})  # wakes the claim loop, which sees the new handler
                await wait_for(lambda: _status_is(app, tid, "succeeded"), 10, "live.b to run once registered")

                # A handler removed after its task was claimed and before it started.
                original = worker._start
                removed: list[int] = []

                def start_then_unregister(r: Any, wid: uuid.UUID) -> None:
                    if r["handler"] == "live.c" and not removed:
                        removed.append(r["id"])
                        app.unregister("live.c")
                    original(r, wid)

                worker._start = start_then_unregister  # type: ignore[method-assign]
                app.register("live.c", returns("c"))
                gone = await app.enqueue("live.c", {})

                async def handed_back() -> bool:
                    return "released" in [e["kind"] for e in await app.get_events(gone)]

                await wait_for(handed_back, 10, "live.c to be handed back")
                rec = await app.get_task(gone)
                assert (rec.status, rec.attempts_spent, rec.error) == ("pending", 0, None)  # uncharged
                app.register("live.c", returns("c again"))
                await app.enqueue("live.a", {})  # the next claim records it again
                await wait_for(lambda: _status_is(app, gone, "succeeded"), 10, "live.c to run at last")
        finally:
            await conn.close()
        assert (await app.get_task(gone)).result == "c again"


async def _status_is(app: App, tid: int, status: str) -> bool:
    return (await app.get_task(tid)).status == status


class TestClusterConcurrency:
    async def test_a_pod_whose_code_has_no_limit_obeys_the_database(self, app: App, db_url: str) -> None:
        """One pod declares cluster_concurrency=2, another has the handler without it: together they
        never run more than 2; the smallest live declaration wins, and lapses when its pod leaves."""
        intervals: list[tuple[float, float]] = []
        strict = new_app(db_url, "strict-pod")
        loose = new_app(db_url, "loose-pod")
        looser = new_app(db_url, "looser-pod")

        async def body(ctx: TaskContext) -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.sleep(0.05)
            intervals.append((start, loop.time()))

        strict.register("scarce", body, cluster_concurrency=2)
        loose.register("scarce", body)
        looser.register("scarce", body, cluster_concurrency=5)
        ids = await strict.enqueue_many([EnqueueRequest("scarce") for _ in range(30)])
        first = RunningWorker(strict, concurrency=10)
        await first.__aenter__()
        try:
            async with RunningWorker(loose, concurrency=10), RunningWorker(looser, concurrency=10):
                for tid in ids:
                    await wait_for(lambda t=tid: _status_is(strict, t, "succeeded"), 30, f"task {tid}")
                points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
                now = peak = 0
                for _, d in points:
                    now += d
                    peak = max(peak, now)
                assert len(intervals) == 30 and peak == 2, peak
                assert [dict(r) for r in await loose.store.run("handler_options", ["scarce"])] == [
                    {
                        "name": "scarce", "queue": None, "priority": None, "timeout_s": None,
                        "max_attempts": None, "retry_delay_s": None, "retry_backoff": None,
                        "max_retry_delay_s": None, "cluster_concurrency": 2,
                    }
                ]  # fmt: skip
                await first.__aexit__()

                async def lapsed() -> bool:
                    rows = await loose.store.run("handler_options", ["scarce"])
                    return bool(rows[0]["cluster_concurrency"] == 5)

                # strict-pod left: the smallest live declaration is looser-pod's.
                await wait_for(lapsed, 10, "strict-pod's limit to lapse")
        finally:
            if first.task is not None and not first.task.done():
                await first.__aexit__()
            for a in (strict, loose, looser):
                await a.close()


class TestEnteringWithoutTheHandler:
    async def test_task_object_and_cron_tick_for_a_handler_this_pod_lacks(
        self, app: App, db_url: str
    ) -> None:
        """A Task object and a CronJobLock tick naming a handler the operator's pod lacks are
        accepted with the options its registration stored (queue, timeout, attempts), wait until a
        worker that has it runs them, and are never failed; app.enqueue still refuses it."""
        remote = new_app(db_url, "remote-pod", queues=("rq",))
        remote.register("remote.h", returns("done"), queue="rq", timeout=77, max_attempts=4)
        try:
            await self._check(app, remote)
        finally:
            await remote.close()

    async def _check(self, app: App, remote: App) -> None:
        async with RunningWorker(remote):
            pass  # registered once: its options are in the database
        operator_app = app  # the pod running the operator and the scheduler has no handler at all
        with pytest.raises(UnknownHandler):
            await operator_app.enqueue("remote.h", {})
        ctx = opcontext.OperatorContext(app=operator_app, store=operator_app.store, kube=None)  # type: ignore[arg-type]
        from_cr = await k8s_handlers.ingest(ctx, "uid-1", "ns", "t1", {"handler": "remote.h", "payload": {}})
        await cron.upsert_schedule(
            operator_app.store,
            cron.ScheduleSpec(name="ns/every", cron="* * * * *", handler="remote.h", queue="rq",
                              concurrency_policy="Allow", cr_uid="cr-1"),
        )  # fmt: skip
        tick = await cron.trigger(operator_app, "ns/every")
        assert tick.outcome == "enqueued", tick
        assert tick.task_id is not None
        for tid in (from_cr, tick.task_id):
            rec = await operator_app.get_task(tid)
            assert (rec.status, rec.queue, rec.timeout, rec.max_attempts) == ("pending", "rq", 77, 4)
        async with RunningWorker(remote):
            for tid in (from_cr, tick.task_id):
                await wait_for(lambda t=tid: _status_is(operator_app, t, "succeeded"), 10, f"task {tid}")


class TestReports:
    async def test_stats_cli_and_metric_name_the_unserved_pair(self, app: App, db_url: str) -> None:
        """`kubetasks stats` and the kubetasks_unserved_tasks{handler,queue} gauge show the parked
        pair with the same words as a Task's status."""
        app.strict_handlers = False
        app.register("rep.known", returns(None))
        why = "no active worker serves handler 'rep.typo' in queue 'default'; served: rep.known"
        async with RunningWorker(app) as worker:
            ids = await app.enqueue_many([EnqueueRequest("rep.typo") for _ in range(3)])

            async def parked() -> bool:
                return (await app.stats())["unserved"] == [
                    {"handler": "rep.typo", "queue": "default", "tasks": 3, "message": why}
                ]

            await wait_for(parked, 5, "the unserved pair to be reported")
            q = metrics.QueueStats()
            await q.refresh(app.store)
            text = generate_latest(metrics.registry_for(metrics.WorkerCollector(worker, q))).decode()
            assert 'kubetasks_unserved_tasks{handler="rep.typo",queue="default"} 3.0' in text
            env = dict(os.environ, KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT), COLUMNS="250")
            res = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "kubetasks", "stats"],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert "Pending tasks no active worker serves" in res.stdout, res.stdout
            assert why in res.stdout, res.stdout
        assert [(await app.get_task(t)).status for t in ids] == ["pending"] * 3

    async def test_keda_query_counts_parked_tasks_of_known_handlers_only(self, app: App, db_url: str) -> None:
        """The chart's KEDA query, run against the database: a Deployment scaled to zero still wakes
        for its own handlers' parked tasks, never for a typo'd handler's."""
        from tests.packaging.test_chart_render import one, render

        so = one(render(keda__enabled="true"), "ScaledObject")
        query = so["spec"]["triggers"][0]["metadata"]["query"]
        conn = await connect(db_url)
        try:
            gone = uuid.uuid4()  # a pod of this Deployment that registered k.own, then scaled away
            await conn.fetchrow(
                "SELECT * FROM register_worker($1, 'gone', 'h', 1, ARRAY['default'], 5, 60)", gone
            )
            await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['k.own'], '{}', '[]', 1000)", gone)
            await conn.execute("SELECT release_pod('gone', 'scaled to zero')")
            await conn.execute(
                "INSERT INTO tasks (handler, queue) SELECT h, 'default' "
                "FROM unnest(ARRAY['k.own', 'k.own', 'k.own', 'k.typo', 'k.typo']) AS h"
            )
            assert await conn.fetchval(query) == 5
            await conn.fetchrow("SELECT * FROM park_unserved('{}', 0, true, 1000)")
            assert await conn.fetchval("SELECT count(*) FROM tasks WHERE parked") == 5
            assert await conn.fetchval(query) == 3
        finally:
            await conn.close()
