"""Soak (issue 18 items 1 and 2): sustained load with retention, and a long transaction elsewhere.

This module owns the ``soak`` measurement. One fresh database, W kubetasks
worker processes at concurrency C (the bench app's no-op handler), autovacuum
at the server's defaults:

1. calibration: N tasks enqueued in bulk and drained (the bulk drain rate,
   recorded); then, for ``calibrate_seconds``, the soak's own enqueuer offers
   that bulk rate while the workers drain, and the rate they finish at over
   the last two thirds of it is the sustained rate: what they keep up with
   while an enqueuer shares the cores (the bulk drain of an empty table is
   more than that: on 2 cores it offered a load that grew the backlog to
   millions). The calibration's rows are then deleted and the table vacuumed;
2. load: for ``minutes``, an enqueuer adds tasks at ``fraction`` (default ½)
   of the sustained rate (or ``--rate``), in batches every 50 ms (one transaction each), while a
   retention job deletes the tasks that finished more than ``keep`` seconds
   ago every ``retention_every`` seconds (``App.delete_tasks``, as a user's
   cron would);
3. a long transaction: at ``long_tx_at`` seconds another session opens a
   REPEATABLE READ transaction, reads the tasks table (an analytics query) and
   holds it for ``long_tx_seconds``;
4. every ``bucket`` seconds a sample, read from the database: tasks finished
   per second, backlog, enqueue→start p50/p99 (``started_at - run_at`` of the
   tasks started in the bucket), dead and live tuples of ``tasks``
   (pg_stat_user_tables), table, pending-index and all-index sizes,
   autovacuum runs, the oldest open transaction's age.

Summary: first vs last minute finished/s (goal within 10 %), growth of the
table and the pending index from the first minute to the last, the worst p99
and backlog during and after the long transaction, and whether the workers
logged the warning that names it (horizon.py).

    python bench/soak.py --minutes 10                 # the issue's run
    python bench/soak.py --minutes 2 --long-tx-seconds 30    # a smoke run
    python bench/soak.py --minutes 3 --rate 4000             # a fixed load, to compare two runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from tests.support import until  # noqa: E402

from bench import harness, systems  # noqa: E402
from bench.harness import Databases, Workers, running  # noqa: E402

WARNING_TEXT = "holds back vacuum"

_SAMPLE_SQL = """
WITH w AS (SELECT $1::timestamptz AS a, $2::timestamptz AS b),
started AS (
    SELECT extract(epoch FROM t.started_at - t.run_at) * 1000 AS ms
    FROM kubetasks.tasks t, w WHERE t.started_at >= w.a AND t.started_at < w.b
)
SELECT
    (SELECT count(*) FROM kubetasks.tasks t, w
     WHERE t.finished_at >= w.a AND t.finished_at < w.b) AS finished,
    (SELECT count(*) FROM kubetasks.tasks WHERE status = 'pending') AS backlog,
    (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM started) AS p50_ms,
    (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) FROM started) AS p99_ms,
    s.n_dead_tup AS dead_tuples, s.n_live_tup AS live_tuples, s.autovacuum_count AS autovacuums,
    pg_total_relation_size('kubetasks.tasks') AS total_bytes,
    pg_relation_size('kubetasks.tasks') AS heap_bytes,
    pg_indexes_size('kubetasks.tasks') AS index_bytes,
    pg_relation_size('kubetasks.tasks_pending_claim') AS pending_index_bytes,
    (SELECT extract(epoch FROM now() - min(xact_start)) FROM pg_stat_activity
     WHERE datname = current_database() AND backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
       AND xact_start < now())
        AS oldest_xact_s
FROM pg_stat_user_tables s WHERE s.relid = 'kubetasks.tasks'::regclass"""


async def _drain_rate(url: str, system: systems.Kubetasks, n: int, timeout: float) -> float:
    await system.enqueue_noop(url, n)
    conn = await asyncpg.connect(url)
    try:
        t0 = await conn.fetchval("SELECT clock_timestamp()")

        async def drained() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM kubetasks.tasks WHERE status <> 'succeeded'")

        await until(drained, timeout, f"{n} tasks to drain", 0.1)
        r = await conn.fetchrow(
            "SELECT min(started_at) AS a, max(finished_at) AS b FROM kubetasks.tasks WHERE finished_at >= $1",
            t0,
        )
        await conn.execute("DELETE FROM kubetasks.tasks")
    finally:
        await conn.close()
    return n / max(1e-3, (r["b"] - r["a"]).total_seconds())


async def _sustained_rate(url: str, offered: float, seconds: float) -> dict[str, Any]:
    """Offer ``offered`` tasks/s with the soak's enqueuer for ``seconds``; the finished rate over
    the last two thirds (past the start-up), then the table emptied and vacuumed."""
    conn = await asyncpg.connect(url)
    try:
        t0 = time.monotonic()
        sent: list[int] = []
        feed = asyncio.create_task(_enqueue_at(url, offered, t0 + seconds, sent))
        await asyncio.sleep(seconds / 3)
        a = await conn.fetchval("SELECT clock_timestamp()")
        await feed
        b = await conn.fetchval("SELECT clock_timestamp()")
        done = await conn.fetchval(
            "SELECT count(*) FROM kubetasks.tasks WHERE finished_at >= $1 AND finished_at < $2", a, b
        )
        backlog = await conn.fetchval("SELECT count(*) FROM kubetasks.tasks WHERE status = 'pending'")
        await conn.execute("DELETE FROM kubetasks.tasks WHERE status = 'pending'")

        async def settled() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM kubetasks.tasks WHERE status = 'running'")

        await until(settled, 60, "the calibration's running tasks to end", 0.1)
        await conn.execute("DELETE FROM kubetasks.tasks")
        await conn.execute("VACUUM (ANALYZE) kubetasks.tasks")
    finally:
        await conn.close()
    span = (b - a).total_seconds()
    return {
        "offered_per_s": round(offered, 1), "seconds": seconds, "enqueued": sum(sent),
        "sustained_per_s": round(done / span, 1), "backlog_at_end": backlog,
    }  # fmt: skip


async def _enqueue_at(url: str, rate: float, until: float, sent: list[int]) -> None:
    from kubetasks import EnqueueRequest

    app = systems.Kubetasks()._app(url)
    try:
        start = time.monotonic()
        step = 0.05
        i = 0
        while time.monotonic() < until:
            i += 1
            due = int(rate * step * i) - sum(sent)
            if due > 0:
                await app.enqueue_many([EnqueueRequest("noop") for _ in range(due)])
                sent.append(due)
            delay = start + step * i - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await app.close()


async def _retention(url: str, until: float, every: float, keep: float, deleted: list[int]) -> None:
    app = systems.Kubetasks()._app(url)
    try:
        while time.monotonic() < until:
            await asyncio.sleep(every)
            deleted.append(int(await app.delete_tasks(older_than=keep)))
    finally:
        await app.close()


async def _long_transaction(url: str, at: float, hold: float, marks: dict[str, float]) -> None:
    await asyncio.sleep(at)
    conn = await asyncpg.connect(url, server_settings={"application_name": "soak-analytics"})
    try:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await conn.fetchval("SELECT count(*) FROM kubetasks.tasks")
        marks["start"] = time.monotonic()
        await asyncio.sleep(hold)
        await conn.execute("COMMIT")
        marks["end"] = time.monotonic()
    finally:
        await conn.close()


async def measure(
    dbs: Databases,
    log: Callable[[str], None],
    *,
    minutes: float = 10.0,
    fraction: float = 0.5,
    rate: float | None = None,
    workers: int = 2,
    concurrency: int = 50,
    calibrate: int = 20_000,
    calibrate_seconds: float = 30.0,
    bucket: float = 10.0,
    retention_every: float = 10.0,
    keep: float = 60.0,
    long_tx_at: float | None = None,
    long_tx_seconds: float = 120.0,
) -> dict[str, Any]:
    seconds = minutes * 60
    fixed = rate
    long_tx_at = seconds / 3 if long_tx_at is None else long_tx_at
    out: dict[str, Any] = {
        "minutes": minutes, "fraction_of_sustained_rate": None if rate else fraction, "workers": workers,
        "concurrency": concurrency, "bucket_s": bucket, "retention_every_s": retention_every,
        "retention_keep_s": keep, "long_tx_at_s": long_tx_at, "long_tx_seconds": long_tx_seconds,
    }  # fmt: skip
    # Workers warn about the long transaction halfway through it (at most 30 s in).
    warn_after = max(1.0, min(30.0, long_tx_seconds / 2))
    system = systems.Kubetasks(extra_env={"KUBETASKS_LONG_TRANSACTION_WARN": f"{warn_after:g}"})
    async with dbs.fresh("soak") as (_name, url):
        await system.setup(url)
        ws = Workers(
            [system.worker_argv(concurrency) for _ in range(workers)],
            [{**system.worker_env(url, i), "KUBETASKS_LOG_LEVEL": "WARNING"} for i in range(workers)],
            "soak",
        )
        async with running(ws):
            ws.go()
            rate = await _drain_rate(url, system, calibrate, 60 + calibrate / 50)
            out["drain_rate_per_s"] = round(rate, 1)
            sustained = None
            if calibrate_seconds > 0:
                out["calibration"] = cal = await _sustained_rate(url, rate, calibrate_seconds)
                sustained = cal["sustained_per_s"]
                log(f"soak: bulk drain {rate:,.0f}/s; with the enqueuer offering that, the workers "
                    f"sustain {sustained:,.0f}/s")  # fmt: skip
            out["sustained_rate_per_s"] = sustained
            out["enqueue_rate_per_s"] = target = fixed or round((sustained or rate) * fraction, 1)
            log(f"soak: drain rate {rate:,.0f}/s; enqueuing {target:,.0f}/s for {minutes:g} min")
            t0 = time.monotonic()
            until = t0 + seconds
            sent: list[int] = []
            deleted: list[int] = []
            marks: dict[str, float] = {}
            side = [
                asyncio.create_task(_enqueue_at(url, target, until, sent)),
                asyncio.create_task(_retention(url, until, retention_every, keep, deleted)),
                asyncio.create_task(_long_transaction(url, long_tx_at, long_tx_seconds, marks)),
            ]
            samples: list[dict[str, Any]] = []
            conn = await asyncpg.connect(url)
            try:
                a = await conn.fetchval("SELECT clock_timestamp()")
                # The last bucket ends with the load: one running past it averaged the
                # seconds after the enqueuer stopped into the last minute's rate.
                while time.monotonic() < until - 1.0:
                    await asyncio.sleep(min(bucket, until - time.monotonic()))
                    ws.check_alive()
                    for t in side:
                        if t.done() and t.exception() is not None:
                            raise RuntimeError("a soak task failed") from t.exception()
                    b = await conn.fetchval("SELECT clock_timestamp()")
                    r = dict(await conn.fetchrow(_SAMPLE_SQL, a, b))
                    span = (b - a).total_seconds()
                    now = time.monotonic()
                    s = {
                        "t_s": round(now - t0, 1),
                        "finished_per_s": round(r["finished"] / span, 1),
                        "backlog": r["backlog"],
                        "p50_ms": None if r["p50_ms"] is None else round(r["p50_ms"], 1),
                        "p99_ms": None if r["p99_ms"] is None else round(r["p99_ms"], 1),
                        "dead_tuples": r["dead_tuples"],
                        "live_tuples": r["live_tuples"],
                        "autovacuums": r["autovacuums"],
                        "table_mb": round(r["total_bytes"] / 2**20, 2),
                        "heap_mb": round(r["heap_bytes"] / 2**20, 2),
                        "index_mb": round(r["index_bytes"] / 2**20, 2),
                        "pending_index_mb": round(r["pending_index_bytes"] / 2**20, 3),
                        "oldest_xact_s": None if r["oldest_xact_s"] is None else round(r["oldest_xact_s"], 1),
                        "long_tx": "start" in marks and ("end" not in marks or marks["end"] > now - bucket),
                    }
                    samples.append(s)
                    log(
                        f"soak t={s['t_s']:>6.0f}s done/s {s['finished_per_s']:>7,.0f} "
                        f"backlog {s['backlog']:>6} p99 {s['p99_ms']} ms dead {s['dead_tuples']:>7} "
                        f"table {s['table_mb']} MB pending idx {s['pending_index_mb']} MB "
                        f"oldest xact {s['oldest_xact_s']} s"
                        + (" (long tx)" if s["long_tx"] else "")
                    )  # fmt: skip
                    a = b
                for t in side:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait_for(t, long_tx_seconds + 30)
            finally:
                for t in side:
                    t.cancel()
                await conn.close()
            warned = []
            for lg in ws.logs:
                with contextlib.suppress(OSError):
                    warned += [
                        ln.strip()[:300]
                        for ln in lg.read_text(errors="replace").splitlines()
                        if WARNING_TEXT in ln
                    ]
            out["errors_in_logs"] = ws.errors_in_logs()
    out["enqueued"] = sum(sent)
    out["deleted_by_retention"] = sum(deleted)
    out["samples"] = samples
    out["long_tx_warning_logged"] = bool(warned)
    out["long_tx_warnings"] = warned[:4]
    out.update(summarise(samples, bucket))
    return out


def summarise(samples: list[dict[str, Any]], bucket: float) -> dict[str, Any]:
    per_min = max(1, round(60 / bucket))
    first, last = samples[:per_min], samples[-per_min:]
    during = [s for s in samples if s["long_tx"]]
    after = []
    seen_tx = False
    for s in samples:
        seen_tx = seen_tx or s["long_tx"]
        if seen_tx and not s["long_tx"]:
            after.append(s)

    def avg(rows: list[dict[str, Any]], k: str) -> float | None:
        vals = [r[k] for r in rows if r.get(k) is not None]
        return round(statistics.fmean(vals), 1) if vals else None

    def top(rows: list[dict[str, Any]], k: str) -> float | None:
        vals = [r[k] for r in rows if r.get(k) is not None]
        return max(vals) if vals else None

    f, la = avg(first, "finished_per_s"), avg(last, "finished_per_s")
    return {
        "soak_first_minute_per_s": f,
        "soak_last_minute_per_s": la,
        "soak_last_vs_first": round(la / f, 3) if f and la else None,
        "soak_table_mb_first": avg(first, "table_mb"),
        "soak_table_mb_last": avg(last, "table_mb"),
        "soak_pending_index_mb_first": avg(first, "pending_index_mb"),
        "soak_pending_index_mb_last": avg(last, "pending_index_mb"),
        "soak_dead_tuples_max": top(samples, "dead_tuples"),
        "soak_p99_ms_first_minute": avg(first, "p99_ms"),
        "soak_p99_ms_last_minute": avg(last, "p99_ms"),
        "soak_p99_ms_max_during_long_tx": top(during, "p99_ms"),
        "soak_backlog_max_during_long_tx": top(during, "backlog"),
        "soak_dead_tuples_max_during_long_tx": top(during, "dead_tuples"),
        "soak_p99_ms_max_after_long_tx": top(after, "p99_ms"),
        "soak_backlog_max_after_long_tx": top(after, "backlog"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fraction", type=float, default=0.5, help="of the sustained rate")
    p.add_argument(
        "--rate", type=float, help="tasks/s to enqueue instead (runs to compare then offer the same load)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--calibrate", type=int, default=20_000, help="tasks drained to measure the drain rate")
    p.add_argument(
        "--calibrate-seconds", type=float, default=30.0,
        help="seconds of enqueuing at the bulk drain rate to measure the sustained rate (0: none)",
    )  # fmt: skip
    p.add_argument("--bucket", type=float, default=10.0)
    p.add_argument("--keep", type=float, default=60.0, help="retention: delete tasks finished before this")
    p.add_argument("--long-tx-at", type=float, help="seconds into the load (default: a third of it)")
    p.add_argument("--long-tx-seconds", type=float, default=120.0)
    p.add_argument("--admin-url")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    a = p.parse_args()
    admin = a.admin_url
    if not admin:
        from kubetasks import devenv

        admin = devenv.up().admin_url("postgres")

    async def go() -> dict[str, Any]:
        res = await measure(
            Databases(admin), lambda m: print(m, flush=True), minutes=a.minutes, fraction=a.fraction,
            rate=a.rate, workers=a.workers, concurrency=a.concurrency, calibrate=a.calibrate,
            calibrate_seconds=a.calibrate_seconds, bucket=a.bucket,
            keep=a.keep, long_tx_at=a.long_tx_at, long_tx_seconds=a.long_tx_seconds,
        )  # fmt: skip
        res["machine"] = await harness.machine_info(admin)
        return res

    res = asyncio.run(go())
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    for k, v in res.items():
        if k.startswith("soak_") or k in (
            "drain_rate_per_s", "sustained_rate_per_s", "enqueue_rate_per_s", "long_tx_warning_logged"
        ):  # fmt: skip
            print(f"{k:40} {v}")
    print(f"written: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
