"""The claim reads what a worker serves from the database, and all its queues in one statement.

A worker's served handlers are rows (``worker_handlers``, migration 0020), kept from its
``workers`` row by a trigger; the claim probes them for each task it reads, the parking pass
for each pending (queue, handler). Against a real PostgreSQL: a worker serving 10,000
handlers never takes a task of a handler it does not serve, even ahead of its own in claim
order; what it serves changes, or ends with it, at once; one statement reads its queues in
order, skipping a paused one and locking nothing beyond what it takes, and nothing at all
once its lease ran out; a worker of a hundred queues claims with one statement, not one per
queue; and the pass's served test agrees with ``served_pairs`` while reading a small
fraction of the rows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest

from kubetasks import App, TaskContext
from tests.integration.helpers import RunningWorker, wait_for


async def connect(db_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})


async def register(
    conn: asyncpg.Connection, pod: str, queues: list[str], handlers: list[str] | None
) -> uuid.UUID:
    """A worker as a process registers it (no process behind it); ``handlers`` None: a worker of
    an earlier version, which records none and serves every handler of its queues."""
    wid = uuid.uuid4()
    await conn.fetchrow("SELECT * FROM register_worker($1, $2, 'h', 1, $3::text[], 50, 60)", wid, pod, queues)
    if handlers is not None:
        await conn.fetchrow("SELECT * FROM worker_serves($1, $2::text[], '{}', '[]', 1000)", wid, handlers)
    return wid


async def served_rows(conn: asyncpg.Connection, wid: uuid.UUID) -> set[str]:
    return {
        r["handler"]
        for r in await conn.fetch("SELECT handler FROM worker_handlers WHERE worker_id = $1", wid)
    }


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(plan_nodes(child))
    return out


class TestServedOnly:
    async def test_a_worker_of_ten_thousand_handlers_takes_none_it_does_not_serve(
        self, app: App, db_url: str
    ) -> None:
        """Worker A serves 10,000 handlers over 100 queues; worker B serves `other`; `ghost` has
        no worker and no pass has parked it yet. Both sit ahead of A's tasks in claim order in
        every queue (higher priority). A drains exactly its own 500 tasks, queue by queue in its
        order; B exactly its 300; nobody takes `ghost`. Then A stops serving h5 (its app changed):
        a new h5 task is left to others while a new h6 task is taken; and once A is stopping,
        its rows are gone and it claims nothing."""
        claim = app.store.queries["claim"].sql
        queues = [f"q{i}" for i in range(100)]
        handlers = [f"h{i}" for i in range(10_000)]
        conn = await connect(db_url)
        try:
            a = await register(conn, "pod-a", queues, handlers)
            b = await register(conn, "pod-b", queues, ["other"])
            assert len(await served_rows(conn, a)) == 10_000
            await conn.execute(
                "INSERT INTO tasks (handler, queue, priority, payload) "
                "SELECT 'h' || (q * 100 + k), 'q' || q, 0, '{}'::jsonb "
                "FROM generate_series(0, 99) q, generate_series(0, 4) k"
            )
            await conn.execute(
                "INSERT INTO tasks (handler, queue, priority, payload) "
                "SELECT 'other', 'q' || q, 10, '{}'::jsonb "
                "FROM generate_series(0, 99) q, generate_series(1, 3)"
            )
            await conn.execute(
                "INSERT INTO tasks (handler, queue, priority, payload) "
                "SELECT 'ghost', 'q' || q, 20, '{}'::jsonb FROM generate_series(0, 99) q"
            )
            await conn.execute("ANALYZE tasks")
            rounds: list[list[tuple[str, str]]] = []
            while rows := await conn.fetch(claim, a, "pod-a", queues, 50, [], [], [], [], [], [], []):
                rounds.append([(r["queue"], r["handler"]) for r in rows if r["claimed"]])
            got_b: list[tuple[str, str]] = []
            while rows := await conn.fetch(claim, b, "pod-b", queues, 50, [], [], [], [], [], [], []):
                got_b += [(r["queue"], r["handler"]) for r in rows if r["claimed"]]
            ghost_left = await conn.fetchval(
                "SELECT count(*) FROM tasks WHERE handler = 'ghost' AND status = 'pending'"
            )

            await conn.fetchrow(
                "SELECT * FROM worker_serves($1, $2::text[], '{}', '[]', 1000)",
                a,
                [h for h in handlers if h != "h5"],
            )
            assert "h5" not in await served_rows(conn, a)
            await conn.execute(
                "INSERT INTO tasks (handler, queue, priority, payload) "
                "VALUES ('h5', 'q0', 5, '{}'), ('h6', 'q0', 0, '{}')"
            )
            after_change = [
                r["handler"]
                for r in await conn.fetch(claim, a, "pod-a", queues, 50, [], [], [], [], [], [], [])
            ]

            await conn.execute("UPDATE workers SET status = 'stopping' WHERE worker_id = $1", a)
            rows_when_stopping = await served_rows(conn, a)
            await conn.execute("INSERT INTO tasks (handler, queue, payload) VALUES ('h7', 'q0', '{}')")
            when_stopping = await conn.fetch(claim, a, "pod-a", queues, 50, [], [], [], [], [], [], [])
        finally:
            await conn.close()
        got_a = [pair for r in rounds for pair in r]
        assert Counter(h for _, h in got_a) == Counter(
            {f"h{q * 100 + k}": 1 for q in range(100) for k in range(5)}
        )
        # Each claim's queues all come before the next claim's: the worker's order.
        spans = [(min(int(q[1:]) for q, _ in r), max(int(q[1:]) for q, _ in r)) for r in rounds]
        assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans)), spans
        assert Counter(got_b) == Counter({(q, "other"): 3 for q in queues})
        assert ghost_left == 100
        assert after_change == ["h6"]
        assert rows_when_stopping == set() and when_stopping == []

    async def test_served_rows_follow_the_worker_row(self, app: App, db_url: str) -> None:
        """The rows are what workers.handlers says while the worker is active, and none once it
        is not: changed, superseded (its pod restarted), reaped (its lease ran out), stopped."""
        conn = await connect(db_url)
        try:
            w1 = await register(conn, "pod-x", ["default"], ["a", "b", "b"])
            first = await served_rows(conn, w1)
            await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['b', 'c'], '{}', '[]', 1000)", w1)
            changed = await served_rows(conn, w1)
            w2 = await register(conn, "pod-x", ["default"], ["a"])  # the same pod slot: w1 is superseded
            superseded = await served_rows(conn, w1), await served_rows(conn, w2)
            await conn.execute(
                "UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE worker_id = $1", w2
            )
            await conn.fetch("SELECT * FROM reap_expired_workers()")
            reaped = await served_rows(conn, w2)
            w3 = await register(conn, "pod-y", ["default"], ["z"])
            await conn.fetchval("SELECT stop_worker($1, 'dead', 'test')", w3)
            stopped = await served_rows(conn, w3)
            total = await conn.fetchval("SELECT count(*) FROM worker_handlers")
        finally:
            await conn.close()
        assert first == {"a", "b"} and changed == {"b", "c"}
        assert superseded == (set(), {"a"})
        assert reaped == set() and stopped == set() and total == 0


class TestOneStatement:
    async def test_queues_in_order_a_paused_one_skipped_nothing_locked_beyond_the_take(
        self, app: App, db_url: str
    ) -> None:
        """Queues [qa, qb, qc], qa paused: a claim of 5 takes qb's 3 and 2 of qc's 10; while its
        transaction is open, qa's tasks and qc's other 8 can be locked by anyone else (NOWAIT), so
        the paused queue and the rows past the take were never locked."""
        claim = app.store.queries["claim"].sql
        conn = await connect(db_url)
        other = await connect(db_url)
        try:
            wid = await register(conn, "pod-o", ["qa", "qb", "qc"], ["solo"])
            for q, n in (("qa", 4), ("qb", 3), ("qc", 10)):
                await conn.execute(
                    "INSERT INTO tasks (handler, queue, payload) "
                    "SELECT 'solo', $1, '{}' FROM generate_series(1, $2)",
                    q,
                    n,
                )
            await conn.execute("INSERT INTO queue_state (queue, paused) VALUES ('qa', true)")
            tx = conn.transaction()
            await tx.start()
            try:
                rows = await conn.fetch(
                    claim, wid, "pod-o", ["qa", "qb", "qc"], 5, [], [], [], [], [], [], []
                )
                taken = [r["id"] for r in rows]
                # Any row the claim locked without taking would raise here (lock not available).
                free = await other.fetch(
                    "SELECT id, queue FROM tasks WHERE status = 'pending' AND NOT (id = ANY ($1)) "
                    "FOR UPDATE NOWAIT",
                    taken,
                )
            finally:
                await tx.rollback()
        finally:
            await conn.close()
            await other.close()
        assert Counter(r["queue"] for r in rows) == Counter({"qb": 3, "qc": 2})
        assert Counter(r["queue"] for r in free) == Counter({"qa": 4, "qc": 8})

    async def test_a_worker_whose_lease_ran_out_locks_no_task(self, app: App, db_url: str) -> None:
        """The lease check comes before any task row is read: a worker whose lease ran out (not
        yet reaped) claims nothing across its queues and, while its statement's transaction is
        open, every pending task can be locked by anyone else; its own row is held FOR KEY
        SHARE, so a reaper declaring it dead waits for that transaction."""
        claim = app.store.queries["claim"].sql
        conn = await connect(db_url)
        other = await connect(db_url)
        try:
            wid = await register(conn, "pod-l", ["qa", "qb"], ["solo"])
            await conn.execute(
                "INSERT INTO tasks (handler, queue, payload) "
                "SELECT 'solo', q, '{}' FROM unnest(ARRAY['qa', 'qb']) q, generate_series(1, 5)"
            )
            await conn.execute(
                "UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE worker_id = $1", wid
            )
            tx = conn.transaction()
            await tx.start()
            try:
                rows = await conn.fetch(claim, wid, "pod-l", ["qa", "qb"], 10, [], [], [], [], [], [], [])
                free = await other.fetch("SELECT id FROM tasks WHERE status = 'pending' FOR UPDATE NOWAIT")
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await other.execute("SELECT 1 FROM workers WHERE worker_id = $1 FOR UPDATE NOWAIT", wid)
            finally:
                await tx.rollback()
        finally:
            await conn.close()
            await other.close()
        assert rows == [] and len(free) == 10

    async def test_a_worker_of_a_hundred_queues_claims_with_one_statement(self, app: App) -> None:
        """A worker serving 100 queues, the only task in the last: one statement reads them all
        (the claim loop sent one per queue: 100 each time it looked)."""
        ran = asyncio.Event()

        @app.task("solo")
        async def solo(ctx: TaskContext) -> None:
            ran.set()

        queues = [f"q{i}" for i in range(100)]
        tid = await app.enqueue("solo", {}, queue="q99")
        async with RunningWorker(app, concurrency=5, queues=queues) as worker:
            await asyncio.wait_for(ran.wait(), 20)

            async def done() -> bool:
                return (await app.get_task(tid)).status == "succeeded"

            await wait_for(done, 20, "the task to succeed")
            statements = worker.stats.claim_batches
        print(f"\n[claim] claim statements for one task in the last of 100 queues: {statements}")
        # One per wake-up (start, the enqueue, the freed slot, a heartbeat's poll or two).
        assert statements <= 10, statements


class TestParkingPass:
    async def test_served_test_agrees_with_served_pairs_and_reads_a_fraction_of_its_rows(
        self, app: App, db_url: str
    ) -> None:
        """Two workers serve 10,000 handlers over 100 queues, one of an earlier version serves all
        of `legacy`, one stopping worker serves `gone.h`, one serves `x` in `qx` only. For every
        pending pair, pending_pairs_served says served exactly when served_pairs lists it; and no
        step of it emits more than a few rows per pair, where served_pairs expands every active
        worker's queues times handlers (2,000,000 rows here)."""
        queues = [f"q{i}" for i in range(100)]
        handlers = [f"h{i}" for i in range(10_000)]
        conn = await connect(db_url)
        try:
            await register(conn, "pod-1", queues, handlers)
            await register(conn, "pod-2", queues, handlers)
            await register(conn, "pod-old", ["legacy"], None)
            gone = await register(conn, "pod-gone", ["q1"], ["gone.h"])
            await conn.execute("UPDATE workers SET status = 'stopping' WHERE worker_id = $1", gone)
            await register(conn, "pod-x", ["qx"], ["x"])
            await conn.execute(
                "INSERT INTO tasks (handler, queue, payload) "
                "SELECT 'h' || i, 'q' || (i % 100), '{}'::jsonb FROM generate_series(0, 9999) i"
            )
            await conn.execute(
                "INSERT INTO tasks (handler, queue, payload, parked) VALUES "
                "('nobody', 'q0', '{}', false), ('anything', 'legacy', '{}', false), "
                "('x', 'qx', '{}', true), ('x', 'qy', '{}', false), ('gone.h', 'q1', '{}', false), "
                "('h1', 'q2', '{}', true)"
            )
            await conn.execute("ANALYZE")
            mine = {
                (r["queue"], r["handler"], r["parked"]): r["served"]
                for r in await conn.fetch("SELECT queue, handler, parked, served FROM pending_pairs_served")
            }
            pairs = {(q, h) for q, h, _ in mine}
            listed = {
                (r["queue"], r["handler"])
                for r in await conn.fetch("SELECT queue, handler FROM served_pairs")
            }
            expected = {(q, h, p): (q, h) in listed or (q, None) in listed for q, h, p in mine}

            async def max_rows(sql: str) -> int:
                raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
                plan = json.loads(raw)[0]["Plan"]
                return max(int(n["Actual Rows"]) * int(n.get("Actual Loops", 1)) for n in plan_nodes(plan))

            new = await max_rows("SELECT count(*) FILTER (WHERE served) FROM pending_pairs_served")
            old = await max_rows(
                "SELECT count(*) FILTER (WHERE sh.queue IS NOT NULL OR sq.queue IS NOT NULL) "
                "FROM pending_pairs pp "
                "LEFT JOIN (SELECT s.queue, s.handler FROM served_pairs s WHERE s.handler IS NOT NULL) sh "
                "ON sh.queue = pp.queue AND sh.handler = pp.handler "
                "LEFT JOIN (SELECT DISTINCT s.queue FROM served_pairs s WHERE s.handler IS NULL) sq "
                "ON sq.queue = pp.queue"
            )
        finally:
            await conn.close()
        print(
            f"\n[served] {len(pairs):,} pending pairs: at most {new:,} rows in any step "
            f"(served_pairs: {old:,})"
        )
        assert mine == expected
        assert mine[("q0", "nobody", False)] is False and mine[("legacy", "anything", False)] is True
        assert mine[("qx", "x", True)] is True and mine[("qy", "x", False)] is False
        assert mine[("q1", "gone.h", False)] is False and mine[("q2", "h1", True)] is True
        assert new <= 3 * len(pairs), new
        assert old >= 2_000_000, old
