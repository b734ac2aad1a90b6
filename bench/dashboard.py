"""Dashboard at scale (issue 19): the API's server-side time per page at 1,000,000 finished
and 100,000 pending tasks.

This module owns the dashboard's scale seed and its measurement:

* ``seed(url)``: one database shaped like a busy installation, all by
  ``INSERT ... SELECT generate_series`` (seconds, not hours): F finished tasks
  spread over the last 24 hours (97 % succeeded, 2 % failed, 1 % cancelled; 20
  handlers, 4 queues, 10 pods, tags on a tenth; workflows of six tasks among
  the oldest), P pending ones (due), 40 running under 20 live workers (plus 500
  dead ones), 200,000 events and 60,000 ended attempts, 50 schedules with
  their ticks; then ``VACUUM ANALYZE`` and the dashboard's rollup pass until it
  has caught up with the last six hours (its own backfill), as a dashboard
  that has been running would have. tests/integration/test_dashboard_plans.py
  EXPLAINs every page's queries on this same seed.
* ``measure(url)``: ``kubetasks dashboard`` served in this process (uvicorn on
  loopback), then each page's API calls, ``N`` times each after a warm-up, one
  at a time; the figure is the server's own time per request, read from the
  ``Server-Timing`` header the dashboard sets (the client's time is also
  kept). p50 / p95 / max per endpoint, and per page the p95 of the sum of its
  calls. The goal (issue 19) is p95 <= 200 ms per page on the 2-CPU machine:
  a figure, not a timed test.

``python -m bench.dashboard [--finished N] [--pending N] [--requests N]``
prints a table and writes ``bench/results/dashboard.json``.
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

import asyncpg

from bench.harness import Databases

HANDLERS = [f"h{i:02d}.work" for i in range(20)]
QUEUES = ["default", "images", "reports", "mail"]
PODS = [f"pod-{i}" for i in range(10)]

_FINISHED = """
INSERT INTO kubetasks.tasks (handler, queue, priority, payload, status, attempt, max_attempts, run_at,
                             timeout_s, tags, result, error, worker_id, pod_id, created_at, updated_at,
                             started_at, finished_at)
SELECT ($1::text[])[1 + g % 20], ($2::text[])[1 + (g / 7) % 4], 0, jsonb_build_object('n', g),
       CASE WHEN g % 100 < 97 THEN 'succeeded' WHEN g % 100 < 99 THEN 'failed' ELSE 'cancelled' END,
       1, 3, s.ts - interval '40 ms', 300,
       CASE WHEN g % 10 = 0 THEN ARRAY['batch-' || (g % 50)] ELSE '{}'::text[] END,
       CASE WHEN g % 100 < 97 THEN '{"ok": true}'::jsonb END,
       CASE WHEN g % 100 >= 97 THEN 'error number ' || g END,
       $3::uuid, ($4::text[])[1 + g % 10], s.ts - interval '50 ms', s.ts,
       s.ts - interval '30 ms' - (g % 13) * interval '7 ms', s.ts
FROM (SELECT g, now() - interval '2 minutes' - ($5::bigint - g) * (interval '86 seconds' * 1000 / $5::bigint)
      AS ts FROM generate_series(1, $5::bigint) g) s"""

_PENDING = """
INSERT INTO kubetasks.tasks (handler, queue, payload, run_at, tags)
SELECT ($1::text[])[1 + g % 20], ($2::text[])[1 + g % 4], jsonb_build_object('n', g),
       now() - interval '1 minute',
       CASE WHEN g % 10 = 0 THEN ARRAY['batch-' || (g % 50)] ELSE '{}'::text[] END
FROM generate_series(1, $3::bigint) g"""


async def seed(url: str, finished: int = 1_000_000, pending: int = 100_000) -> dict[str, Any]:
    """Fill an empty, migrated database (see the module docstring); returns what it made."""
    from kubetasks.dashboard.rollups import Rollup
    from kubetasks.store import Store

    t0 = time.monotonic()
    conn = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})
    try:
        dead = uuid.UUID("00000000-0000-4000-8000-00000000dead")
        await conn.execute(
            "INSERT INTO workers (worker_id, pod_id, epoch, queues, concurrency, status, lease_expires_at, "
            "stopped_at, stop_reason, started_at) "
            "SELECT CASE WHEN g = 0 THEN $1 ELSE gen_random_uuid() END, 'old-pod-' || g, 1, "
            "ARRAY['default'], 10, 'dead', now() - interval '1 day', now() - g * interval '1 minute', "
            "'lease expired', "
            "now() - interval '2 days' FROM generate_series(0, 499) g",
            dead,
        )
        await conn.execute(_FINISHED, HANDLERS, QUEUES, dead, PODS, finished)
        # Workflows among the oldest: every sixth task a root, the five after it its children.
        await conn.execute(
            "UPDATE tasks SET parent_id = id - id % 6, spawn_key = '#' || (id % 6) "
            "WHERE id BETWEEN 7 AND 60000 AND id % 6 <> 0"
        )
        await conn.execute(_PENDING, HANDLERS, QUEUES, pending)
        live = []
        for i in range(20):
            wid = uuid.uuid4()
            live.append(wid)
            await conn.execute(
                "INSERT INTO workers (worker_id, pod_id, pod_slot, epoch, hostname, pid, queues, "
                "concurrency, lease_expires_at, namespace) "
                "VALUES ($1, $2, $3, 1, 'node-1', 100 + $3, $4, 10, now() + interval '1 hour', 'jobs')",
                wid, PODS[i % 10], 1 + i // 10, QUEUES,
            )  # fmt: skip
        await conn.execute(
            "WITH r AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM tasks "
            "WHERE status = 'pending' ORDER BY id LIMIT 40) "
            "UPDATE tasks t SET status = 'running', attempt = 1, worker_id = ($1::uuid[])[1 + r.k % 20], "
            "pod_id = ($2::text[])[1 + r.k % 10], started_at = now() FROM r WHERE t.id = r.id",
            live, PODS,
        )  # fmt: skip
        top = int(await conn.fetchval("SELECT max(id) FROM tasks"))
        await conn.execute(
            "INSERT INTO task_events (task_id, kind, attempt, worker_id, pod_id, detail, at) "
            "SELECT 1 + (g * 5) % $1, CASE WHEN g % 3 = 0 THEN 'retried' WHEN g % 3 = 1 "
            "THEN 'progress' ELSE 'released' END, 1, $2, ($3::text[])[1 + g % 10], 'event ' || g, "
            "now() - g * interval '400 ms' "
            "FROM generate_series(1, 200000) g",
            top, dead, PODS,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO task_attempts (task_id, attempt, worker_id, pod_id, started_at, finished_at, "
            "outcome, error) SELECT 1 + (g * 17) % $1, 1, $2, ($3::text[])[1 + g % 10], "
            "now() - interval '1 hour', now() - interval '59 minutes', "
            "CASE WHEN g % 2 = 0 THEN 'retried' ELSE 'worker_lost' END, 'boom' "
            "FROM generate_series(1, 60000) g",
            top, dead, PODS,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO schedules (name, cron, handler, queue, last_task_id) "
            "SELECT 'schedule-' || g, '*/5 * * * *', ($1::text[])[1 + g % 20], 'default', 100 * g + 1 "
            "FROM generate_series(1, 50) g",
            HANDLERS,
        )
        await conn.execute(
            "INSERT INTO cron_ticks (schedule, tick_at, outcome, task_id) "
            "SELECT 'schedule-' || s, date_trunc('minute', now()) - k * interval '5 minutes', 'enqueued', "
            "100 * s + k "
            "FROM generate_series(1, 50) s, generate_series(1, 100) k"
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    seeded_s = time.monotonic() - t0
    store = await Store(url, max_size=2).open()
    passes = 0
    try:
        rollup = Rollup(store)
        while True:
            res = await rollup.run_pass(force_depth=True)
            passes += 1
            if res is None or (res.to_at - res.from_at).total_seconds() < 1800:
                break
    finally:
        await store.close()
    conn = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})
    try:
        await conn.execute("VACUUM ANALYZE")
        counts = {r["status"]: int(r["n"]) for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM tasks GROUP BY status")}  # fmt: skip
        minutes = int(await conn.fetchval("SELECT count(*) FROM task_minutes"))
    finally:
        await conn.close()
    return {"counts": counts, "seed_s": round(seeded_s, 1), "rollup_passes": passes, "task_minutes": minutes,
            "total_s": round(time.monotonic() - t0, 1)}  # fmt: skip


async def page_ids(url: str) -> dict[str, Any]:
    """The seed's rows the pages open: its newest failed task, a workflow's root, a live worker."""
    conn = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})
    try:
        return {
            "failed": int(await conn.fetchval("SELECT max(id) FROM tasks WHERE status = 'failed'")),
            "root": 6000,
            "worker": str(
                await conn.fetchval("SELECT worker_id FROM workers WHERE status = 'active' LIMIT 1")
            ),
        }
    finally:
        await conn.close()


def pages(ids: dict[str, Any]) -> dict[str, list[str]]:
    """Each page and the API calls it makes when it opens (as dashboard-ui/src/pages.js does)."""
    t = ids["failed"]
    return {
        "overview (1 h)": ["overview?window=60"],
        "overview (24 h)": ["overview?window=1440"],
        "tasks": ["tasks?limit=50"],
        "tasks, status=failed": ["tasks?limit=50&status=failed"],
        "tasks, handler+tag": ["tasks?limit=50&handler=h03.work&tag=batch-13"],
        "tasks of a workflow": [f"tasks?limit=50&root={ids['root']}"],
        "task": [f"tasks/{t}", f"tasks/{t}/attempts", f"tasks/{t}/events"],
        "workflow": [f"workflows/{ids['root']}"],
        "queues": ["queues"],
        "pods": ["workers"],
        "schedules": ["schedules"],
        "events, kind=retried": ["events?kind=retried&limit=100"],
        "attempts of a pod": ["attempts?pod=pod-3&limit=100"],
    }


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def measure(url: str, requests: int = 50) -> dict[str, Any]:
    import httpx

    from kubetasks import App
    from kubetasks.dashboard import server

    token = "bench-dashboard-token-0123456789"
    app = App(database_url=url, strict_handlers=False, dashboard_token=token, pod_id="bench-dashboard")
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(app, stop, port=0, ready=bound.set_result))
    out: dict[str, Any] = {"endpoints": {}, "pages": {}}
    try:
        port = await asyncio.wait_for(bound, 30)
        ids = await page_ids(url)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1/",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as c:
            for page, calls in pages(ids).items():
                per_call: dict[str, list[float]] = {p: [] for p in calls}
                client: dict[str, list[float]] = {p: [] for p in calls}
                sums: list[float] = []
                for i in range(requests + 3):
                    total = 0.0
                    for path in calls:
                        t0 = time.perf_counter()
                        r = await c.get(path)
                        elapsed = (time.perf_counter() - t0) * 1000
                        if r.status_code != 200:
                            raise SystemExit(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
                        dur = float(r.headers["server-timing"].split("dur=")[1])
                        if i >= 3:  # warm-up: the first prepares the statements
                            per_call[path].append(dur)
                            client[path].append(elapsed)
                            total += dur
                    if i >= 3:
                        sums.append(total)
                for path in calls:
                    xs = per_call[path]
                    out["endpoints"][path] = {
                        "p50_ms": round(statistics.median(xs), 1), "p95_ms": round(_pct(xs, 0.95), 1),
                        "max_ms": round(max(xs), 1), "client_p95_ms": round(_pct(client[path], 0.95), 1),
                    }  # fmt: skip
                out["pages"][page] = {"calls": len(calls), "p50_ms": round(statistics.median(sums), 1),
                                      "p95_ms": round(_pct(sums, 0.95), 1)}  # fmt: skip
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await app.close()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from kubetasks import devenv
    from kubetasks.store import migrate

    admin = args.admin_url or devenv.up().admin_url()
    dbs = Databases(admin)
    async with dbs.fresh("dashboard") as (_name, url):
        await migrate(url)
        seeded = await seed(url, args.finished, args.pending)
        print(f"seeded in {seeded['seed_s']} s, rollups caught up in {seeded['rollup_passes']} passes: "
              f"{seeded['counts']}", flush=True)  # fmt: skip
        result = await measure(url, args.requests)
    return {"seed": seeded, "requests": args.requests, **result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finished", type=int, default=1_000_000)
    ap.add_argument("--pending", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=50, help="Measured requests per page (after 3 warm-up).")
    ap.add_argument("--admin-url", default=None)
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    width = max(len(p) for p in res["pages"])
    print(f"\n{'page':<{width}}  calls  p50 ms  p95 ms   (server-side, {args.requests} requests each)")
    for page, r in res["pages"].items():
        print(f"{page:<{width}}  {r['calls']:>5}  {r['p50_ms']:>6}  {r['p95_ms']:>6}")
    print("\nendpoint p95 (server / client):")
    for path, r in res["endpoints"].items():
        print(f"  {path:<48} {r['p95_ms']:>7} ms / {r['client_p95_ms']:>7} ms")
    out = Path(__file__).resolve().parent / "results" / "dashboard.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
