"""Query cost at scale (issue 19): on bench/dashboard.py's seed (a busy installation: finished
tasks over a day, a pending backlog, events, attempts, schedules, caught-up rollups), every
statement each dashboard page runs is EXPLAINed with the arguments it ran with, and none reads
more than a bounded number of rows of a table that grows with the work.

The statements are the ones the API really ran for each page (the dashboard's store records
its calls), not a list kept by hand, so a page that starts reading something new is covered.
Each statement runs under EXPLAIN ANALYZE (in a transaction rolled back after it), so the
test counts the rows every plan node really reads from such a table -- those it returns plus
those its filter threw away, over all its loops -- and holds them under READ_MAX: an index
scan that walks a whole primary key (a merge join the planner thought would stop early) fails
as surely as a sequential scan. READ_MAX is the listings' own bound (listing.DEFAULT_SCAN ids
per call) with room, plus the pending backlog the queue depths count; it does not grow with
the finished history.

The seed is the issue's size, 1,000,000 finished and 100,000 pending tasks (about 50 s here,
most of it the seed), so a read of the whole tasks table is nearly nine times READ_MAX. A
smaller seed does not prove it: at 100,000 the planner still probes each tick's task by id
where, at 1,000,000, it merges a join with the tasks table's whole primary key
(schedules_status with its ticks joined to their tasks passes at 100,000 and reads 50,000,050
rows of tasks at 1,000,000). DASHBOARD_PLANS_FINISHED=100000 (pending a tenth of it) runs
a quicker check while working on a query (not KUBETASKS_*, which tests/conftest.py clears).
The times are bench/'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
from bench.dashboard import page_ids, pages, seed

from kubetasks import listing
from tests.integration.dashboard_helpers import TOKEN, running_dashboard

#: Tables whose size follows the work (tasks, their history, the ticks): no plan node reads more
#: than READ_MAX of their rows, and the three big ones are never read by a sequential scan. The
#: others hold one row per worker, schedule, queue or handler -- or are the per-minute rollups,
#: which the overview reads whole over its window (minutes x queues x handlers, whatever the
#: number of tasks; bench/dashboard.py times the 24-hour overview): not checked here.
GROWING = {"tasks", "task_events", "task_attempts", "cron_ticks"}
NO_SEQ_SCAN = {"tasks", "task_events", "task_attempts"}
FINISHED = int(os.environ.get("DASHBOARD_PLANS_FINISHED", "1000000"))
PENDING = FINISHED // 10
#: A listing's window of ids (listing.DEFAULT_SCAN) with room, plus the backlog: the queue
#: depths count the pending set through its partial indexes, a cost of the backlog, not of the
#: history. A read of the whole tasks table is three times this.
READ_MAX = listing.DEFAULT_SCAN + 5_000 + PENDING


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for sub in plan.get("Plans", []):
        yield from _nodes(sub)


def _rows_read(node: dict[str, Any]) -> int:
    per_loop = (
        node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        + node.get("Rows Removed by Index Recheck", 0)
    )  # fmt: skip
    return int(per_loop * node.get("Actual Loops", 1))


async def test_every_page_reads_through_indexes_at_scale(db_url: str) -> None:
    made = await seed(db_url, FINISHED, PENDING)
    assert made["counts"]["succeeded"] > FINISHED * 0.9, made
    ids = await page_ids(db_url)
    async with running_dashboard(db_url) as d:
        store = d.app.store
        ran: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
        page_now: list[str] = []
        real_run = store.run

        async def recording(name: str, *args: Any, conn: Any = None) -> Any:
            if page_now:
                ran.setdefault(page_now[0], []).append((name, args))
            return await real_run(name, *args, conn=conn)

        store.run = recording  # type: ignore[method-assign]
        try:
            async with httpx.AsyncClient(
                base_url=f"{d.url}api/v1/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
            ) as c:
                for page, paths in pages(ids).items():
                    page_now[:] = [page]
                    for path in paths:
                        r = await c.get(path)
                        assert r.status_code == 200, (path, r.text)
                    page_now.clear()
        finally:
            store.run = real_run  # type: ignore[method-assign]

        assert set(ran) == set(pages(ids)), "every page runs statements through the store"
        conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
        try:
            bad: list[str] = []
            seen: set[str] = set()
            most: dict[str, int] = {}
            for page, statements in ran.items():
                for name, args in statements:
                    sql = store.queries[name].sql
                    tr = conn.transaction()
                    await tr.start()
                    try:
                        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
                    finally:
                        await tr.rollback()
                    (top,) = json.loads(raw)
                    seen.add(name)
                    for node in _nodes(top["Plan"]):
                        rel = node.get("Relation Name")
                        if rel not in GROWING:
                            continue
                        n = _rows_read(node)
                        most[f"{name} on {rel}"] = max(n, most.get(f"{name} on {rel}", 0))
                        if node["Node Type"] == "Seq Scan" and rel in NO_SEQ_SCAN:
                            bad.append(f"{page}: {name} reads {rel} by a sequential scan ({n} rows)")
                        elif n > READ_MAX:
                            bad.append(f"{page}: {name} reads {n} rows of {rel} ({node['Node Type']})")
            print("most rows read per statement and table:", json.dumps(most, indent=1, sort_keys=True))
        finally:
            await conn.close()
    # The pages' own reads are among them (not only the rollup pass in the background).
    assert {"tasks_page", "dash_queues", "dash_minutes", "events_page", "attempts_page"} <= seen, seen
    assert not bad, "\n".join(bad)
