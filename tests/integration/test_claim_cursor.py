"""The claim from the worker's cursor (claim_from) stays cheap while a long transaction holds the
xmin horizon, and the full claim still finds what lands behind the cursor (issue 18 item 2)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from kubetasks import App

N = 20_000


def _walk(node: dict[str, Any], out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out.append(node)
    for child in node.get("Plans", []):
        _walk(child, out)
    return out


def _buffers(node: dict[str, Any]) -> int:
    return int(node.get("Shared Hit Blocks", 0)) + int(node.get("Shared Read Blocks", 0))


async def _explain(conn: asyncpg.Connection, sql: str, *args: object) -> dict[str, Any]:
    tx = conn.transaction()
    await tx.start()
    try:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
    finally:
        await tx.rollback()  # EXPLAIN ANALYZE really claimed: undo it
    plan: dict[str, Any] = json.loads(rows[0][0])[0]
    return plan


async def test_claim_from_cursor_reads_a_bounded_range_under_a_held_snapshot(app: App, db_url: str) -> None:
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
        claim_from = app.store.queries["claim_from"].sql
        last: asyncpg.Record | None = None
        for _ in range(N // 1000):
            rows = await conn.fetch(claim_from if last else claim, wid, "cur-pod", ["default"], 1000, [], [], [], [],
                                    *(([last["priority"]], [last["run_at"]], [last["id"]]) if last else ()))  # fmt: skip
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
            await conn.fetch("SELECT id FROM tasks WHERE status = 'pending' AND NOT parked AND queue = 'default' "
                             "ORDER BY priority DESC, run_at, id LIMIT 1")  # fmt: skip
        args = (wid, "cur-pod", ["default"], 10, [], [], [], [])
        full = await _explain(conn, claim, *args)
        cur = await _explain(conn, claim_from, *args, [last["priority"]], [last["run_at"]], [last["id"]])
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
    # The full claim pays for the 20,000 dead entries (their heap pages: 100-odd tuples a page);
    # from the cursor, a few buffers per task taken, however many were claimed before it.
    assert full_buf > 150, full_buf
    assert cur_buf <= 40, cur_buf
