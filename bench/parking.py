"""Parking at scale: the claim with unserved tasks ahead of it, and the parking pass's cost.

    python bench/parking.py                      # 1,000,000 pending over 1,000 handlers, 100,000 unserved
    python bench/parking.py --pending 100000 --handlers 100 --unserved 10000

One fresh database (``kubetasks dev up``'s PostgreSQL unless ``--admin-url``),
seeded with SQL: P pending tasks spread over H served handlers in two queues,
then U pending tasks of a handler no worker has, at a higher priority (so
ahead of every served task in claim order). A worker is registered serving
the H handlers. Measured, each after ``VACUUM ANALYZE``:

* the claim of 10 (EXPLAIN ANALYZE BUFFERS of the scan it picks with, and the
  median of 50 timed claims, each rolled back) without the U tasks, with them
  before the parking pass, and once they are parked;
* the pass that parks them (rows per second, calls of 20,000 rows), a steady
  pass with nothing to rewrite (buffers, ms): what every pass costs, and the
  unserved report that stats and /metrics read (buffers, ms).

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from tests.support import connect, create_database, drop_database, explain_claim  # noqa: E402

from kubetasks import devenv  # noqa: E402
from kubetasks.store import migrate, queries  # noqa: E402

DB = "bench_parking"


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(_nodes(child))
    return out


async def claim_figures(conn: asyncpg.Connection, wid: uuid.UUID) -> dict[str, Any]:
    """The claim of 10 from q0 by worker ``wid`` (its served handlers recorded by worker_serves)."""
    claim = queries.load()["claim"].sql
    tx = conn.transaction()
    await tx.start()
    try:
        plan = await explain_claim(conn, *(wid, "bench-parking", ["q0"], 10, [], [], [], [], [], [], []))
    finally:
        await tx.rollback()
    picked = next(n for n in _nodes(plan["Plan"]) if n.get("Subplan Name") == "CTE picked")
    scan = next(  # the range that ran: without a cursor, every priority's
        n
        for n in _nodes(picked)
        if "Scan" in n["Node Type"] and n.get("Relation Name") == "tasks" and n.get("Actual Loops", 0) > 0
    )
    stmt = await conn.prepare(claim)
    times = []
    for _ in range(50):
        tx = conn.transaction()
        await tx.start()
        t0 = time.perf_counter()
        rows = await stmt.fetch(wid, "bench-parking", ["q0"], 10, [], [], [], [], [], [], [])
        times.append(time.perf_counter() - t0)
        await tx.rollback()
        assert len(rows) == 10
    return {
        "scan": f"{scan['Node Type']} using {scan.get('Index Name')}",
        "rows_removed_by_filter": int(scan.get("Rows Removed by Filter", 0)),
        "scan_buffers": int(scan.get("Shared Hit Blocks", 0)) + int(scan.get("Shared Read Blocks", 0)),
        "explain_ms": round(float(plan["Execution Time"]), 3),
        "median_ms": round(statistics.median(times) * 1000, 3),
    }


async def main(a: argparse.Namespace) -> dict[str, Any]:
    admin = a.admin_url or devenv.up().admin_url()
    await create_database(admin, DB, replace=True)
    url = admin.rsplit("/", 1)[0] + "/" + DB
    await migrate(url)
    conn = await connect(url)
    handlers = [f"h{i:04d}" for i in range(a.handlers)]
    out: dict[str, Any] = {"pending": a.pending, "handlers": a.handlers, "unserved": a.unserved}
    try:
        t = time.monotonic()
        await conn.execute(
            "INSERT INTO tasks (handler, queue) SELECT ($1::text[])[1 + i % $2], 'q' || (i % 2) "
            "FROM generate_series(0, $3 - 1) AS i",
            handlers,
            a.handlers,
            a.pending,
        )
        out["seed_s"] = round(time.monotonic() - t, 1)
        wid = uuid.uuid4()
        await conn.fetchrow(
            "SELECT * FROM register_worker($1, 'bench-parking', 'h', 1, ARRAY['q0', 'q1'], 50, 3600)", wid
        )
        await conn.fetchrow("SELECT * FROM worker_serves($1, $2, '{}', '[]', 1000)", wid, handlers)
        await conn.execute("VACUUM ANALYZE tasks")
        out["claim_without_unserved"] = await claim_figures(conn, wid)
        await conn.execute(
            "INSERT INTO tasks (handler, queue, priority) "
            "SELECT 'ghost.h', 'q0', 10 FROM generate_series(1, $1)",
            a.unserved,
        )
        await conn.execute("VACUUM ANALYZE tasks")
        out["claim_before_parking"] = await claim_figures(conn, wid)
        t = time.monotonic()
        calls = 0
        while True:
            row = await conn.fetchrow("SELECT * FROM park_unserved($1, 1, true, 20000)", handlers)
            calls += 1
            if not row["more"]:
                break
        took = time.monotonic() - t
        out["parking"] = {"calls": calls, "seconds": round(took, 2), "rows_per_s": round(a.unserved / took)}
        await conn.execute("VACUUM ANALYZE tasks")
        out["claim_once_parked"] = await claim_figures(conn, wid)
        raw = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM park_unserved($1, 0, true, 20000)",
            handlers,
        )
        plan = json.loads(raw)[0]
        out["steady_pass"] = {
            "pairs": int(await conn.fetchval("SELECT count(*) FROM pending_pairs")),
            "buffers": int(plan["Plan"].get("Shared Hit Blocks", 0))
            + int(plan["Plan"].get("Shared Read Blocks", 0)),
            "ms": round(float(plan["Execution Time"]), 1),
        }
        raw = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.load()["unserved_counts"].sql
        )
        plan = json.loads(raw)[0]
        out["unserved_report"] = {
            "buffers": int(plan["Plan"].get("Shared Hit Blocks", 0))
            + int(plan["Plan"].get("Shared Read Blocks", 0)),
            "ms": round(float(plan["Execution Time"]), 1),
        }
        out["tasks_heap_pages"] = int(
            await conn.fetchval("SELECT relpages FROM pg_class WHERE relname = 'tasks'")
        )
    finally:
        await conn.close()
        await drop_database(admin, DB)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pending", type=int, default=1_000_000, help="served pending tasks")
    p.add_argument("--handlers", type=int, default=1000, help="distinct served handlers (two queues)")
    p.add_argument("--unserved", type=int, default=100_000, help="unserved tasks ahead in claim order")
    p.add_argument(
        "--admin-url", help="postgresql://superuser@host:port/postgres (default: kubetasks dev up)"
    )
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=2))
