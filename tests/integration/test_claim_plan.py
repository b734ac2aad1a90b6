"""The claim reads the pending index however many tasks wait or have finished."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from bench import scale

from kubetasks import App
from kubetasks.store import queries
from tests.support import explain_claim


async def test_claim_is_an_index_scan_on_a_large_table(app: App, db_url: str) -> None:
    """With 200,000 pending and 200,000 finished tasks the claim scans the pending index, never the table."""
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        await conn.execute(
            "INSERT INTO tasks (handler, queue, payload) "
            "SELECT 'h', 'default', '{}'::jsonb FROM generate_series(1, 200000)"
        )
        await conn.execute(
            "INSERT INTO tasks (handler, queue, status, finished_at, attempt) "
            "SELECT 'h', 'default', 'succeeded', now(), 1 FROM generate_series(1, 200000)"
        )
        await conn.execute("ANALYZE tasks")
        wid = uuid.uuid4()
        await conn.fetchrow(
            "SELECT * FROM register_worker($1, 'plan-pod', 'h', 1, ARRAY['default'], 50, 30)", wid
        )
        await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['h'], '{}', '[]', 1000)", wid)
        tx = conn.transaction()
        await tx.start()
        plan = await explain_claim(conn, wid, "plan-pod", ["default"], 50, [], [], [], [], [], [], [])
        await tx.rollback()  # the claim really claimed 50 tasks: undo it
    finally:
        await conn.close()

    nodes: list[dict[str, object]] = []

    def walk(node: dict[str, object]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):  # type: ignore[union-attr]
            walk(child)  # type: ignore[arg-type]

    walk(plan["Plan"])
    scans = {
        (n["Node Type"], n.get("Relation Name"), n.get("Index Name"))
        for n in nodes
        if "Scan" in str(n["Node Type"])
    }
    assert not any(t == "Seq Scan" and rel == "tasks" for t, rel, _ in scans), scans
    assert ("Index Scan", "tasks", "tasks_pending_claim") in scans, scans
    limit = next(n for n in nodes if n["Node Type"] == "Limit")
    assert limit["Actual Rows"] == 50
    # Buffers stay proportional to the batch, not to the 400,000 rows.
    assert (
        int(plan["Plan"].get("Shared Hit Blocks", 0)) + int(plan["Plan"].get("Shared Read Blocks", 0)) < 5000
    )
    ms = plan["Execution Time"]
    print(f"\n[plan] claim of 50 from 200k pending + 200k finished: {ms:.2f} ms, scans {sorted(scans)}")


async def test_claim_plan_at_scale_with_one_and_with_ten_thousand_handlers(db_url: str) -> None:
    """Issue 18 item 6: with 1,000,000 finished tasks, the claim reads the pending index (never
    the table) at 10k, 100k and 1M pending of one handler in one queue, and at 10k and 100k
    pending spread over 10,000 handlers and 100 queues (the worker allowed all 10,000 and
    serving all 100 queues), each after ANALYZE; and it takes as many as it asks for. What the
    worker serves is probed by primary key once per task read (worker_handlers, 0020), with 10,000
    handlers as with one: the claim carries no list of them. Seeded with generate_series
    (bench/scale.py's rows); the throughput at these sizes is bench/'s."""
    spread = (10_000, 100)
    conn = await scale.connect(db_url)
    seen: list[str] = []
    try:
        # The seeding inserts are no enqueues: no trigger work per statement.
        await conn.execute("ALTER TABLE kubetasks.tasks DISABLE TRIGGER tasks_notify_enqueued")
        await scale.seed_finished(conn, 1_000_000)
        plain = spread_n = 0
        for size, spread_size in ((10_000, 10_000), (100_000, 100_000), (1_000_000, None)):
            await scale.add_pending(conn, size - plain)
            plain = size
            if spread_size is not None:
                await scale.add_pending(conn, spread_size - spread_n, spread)
                spread_n = spread_size
            await conn.execute("ANALYZE kubetasks.tasks")
            cases = [("1 handler", (1, 1))] + ([("10k handlers", spread)] if spread_size else [])
            for what, sp in cases:
                facts = await scale.explain_claim(db_url, 50, sp)
                seen.append(
                    f"{size} + {what}: {facts['execution_ms']} ms, {facts['served_probes']} served probes, "
                    f"{facts['scans']}"
                )
                assert facts["plan_ok"], (size, what, facts["scans"], facts.get("plan_text"))
                assert facts["limit_rows"] == 50, (size, what, facts)
                # One probe per task read (all 50 are served: nothing filtered out), not per handler;
                # through an index once the worker's rows are many (one row may be read whole).
                assert facts["served_probes"] == 50, (size, what, facts.get("plan_text"))
                if sp != (1, 1):
                    assert facts["served_by_probe"], (size, what, facts.get("plan_text"))
    finally:
        await conn.close()
    print("\n[plan] " + "\n[plan] ".join(seen))


async def test_a_plan_made_on_an_empty_table_stays_an_index_plan_as_it_grows(db_url: str) -> None:
    """The claim's plan is made once per session (claim_batch, 0021): a worker that starts on an
    empty table keeps the plan made then. 200,000 tasks arrive with no ANALYZE since (autovacuum
    off on the table): the claim still reads the pending index and writes by primary key. Fails
    without the function's enable_seqscan/enable_sort settings: the plan made on the empty table
    finds the successes with a hash join over a scan of the whole table (27 ms against 1.4)."""
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        await conn.execute("ALTER TABLE tasks SET (autovacuum_enabled = off)")
        wid = uuid.uuid4()
        await conn.fetchrow(
            "SELECT * FROM register_worker($1, 'grow-pod', 'h', 1, ARRAY['default'], 50, 30)", wid
        )
        await conn.fetchrow("SELECT * FROM worker_serves($1, ARRAY['h'], '{}', '[]', 1000)", wid)
        args = (wid, "grow-pod", ["default"], 50, [], [], [], [], [], [], [])
        # The plan is made here, on an empty table.
        assert await conn.fetch(queries.load()["claim"].sql, *args) == []
        await conn.execute(
            "INSERT INTO tasks (handler, queue, payload) SELECT 'h', 'default', '{}'::jsonb "
            "FROM generate_series(1, 200000)"
        )
        tx = conn.transaction()
        await tx.start()
        plan = await explain_claim(conn, *args)
        await tx.rollback()
    finally:
        await conn.close()

    nodes: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    scans = {
        (n["Node Type"], n.get("Relation Name"), n.get("Index Name"))
        for n in nodes
        if "Scan" in n["Node Type"]
    }
    print(
        f"\n[plan] claim of 50 planned on an empty table, after 200k arrived: {plan['Execution Time']:.2f} ms"
    )
    assert not any(t == "Seq Scan" and rel == "tasks" for t, rel, _ in scans), scans
    assert not any(n["Node Type"] == "Sort" for n in nodes), scans
    assert ("Index Scan", "tasks", "tasks_pending_claim") in scans, scans
    assert next(n for n in nodes if n["Node Type"] == "Limit")["Actual Rows"] == 50
    assert (
        int(plan["Plan"].get("Shared Hit Blocks", 0)) + int(plan["Plan"].get("Shared Read Blocks", 0)) < 2000
    )
