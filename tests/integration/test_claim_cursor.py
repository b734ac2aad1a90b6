"""The claim from the worker's cursor stays cheap while a long transaction holds the
xmin horizon, and the full claim still finds what lands behind the cursor (issue 18 item 2)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from kubetasks import App, EnqueueRequest, TaskContext
from kubetasks.worker import FULL_CLAIM_FACTOR, FULL_CLAIM_MIN_S, Worker
from tests.integration.helpers import RunningWorker, start_worker, stop, wait_for
from tests.support import connect, explain_claim

N = 20_000


def _walk(node: dict[str, Any], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out.append(node)
    for child in node.get("Plans", []):
        _walk(child, out)
    return out


def _buffers(node: dict[str, Any]) -> int:
    return int(node.get("Shared Hit Blocks", 0)) + int(node.get("Shared Read Blocks", 0))


async def _explain(conn: asyncpg.Connection, *args: object) -> dict[str, Any]:
    """The plan the claim ran with ``args`` (its cached generic plan), rolled back."""
    tx = conn.transaction()
    await tx.start()
    try:
        return await explain_claim(conn, *args)
    finally:
        await tx.rollback()  # the claim really claimed: undo it


async def test_claim_from_the_cursor_reads_a_bounded_range_under_a_held_snapshot(
    app: App, db_url: str
) -> None:
    """20,000 tasks claimed and finished while a REPEATABLE READ transaction holds its snapshot:
    their index entries stay (recently dead, not killable). The full claim visits every one of
    them; from the cursor (the last of them) the claim starts at its boundary, an Index Cond,
    and reads a few buffers. Fails on a claim that reads each queue from its start."""
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    holder = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        await conn.execute(
            f"INSERT INTO tasks (handler, queue, payload) "
            f"SELECT 'h', 'default', '{{}}'::jsonb FROM generate_series(1, {N + 100})"
        )
        await conn.execute("ANALYZE tasks")
        wid = uuid.uuid4()
        await conn.fetchrow(
            "SELECT * FROM register_worker($1, 'cur-pod', 'h', 1, ARRAY['default'], 50, 30)", wid
        )
        await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['h'], '{}', '[]', 1000)", wid)
        # The analytics query: its snapshot holds the horizon from here on.
        long_tx = holder.transaction(isolation="repeatable_read")
        await long_tx.start()
        assert await holder.fetchval("SELECT count(*) FROM tasks") == N + 100
        claim = app.store.queries["claim"].sql
        last: asyncpg.Record | None = None
        for _ in range(N // 1000):
            cursor = ([last["priority"]], [last["run_at"]], [last["id"]]) if last else ([], [], [])
            rows = await conn.fetch(claim, wid, "cur-pod", ["default"], 1000, [], [], [], [], *cursor)
            rows = [r for r in rows if r["claimed"]]
            assert len(rows) == 1000
            last = max(rows, key=lambda r: (-r["priority"], r["run_at"], r["id"]))
            await conn.execute(
                "UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = ANY ($1::bigint[])",
                [r["id"] for r in rows],
            )
        assert last is not None
        # Read the dead region a few times: nothing may mark those entries dead meanwhile.
        for _ in range(2):
            await conn.fetch(
                "SELECT id FROM tasks WHERE status = 'pending' AND NOT parked AND queue = 'default' "
                "ORDER BY priority DESC, run_at, id LIMIT 1"
            )
        # Ten running, whose successes the claim below writes (as a busy worker's does).
        running = [
            r
            for r in await conn.fetch(claim, wid, "cur-pod", ["default"], 10, [], [], [], [], [], [], [])
            if r["claimed"]
        ]
        await conn.execute("ANALYZE tasks")
        ok = ([r["id"] for r in running], [r["attempt"] for r in running], ["{}"] * len(running))
        args = (wid, "cur-pod", ["default"], 10, [])
        full = await _explain(conn, *args, *ok, [None], [None], [None])
        cur = await _explain(conn, *args, *ok, [last["priority"]], [last["run_at"]], [last["id"]])
    finally:
        await holder.close()
        await conn.close()

    def scanned(plan: dict[str, Any]) -> int:
        """Buffers read by the scans of the pending index (heap visits included)."""
        return sum(
            _buffers(n) for n in _walk(plan["Plan"], []) if n.get("Index Name") == "tasks_pending_claim"
        )

    full_buf, cur_buf = scanned(full), scanned(cur)
    print(f"\n[cursor] under a held snapshot after {N} claimed, a claim of 10: full claim "
          f"{full['Execution Time']:.2f} ms, {full_buf} buffers in the pending index scan; from the cursor "
          f"{cur['Execution Time']:.2f} ms, {cur_buf} buffers")  # fmt: skip
    nodes = _walk(cur["Plan"], [])
    bounded = [n for n in nodes if n.get("Index Name") == "tasks_pending_claim" and n["Actual Rows"]]
    # The boundary is where the scan starts (Index Cond), not a filter on a walk from the start.
    assert bounded and all("ROW(run_at, id) > ROW(" in str(n.get("Index Cond")) for n in bounded), bounded
    limit = next(n for n in nodes if n["Node Type"] == "Limit")
    assert limit["Actual Rows"] == 10
    # The ten successes are written by primary key: the index of running tasks keeps an entry
    # for each of the 20,000 this worker ran (unkillable while the snapshot is held).
    done = next(n for n in nodes if n.get("Subplan Name") == "CTE done")
    assert done["Actual Rows"] == 10, done
    found = [n for n in _walk(done, []) if n.get("Relation Name") == "tasks" and "Scan" in n["Node Type"]]
    assert [n.get("Index Name") for n in found] == ["tasks_pkey"], found
    assert _buffers(found[0]) <= 80, found  # a few per id, not one per task run since the snapshot
    # The full claim pays for the 20,000 dead entries (their heap pages: 100-odd tuples a page);
    # from the cursor, a few buffers per task taken, however many were claimed before it.
    assert full_buf > 150, full_buf
    assert cur_buf <= 40, cur_buf


def _behind_bound(worker: Worker) -> float:
    """How long a task behind a cursor may wait for the next full claim (module docstring of
    kubetasks.worker), plus that claim, plus 1 s for a shared 2-core machine."""
    took = worker.stats.full_claim_max_s
    return max(FULL_CLAIM_MIN_S, FULL_CLAIM_FACTOR * took) + took + 1.0


async def _pending(db_url: str, handler: str) -> int:
    conn = await connect(db_url)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM kubetasks.tasks WHERE handler = $1 AND status = 'pending'", handler
        )
    finally:
        await conn.close()
    return int(n)


async def test_a_higher_priority_task_behind_the_cursor_starts_within_the_bound(
    app: App, db_url: str
) -> None:
    """A busy worker reads from its cursor in the low-priority backlog; a priority-10 task enqueued
    then lands behind it. It still starts within the stated bound, long before the backlog is
    drained (fails when only the cursor is read while there is work ahead of it)."""
    ran: list[int] = []

    async def low(ctx: TaskContext) -> None:
        await asyncio.sleep(0.01)

    async def urgent(ctx: TaskContext) -> None:
        ran.append(ctx.id)

    app.register("cur.low", low)
    app.register("cur.urgent", urgent)
    await app.enqueue_many([EnqueueRequest("cur.low", {}) for _ in range(4000)])
    async with RunningWorker(app, concurrency=10) as worker:
        await wait_for(
            lambda: _true(worker.stats.claim_batches > worker.stats.full_claims + 20), 30, "cursor claims"
        )
        tid = await app.enqueue("cur.urgent", {}, priority=10)
        await wait_for(lambda: _true(bool(ran)), 60, "the urgent task")
        left = await _pending(db_url, "cur.low")
        rec = await app.get_task(tid)
        stats = worker.stats
    assert rec.started_at is not None
    waited = (rec.started_at - rec.created_at).total_seconds()
    bound = _behind_bound(worker)
    print(f"\n[cursor] urgent task behind the cursor started after {waited:.3f} s (bound {bound:.3f} s); "
          f"{left} low tasks pending; {stats.full_claims} full of {stats.claim_batches} claims")  # fmt: skip
    assert waited <= bound, (waited, bound)
    assert left > 1000, left  # it did not wait for the backlog
    assert stats.full_claims < stats.claim_batches  # the cursor was read in between


async def test_tasks_of_a_sigkilled_worker_run_on_a_busy_worker_past_them(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """A worker process runs five priority-5 tasks and is SIGKILLed; its lease expires and the live
    worker reaps them, put back pending (run_at: the reap): behind the cursor of that worker, busy
    in a priority-0 backlog. They run again within the bound after the reap, long before the
    backlog is drained (fails when only the cursor is read while there is work ahead of it)."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    proc = start_worker(db_url, pod="doomed", sidelog=sidelog, concurrency=5, log_path=tmp_path / "w.log")
    try:
        victims = await app.enqueue_many(
            [EnqueueRequest("side.sleep", {"s": 60}, priority=5) for _ in range(5)]
        )

        async def all_running() -> bool:
            return [(await app.get_task(t)).status for t in victims] == ["running"] * 5

        await wait_for(all_running, 60, "the doomed worker running its five tasks")
        await app.enqueue_many([EnqueueRequest("side.work", {}) for _ in range(4000)])
        rerun: dict[int, int] = {}

        async def work(ctx: TaskContext) -> None:
            await asyncio.sleep(0.05)  # the backlog lasts ~20 s: longer than the lease to expire

        async def sleep(ctx: TaskContext) -> None:
            rerun[ctx.id] = ctx.attempt

        app.register("side.work", work)
        app.register("side.sleep", sleep)
        async with RunningWorker(app, concurrency=10) as worker:
            await wait_for(
                lambda: _true(worker.stats.claim_batches > worker.stats.full_claims + 20), 30, "cursor claims"
            )
            stop(proc, signal.SIGKILL)
            await wait_for(lambda: _true(len(rerun) == 5), 60, "the five tasks run again")
            left = await _pending(db_url, "side.work")
            stats = worker.stats
    finally:
        stop(proc, signal.SIGKILL)
    print(f"\n[cursor] the SIGKILLed worker's tasks ran again with {left} backlog tasks pending; "
          f"{stats.full_claims} full of {stats.claim_batches} claims")  # fmt: skip
    assert sorted(rerun) == sorted(victims) and set(rerun.values()) == {2}, rerun
    assert left > 1000, left
    bound = _behind_bound(worker)
    for t in victims:
        rec = await app.get_task(t)
        assert rec.status == "succeeded" and rec.started_at is not None
        waited = (rec.started_at - rec.run_at).total_seconds()  # run_at: when it was put back
        assert waited <= bound, (waited, bound)


async def test_no_task_lost_or_run_twice_with_both_claim_forms(app: App, db_url: str) -> None:
    """Two workers drain 6,000 tasks enqueued in waves of mixed priorities and run_ats in the
    past (so that many land behind the cursors), claiming from their cursors and from the start:
    every task runs once, on attempt 1, and succeeds; both forms were used."""
    runs: Counter[int] = Counter()

    async def mixed(ctx: TaskContext) -> None:
        runs[ctx.id] += 1
        await asyncio.sleep(0.002)

    app.register("cur.mixed", mixed)
    ids: list[int] = []
    past = await app.store.run("db_now") - timedelta(seconds=30)
    async with RunningWorker(app, concurrency=10) as w1, RunningWorker(app, concurrency=10) as w2:
        for wave in range(6):
            ids += await app.enqueue_many(
                [
                    EnqueueRequest(
                        "cur.mixed", {}, priority=(i + wave) % 4, run_at=past if i % 7 == 0 else None
                    )
                    for i in range(1000)
                ]
            )
            await asyncio.sleep(0.3)

        async def drained() -> bool:
            return len(runs) == len(ids)

        await wait_for(drained, 120, "every task run")
        stats = [w1.stats, w2.stats]
    conn = await connect(db_url)
    try:
        rows = await conn.fetch("SELECT status, attempt, count(*) AS n FROM kubetasks.tasks "
                                "WHERE id = ANY($1) GROUP BY 1, 2", ids)  # fmt: skip
    finally:
        await conn.close()
    assert {(r["status"], r["attempt"]): r["n"] for r in rows} == {("succeeded", 1): len(ids)}
    assert set(runs) == set(ids) and set(runs.values()) == {1}
    assert all(0 < s.full_claims < s.claim_batches for s in stats), [
        (s.full_claims, s.claim_batches) for s in stats
    ]


async def _true(v: bool) -> bool:
    return v
