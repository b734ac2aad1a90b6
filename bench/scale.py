"""Scale: kubetasks' throughput and the claim's plan with a large pending set (DESIGN §8, issue 8 item 3).

This module owns the ``scale`` measurement: one database seeded with SQL
(``INSERT ... SELECT generate_series``) with F finished tasks (succeeded, as a
worker leaves them: with a ``task_attempts`` row each when the schema keeps
one for a success; since migration 0007 it does not) and, per size S, the
pending set topped up to S + D rows; then D of them are drained by W worker
processes at concurrency C, exactly as the throughput measurement starts them.
So during the measured drain at least S tasks are always pending. Jobs/s =
D / (first start -> D-th finish) of the drained tasks, database timestamps.

At each size, before the drain (after ``VACUUM ANALYZE; CHECKPOINT``) and
again right after it (its dead index entries still there), the claim
statement of ``queries.sql`` is run under ``EXPLAIN (ANALYZE, BUFFERS)`` in a
transaction that registers a worker and is rolled back: plan text, whether it
reads the pending index without a sequential scan of ``tasks``, total cost,
execution time, shared buffers hit/read.

All sizes share one database. Before each run the tasks earlier drains
finished are deleted (the finished count stays F) and the pending set is set
to size + D (rows added, or the newest removed). After one unmeasured warm-up
drain, every repetition runs the sizes in a rotated order; the median counts.

``spread=(H, Q)`` (issue 18 item 6): the pending tasks are spread round-robin
over H handlers (``noop0``..) and Q queues (``q0``..), the workers register all
H handlers (``BENCH_KT_HANDLERS``) and serve all Q queues, and the claim is
EXPLAINed for a worker serving all H handlers and all Q queues. ``(1, 1)`` is
the plain case: handler ``noop`` in queue ``default``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from tests import support
from tests.support import connect

from bench import harness, systems
from bench.harness import Databases, Workers, cpu_seconds, running

SEED_WORKER = uuid.UUID("00000000-0000-4000-8000-00000000bee5")
SEED_POD = "bench-seed"
EXPLAIN_POD = "bench-explain"
HANDLER = "noop"  # bench/apps/kt_app.py: max_attempts=1, the App's other defaults
QUEUE = "default"

# Columns as App.enqueue_many writes them for a no-op task (tests/integration/test_bench_scale.py checks).
_PENDING_SQL = """
INSERT INTO kubetasks.tasks (handler, queue, priority, payload, max_attempts, run_at, timeout_s,
                             retry_delay_s, retry_backoff, max_retry_delay_s, tags)
SELECT $1, $2, 0, '{}'::jsonb, 1, now(), 300, 1, 2, 3600, '{}'::text[]
FROM generate_series(1, $3::bigint)"""

# The same rows spread round-robin over $1 handlers (noop0..) and $2 queues (q0..).
_PENDING_SPREAD_SQL = """
INSERT INTO kubetasks.tasks (handler, queue, priority, payload, max_attempts, run_at, timeout_s,
                             retry_delay_s, retry_backoff, max_retry_delay_s, tags)
SELECT 'noop' || (g % $1), 'q' || (g % $2), 0, '{}'::jsonb, 1, now(), 300, 1, 2, 3600, '{}'::text[]
FROM generate_series(1, $3::bigint) g"""


def spread_names(spread: tuple[int, int]) -> tuple[list[str], list[str]]:
    """The handlers and queues of a spread (the plain case: noop in default)."""
    h, q = spread
    if (h, q) == (1, 1):
        return [HANDLER], [QUEUE]
    return [f"noop{i}" for i in range(h)], [f"q{i}" for i in range(q)]


def spread_env(spread: tuple[int, int]) -> dict[str, str]:
    """Worker environment for a spread: every handler registered, every queue served."""
    if tuple(spread) == (1, 1):
        return {}
    handlers, queues = spread_names(spread)
    return {"BENCH_KT_HANDLERS": str(len(handlers)), "KUBETASKS_QUEUES": ",".join(queues)}


# Finished a day ago or earlier, 100 us apart, each having run 1 ms.
_FINISHED_SQL = """
INSERT INTO kubetasks.tasks (handler, queue, priority, payload, status, attempt, max_attempts, run_at,
                             timeout_s, retry_delay_s, retry_backoff, max_retry_delay_s, tags, result,
                             worker_id, pod_id, created_at, updated_at, started_at, finished_at)
SELECT $1, $2, 0, '{}'::jsonb, 'succeeded', 1, 1, s.ts, 300, 1, 2, 3600, '{}'::text[], 'null'::jsonb,
       $3::uuid, $4, s.ts, s.ts + interval '2 ms', s.ts + interval '1 ms', s.ts + interval '2 ms'
FROM (SELECT now() - interval '1 day' - ($5::bigint - g) * interval '100 microseconds' AS ts
      FROM generate_series(1, $5::bigint) g) s"""

_SEED_WORKER_SQL = """
INSERT INTO kubetasks.workers (worker_id, pod_id, epoch, hostname, pid, queues, concurrency, status,
                               started_at, heartbeat_at, lease_expires_at, stopped_at, stop_reason)
VALUES ($1, $2, 1, 'bench', 0, ARRAY[$3], 50, 'dead', now() - interval '2 days', now() - interval '1 day',
        now() - interval '1 day', now() - interval '1 day', 'bench seed')
ON CONFLICT DO NOTHING"""


def size_label(n: int) -> str:
    """10000 -> 10k, 1000000 -> 1m (the suffix of the JSON keys)."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


async def seed_finished(conn: asyncpg.Connection, n: int) -> None:
    """``n`` succeeded no-op tasks and the (dead) worker that ran them. A success has no
    ``task_attempts`` row (migration 0007: the task row records it), so none is seeded."""
    await conn.execute(_SEED_WORKER_SQL, SEED_WORKER, SEED_POD, QUEUE)
    await conn.execute(_FINISHED_SQL, HANDLER, QUEUE, SEED_WORKER, SEED_POD, n)


async def add_pending(conn: asyncpg.Connection, n: int, spread: tuple[int, int] = (1, 1)) -> None:
    if n > 0 and tuple(spread) == (1, 1):
        await conn.execute(_PENDING_SQL, HANDLER, QUEUE, n)
    elif n > 0:
        await conn.execute(_PENDING_SPREAD_SQL, spread[0], spread[1], n)


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM kubetasks.tasks GROUP BY status")
    out = {r["status"]: int(r["n"]) for r in rows}
    out["task_attempts"] = int(await conn.fetchval("SELECT count(*) FROM kubetasks.task_attempts"))
    return out


async def set_pending(conn: asyncpg.Connection, target: int, spread: tuple[int, int] = (1, 1)) -> int:
    """Make exactly ``target`` tasks pending: drop what earlier drains finished, add or remove pending ones.

    Returns how many pending rows were added (negative: removed)."""
    await conn.execute(
        "DELETE FROM kubetasks.tasks WHERE status <> 'pending' AND pod_id IS DISTINCT FROM $1", SEED_POD
    )
    await conn.execute("DELETE FROM kubetasks.workers WHERE pod_id <> $1 AND status <> 'active'", SEED_POD)
    have = int(await conn.fetchval("SELECT count(*) FROM kubetasks.tasks WHERE status = 'pending'"))
    if have < target:
        await add_pending(conn, target - have, spread)
    elif have > target:
        await conn.execute(
            "DELETE FROM kubetasks.tasks WHERE id IN "
            "(SELECT id FROM kubetasks.tasks WHERE status = 'pending' ORDER BY id DESC LIMIT $1)",
            have - target,
        )
    return target - have


# -- the claim's plan ----------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out.extend(_nodes(child))
    return out


def plan_facts(plan: dict[str, Any]) -> dict[str, Any]:
    """What matters in one ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` of the claim."""
    top = plan["Plan"]
    nodes = _nodes(top)
    scans = sorted(
        {
            f"{n['Node Type']} on {n.get('Relation Name', '?')}"
            + (f" using {n['Index Name']}" if n.get("Index Name") else "")
            for n in nodes
            if "Scan" in str(n["Node Type"])
        }
    )
    # The claim reads the claimable set in claim order (tasks_pending_claim); when its
    # handlers are few among a queue's, the planner may read their pairs instead
    # (tasks_pending_pairs, then a sort of just those rows). Either is an index of
    # the pending set, never the table.
    pending_scan = next(
        (
            n
            for n in nodes
            if n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
            and n.get("Index Name") in ("tasks_pending_claim", "tasks_pending_pairs")
            and n.get("Actual Loops", 0) > 0  # the range that ran (the one after a cursor: none here)
        ),
        None,
    )
    seq_on_tasks = any(n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks" for n in nodes)
    # What the worker serves (worker_handlers, 0020) is probed through an index (its primary
    # key, or the handler's workers) for each task read: as many probes as rows read, never a
    # read of all of its handlers.
    served = [n for n in nodes if n.get("Relation Name") == "worker_handlers"]
    served_by_probe = bool(served) and all(
        n["Node Type"] in ("Index Scan", "Index Only Scan")
        and n.get("Index Name") in ("worker_handlers_pkey", "worker_handlers_by_handler")
        and "Index Cond" in n
        for n in served
    )
    limit = next((n for n in nodes if n["Node Type"] == "Limit"), None)
    out: dict[str, Any] = {
        "index_scan_on_pending_index": pending_scan is not None,
        "seq_scan_on_tasks": seq_on_tasks,
        "plan_ok": pending_scan is not None and not seq_on_tasks,
        "served_by_probe": served_by_probe,
        "served_probes": sum(int(n.get("Actual Loops", 0)) for n in served),
        "scans": scans,
        "total_cost": top.get("Total Cost"),
        "startup_cost": top.get("Startup Cost"),
        "execution_ms": round(float(plan.get("Execution Time", 0.0)), 3),
        "shared_hit_blocks": int(top.get("Shared Hit Blocks", 0)),
        "shared_read_blocks": int(top.get("Shared Read Blocks", 0)),
        "claimed_rows": int(top.get("Actual Rows", 0)),
        "limit_rows": int(limit["Actual Rows"]) if limit else None,
    }
    if pending_scan is not None:
        out["pending_index_scan"] = {
            "actual_rows": pending_scan.get("Actual Rows"),
            "shared_hit_blocks": int(pending_scan.get("Shared Hit Blocks", 0)),
            "shared_read_blocks": int(pending_scan.get("Shared Read Blocks", 0)),
            "total_cost": pending_scan.get("Total Cost"),
        }
    return out


# What a worker records right after registering: the handlers it serves (the claim reads them
# from worker_handlers), without unparking anything (budget 0).
_SERVES_SQL = "SELECT * FROM worker_serves($1, $2::text[], '{}', '[]', 0)"


async def explain_claim(url: str, want: int, spread: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim for ``want`` tasks, rolled back (nothing stays claimed).

    A worker serving every handler of the spread is registered in the same transaction, so the
    lease EXISTS passes and the claim reads its served handlers as a worker's claim does; it reads
    all of the spread's queues in order, as a worker serving them does. One JSON run for the
    figures, then one text run (a second execution: its figures differ a little) for the record.
    The plan is the one the claim ran (claim_batch's cached generic plan, through auto_explain)."""
    handlers, queues = spread_names(spread)
    conn = await connect(url)
    try:
        out: dict[str, Any] = {"want": want}
        for fmt in ("JSON", "TEXT"):
            wid = uuid.uuid4()
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.fetchrow(
                    "SELECT * FROM register_worker($1, $2, 'bench', 0, $3::text[], $4, 60)",
                    wid,
                    EXPLAIN_POD,
                    queues,
                    want,
                )
                await conn.execute(_SERVES_SQL, wid, handlers)
                args = (
                    *(wid, EXPLAIN_POD, queues, want, []),
                    *([], [], []),  # no successes to write first
                    *([], [], []),  # no cursors: every queue from its start
                )
                if fmt == "JSON":
                    out.update(plan_facts(await support.explain_claim(conn, *args)))
                else:
                    out["plan_text"], _ = await support.claim_plan_text(conn, *args, fmt="text")
            finally:
                await tx.rollback()
        return out
    finally:
        await conn.close()


# -- a partial drain -------------------------------------------------------------------


async def drain_some(
    dbs: Databases,
    name: str,
    url: str,
    system: systems.Kubetasks,
    n: int,
    w: int,
    c: int,
    timeout: float,
) -> dict[str, Any]:
    """W workers at concurrency C take ``n`` tasks out of a larger pending set; then they are stopped.

    Window: first start -> n-th finish among the tasks finished since the start (database
    timestamps), so stopping the workers afterwards is outside it."""
    out: dict[str, Any] = {"workers": w, "concurrency": c, "jobs": n}
    workers = Workers(
        [system.worker_argv(c) for _ in range(w)],
        [system.worker_env(url, i) for i in range(w)],
        f"scale-{w}x{c}",
    )
    conn = await connect(url)
    try:
        async with running(workers):
            t0_db = await conn.fetchval("SELECT clock_timestamp()")
            pg_before = {p: cpu_seconds(p) for p in await dbs.backend_pids(name)}
            busy0, total0 = harness.machine_cpu()
            workers.go()
            t_go = time.monotonic()
            while True:
                await asyncio.sleep(0.1)
                done = await conn.fetchval(
                    "SELECT count(*) FROM kubetasks.tasks WHERE finished_at >= $1 AND status = 'succeeded'",
                    t0_db,
                )
                if done >= n:
                    break
                workers.check_alive()
                if time.monotonic() - t_go > timeout:
                    out["error"] = f"{done} of {n} finished after {timeout:.0f}s"
                    break
            out["wall_s_from_go"] = round(time.monotonic() - t_go, 3)
            busy1, total1 = harness.machine_cpu()
            out["machine_cpu_busy_pct"] = round(100 * (busy1 - busy0) / max(1.0, total1 - total0), 1)
            out["worker_cpu_s"] = round(workers.cpu_since_go(), 3)
            out["pg_backend_cpu_s"] = round(
                sum(cpu_seconds(p) - pg_before.get(p, 0.0) for p in await dbs.backend_pids(name)), 3
            )
            errors = workers.errors_in_logs()
        r = await conn.fetchrow(
            """
            WITH d AS (
                SELECT started_at, finished_at, attempt FROM kubetasks.tasks
                WHERE finished_at >= $1 AND status = 'succeeded' ORDER BY finished_at LIMIT $2
            )
            SELECT min(started_at) AS first_start, max(finished_at) AS last_finish, count(*) AS done,
                   percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at) AS p10,
                   percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at) AS p90,
                   count(*) FILTER (WHERE attempt <> 1) AS reruns
            FROM d""",
            t0_db,
            n,
        )
        out["finished_incl_shutdown"] = int(
            await conn.fetchval(
                "SELECT count(*) FROM kubetasks.tasks WHERE finished_at >= $1 AND status = 'succeeded'", t0_db
            )
        )
    finally:
        await conn.close()
    if errors:
        out["log_errors"] = errors
    assert r is not None
    done = int(r["done"] or 0)
    out["done"] = done
    out["reruns"] = int(r["reruns"] or 0)
    if done != n and "error" not in out:
        out["error"] = f"{done} of {n} finished"
    tm = systems.Timing(r["first_start"], r["last_finish"], done, r["p10"], r["p90"], {})
    out.update(tm.rates(out["worker_cpu_s"], out["pg_backend_cpu_s"]))
    return out


# -- the measurement ------------------------------------------------------------------


async def one_size(
    dbs: Databases,
    name: str,
    url: str,
    conn: asyncpg.Connection,
    system: systems.Kubetasks,
    size: int,
    drain_n: int,
    w: int,
    c: int,
    log: Callable[[str], None],
    tag: str,
    spread: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """Top the pending set up to size + drain_n, EXPLAIN the claim, drain drain_n, EXPLAIN again."""
    label = size_label(size)
    res: dict[str, Any] = {"pending": size}
    t = time.monotonic()
    res["pending_rows_added"] = await set_pending(conn, size + drain_n, spread)
    res["seed_pending_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    await _vacuum(conn)
    res["vacuum_checkpoint_s"] = round(time.monotonic() - t, 1)
    res["table_before"] = await counts(conn)
    res["table_size_mb"] = round(
        int(await conn.fetchval("SELECT pg_total_relation_size('kubetasks.tasks')")) / 2**20, 1
    )
    res["pending_index_size_mb"] = round(
        int(await conn.fetchval("SELECT pg_relation_size('kubetasks.tasks_pending_claim')")) / 2**20, 2
    )
    res["claim_plan"] = p = await _guard(explain_claim(url, c, spread))
    shape = "index scan of the pending set" if p.get("plan_ok") else f"PLAN NOT OK {p.get('scans')}"
    log(
        f"scale {tag} {label:>4} pending + {res['table_before'].get('succeeded', 0):,} finished: "
        f"claim {shape}, "
        f"cost {p.get('total_cost')}, {p.get('execution_ms')} ms, "
        f"buffers hit {p.get('shared_hit_blocks')} read {p.get('shared_read_blocks')}"
    )
    res["drain"] = d = await _guard(drain_some(dbs, name, url, system, drain_n, w, c, 60 + drain_n / 50))
    if "jobs_per_s" in d and "error" not in d:
        res["jobs_per_s"] = d["jobs_per_s"]
    res["claim_plan_after_drain"] = pa = await _guard(explain_claim(url, c, spread))
    res["table_after"] = await counts(conn)
    log(
        f"scale {tag} {label:>4} pending: "
        f"{d.get('error') or format(d['jobs_per_s'], ',.0f') + ' jobs/s'} ({w}x{c}, {drain_n:,} drained); "
        f"claim right after the drain {pa.get('execution_ms')} ms, buffers hit {pa.get('shared_hit_blocks')}"
    )
    return res


async def measure(
    dbs: Databases,
    sizes: list[int],
    finished: int,
    drain_n: int,
    w: int,
    c: int,
    reps: int,
    log: Callable[[str], None],
    system: systems.Kubetasks | None = None,
    spread: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """The ``scale`` section of the results; see the module docstring."""
    system = system or systems.Kubetasks()
    if tuple(spread) != (1, 1):
        system = systems.Kubetasks(
            extra_env={**system.extra_env, **spread_env(spread)}, setup_sql=system.setup_sql
        )
    sizes = sorted(sizes)
    out: dict[str, Any] = {
        "spread": {"handlers": spread[0], "queues": spread[1]},
        "sizes": sizes,
        "finished": finished,
        "drained_per_run": drain_n,
        "repetitions": reps,
        "workers": w,
        "concurrency": c,
        "method": (
            f"one database: {finished:,} succeeded tasks seeded with SQL; per run the "
            f"pending set is set to size + {drain_n:,} with SQL, VACUUM ANALYZE; CHECKPOINT, then {w}x{c} "
            f"workers take {drain_n:,} of them, so at least `size` stay pending throughout. Jobs/s = "
            f"{drain_n:,} / (first start -> {drain_n:,}-th finish), database timestamps. Sizes in rotated "
            "order per repetition after one unmeasured warm-up drain; median of the repetitions"
        ),
        "by_size": {size_label(s): {"pending": s, "runs": []} for s in sizes},
    }
    t_all = time.monotonic()
    async with dbs.fresh("scale") as (name, url):
        await system.setup(url)
        conn = await connect(url)
        try:
            t = time.monotonic()
            log(f"scale: seeding {finished:,} finished tasks")
            await seed_finished(conn, finished)
            out["seed_finished_s"] = round(time.monotonic() - t, 1)
            warm = min(drain_n, 5000)
            await set_pending(conn, sizes[0] + warm, spread)
            await _vacuum(conn)
            wd = await _guard(drain_some(dbs, name, url, system, warm, w, c, 60 + warm / 50))
            out["warm_up"] = {"jobs": warm, "jobs_per_s": wd.get("jobs_per_s"), "error": wd.get("error")}
            for rep in range(reps):
                k = rep % len(sizes)
                for size in sizes[k:] + sizes[:k]:
                    run = await one_size(
                        dbs, name, url, conn, system, size, drain_n, w, c, log, f"{rep + 1}/{reps}", spread
                    )
                    if rep > 0:  # the plan text of the first repetition is enough
                        for key in ("claim_plan", "claim_plan_after_drain"):
                            run[key].pop("plan_text", None)
                    out["by_size"][size_label(size)]["runs"].append(run)
        finally:
            await conn.close()
    for res in out["by_size"].values():
        runs = res["runs"]
        rates = [r["jobs_per_s"] for r in runs if "jobs_per_s" in r]
        res["jobs_per_s"] = round(statistics.median(rates), 1) if rates else None
        res["jobs_per_s_runs"] = rates
        plans = [r["claim_plan"] for r in runs if "error" not in r["claim_plan"]]
        after = [r["claim_plan_after_drain"] for r in runs if "error" not in r["claim_plan_after_drain"]]
        res["plan_ok_every_run"] = bool(plans) and all(p["plan_ok"] for p in plans + after)
        if plans:
            res["claim"] = {
                "total_cost": plans[0]["total_cost"],
                "median_execution_ms": round(statistics.median(p["execution_ms"] for p in plans), 3),
                "median_shared_hit_blocks": statistics.median(p["shared_hit_blocks"] for p in plans),
                "median_shared_read_blocks": statistics.median(p["shared_read_blocks"] for p in plans),
                "plan_text": plans[0].get("plan_text"),
            }
        if after:
            res["claim_after_drain"] = {
                "median_execution_ms": round(statistics.median(p["execution_ms"] for p in after), 3),
                "median_shared_hit_blocks": statistics.median(p["shared_hit_blocks"] for p in after),
            }
    out["seconds_total"] = round(time.monotonic() - t_all, 1)
    return out


async def _vacuum(conn: asyncpg.Connection) -> None:
    await conn.execute("VACUUM ANALYZE")
    await conn.execute("CHECKPOINT")


async def _guard(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await coro
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}


def summary(scale: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Top-level keys: [prefix]jobs_per_s_<size>_pending, [prefix]scale_ratio_<largest>_vs_<smallest>
    and [prefix]claim_plan_ok_every_size."""
    out: dict[str, Any] = {}
    by = scale.get("by_size", {})
    for label, res in by.items():
        out[f"{prefix}jobs_per_s_{label}_pending"] = res.get("jobs_per_s")
    labels = [size_label(s) for s in sorted(scale.get("sizes", []))]
    if len(labels) >= 2:
        lo, hi = by.get(labels[0], {}).get("jobs_per_s"), by.get(labels[-1], {}).get("jobs_per_s")
        out[f"{prefix}scale_ratio_{labels[-1]}_vs_{labels[0]}"] = round(hi / lo, 3) if lo and hi else None
    oks = [r["plan_ok_every_run"] for r in by.values() if "plan_ok_every_run" in r]
    if oks:
        out[f"{prefix}claim_plan_ok_every_size"] = all(oks)
    return out
