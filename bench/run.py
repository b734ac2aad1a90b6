"""kubetasks side by side with pgqueuer and procrastinate on the same PostgreSQL.

    python bench/run.py            # full: 20,000 jobs, 3 repetitions, 30 s latency, 60 s idle
    python bench/run.py --quick    # 5,000 jobs, 1 repetition, 10 s latency, 30 s idle, scale 1 rep

Measurements (DESIGN.md §8):

* throughput: N no-op jobs enqueued in bulk into a fresh database, drained by
  W worker processes at concurrency C; jobs/s = N / (first job start -> last
  job finish), both read from the database. Systems interleaved, median of
  the repetitions;
* plain-SQL ceiling: 2 processes claiming 1 or 10 rows with FOR UPDATE SKIP
  LOCKED and marking them done in the same transaction;
* latency at idle: one worker process (C=10), one job at a time at 50/s,
  enqueue -> handler start (same host clock);
* idle cost: 4 idle worker processes, transactions/s per process from
  pg_stat_database;
* scale (bench/scale.py): kubetasks jobs/s at 2x50 with 10k / 100k / 1M
  pending and 1M finished tasks, and the claim's EXPLAIN (ANALYZE, BUFFERS);
* recovery (bench/recovery.py): a worker running 50 long tasks SIGKILLed,
  time until all 50 run again (same pod re-registers; silent death, lease TTL);
* enqueue contention (bench/contention.py): 1 / 8 / 32 concurrent enqueuers,
  one task per transaction, with the worker waiting (every enqueue notifies),
  busy (no notification since migration 0014) and the trigger off;
* k8s (bench/k8s.py): N Task objects in one kubectl apply through the
  operator on the local control plane (e2e/cluster), time to all Succeeded.

Writes bench/results/latest.json and prints one table. Needs the `bench`
extra (pgqueuer, procrastinate, psycopg) and a PostgreSQL: `--admin-url`, or
the local one of `kubetasks dev up` (started if needed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import ceiling as sql_ceiling  # noqa: E402
from bench import contention, harness, recovery, scale, soak, systems  # noqa: E402
from bench import k8s as k8s_bench  # noqa: E402
from bench.harness import Databases, Workers, cpu_seconds, machine_cpu, running  # noqa: E402

console = Console()
if not console.is_terminal:
    console = Console(width=150)
RESULTS = ROOT / "bench" / "results"

TARGETS = {
    "vs_pgqueuer_2x50": 1.5,
    "vs_procrastinate_2x50": 10.0,
    "latency_p50_ms": 3.0,
    "latency_p99_ms": 10.0,
    "idle_tps_per_process": 0.5,
    "scale_ratio_1m_vs_10k": 0.8,
}
# DESIGN.md §8, measured earlier on a 2-vCPU machine; shown for comparison only.
DESIGN_REFERENCE = {
    "pgqueuer_jobs_per_s": {"1x10": 2462, "1x50": 6248, "2x50": 7949},
    "procrastinate_jobs_per_s": {"1x10": 436, "1x50": 417, "2x50": 534},
    "sql_ceiling_batch1_jobs_per_s": 2789,
    "sql_ceiling_batch10_jobs_per_s": 18248,
    "latency_ms": {"pgqueuer": [4.3, 17.5], "procrastinate": [5.4, 9.7]},
    "idle_tps_per_process": {"pgqueuer": 1.29, "procrastinate": 0.61},
}


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


# -- measurements ----------------------------------------------------------------


async def guarded(what: str, coro: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement; a failure is recorded in its result, and the run goes on."""
    try:
        return dict(await coro)
    except Exception as exc:
        log(f"[red]{what} failed:[/red] {str(exc)[:2000]}")
        return {**base, "error": f"{type(exc).__name__}: {str(exc)[:4000]}"}


async def drain(
    dbs: Databases, system: systems.System, n: int, w: int, c: int, timeout: float
) -> dict[str, Any]:
    """One throughput run; returns the facts of the run, with ``error`` when it failed."""
    out: dict[str, Any] = {"system": system.name, "workers": w, "concurrency": c, "jobs": n}
    async with dbs.fresh(system.name[:4]) as (name, url):
        await system.setup(url)
        t = time.monotonic()
        await system.enqueue_noop(url, n)
        out["enqueue_s"] = round(time.monotonic() - t, 3)
        await dbs.vacuum_analyze(url)
        workers = Workers(
            [system.worker_argv(c) for _ in range(w)],
            [system.worker_env(url, i) for i in range(w)],
            f"{system.name}-{w}x{c}",
        )
        async with running(workers):
            x0 = await dbs.xacts(name)
            polls = 0
            conn = await asyncpg.connect(url)
            try:
                out["loadavg1"] = harness.loadavg()[0]
                busy0, total0 = machine_cpu()
                workers.go()
                t_go = time.monotonic()
                while True:
                    await asyncio.sleep(0.05)
                    polls += 1
                    if await conn.fetchval(system.done_sql):
                        break
                    workers.check_alive()
                    if time.monotonic() - t_go > timeout:
                        out["error"] = f"not drained after {timeout:.0f}s"
                        break
                out["wall_s_from_go"] = round(time.monotonic() - t_go, 3)
                busy1, total1 = machine_cpu()
                out["machine_cpu_busy_pct"] = round(100 * (busy1 - busy0) / max(1.0, total1 - total0), 1)
                out["worker_cpu_s"] = round(workers.cpu_since_go(), 3)
                out["pg_backend_cpu_s"] = round(sum(cpu_seconds(p) for p in await dbs.backend_pids(name)), 3)
                tm = await system.timing(conn)
            finally:
                await conn.close()
            errors = workers.errors_in_logs()
        # Read once the workers are gone: a backend reports its counts at exit at the latest.
        await asyncio.sleep(0.3)
        out["xacts"] = await dbs.xacts(name) - x0 - polls - 1
    if errors:
        out["log_errors"] = errors
    out["done"] = tm.done
    out.update({k: int(v) if isinstance(v, int) else v for k, v in tm.extra.items()})
    if tm.done != n and "error" not in out:
        out["error"] = f"{tm.done} of {n} jobs finished"
    rates = tm.rates(out["worker_cpu_s"], out["pg_backend_cpu_s"])
    if rates:
        out.update(rates)
        out["xacts_per_1k"] = round(1000 * out["xacts"] / max(1, tm.done), 1)
    return out


async def ceiling(
    dbs: Databases, n: int, batch: int, mode: str, procs: int, timeout: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": batch, "mode": mode, "processes": procs, "jobs": n}
    script = str(harness.BENCH / "ceiling.py")
    async with dbs.fresh("sql") as (_name, url):
        await sql_ceiling.setup(url, n)
        await dbs.vacuum_analyze(url)
        argv = [harness.PY, script, "--dsn", url, "--batch", str(batch), "--mode", mode]
        workers = Workers([argv] * procs, [{}] * procs, f"ceiling-{batch}-{mode}")
        async with running(workers):
            workers.go()
            if not await workers.wait_exit(timeout):
                out["error"] = f"not drained after {timeout:.0f}s"
            out["worker_cpu_s"] = round(workers.cpu_since_go(), 3)
        conn = await asyncpg.connect(url)
        try:
            r = await conn.fetchrow(
                "SELECT min(done_at) AS a, max(done_at) AS b, "
                "count(*) FILTER (WHERE status = 'done') AS done FROM ceiling_jobs"
            )
        finally:
            await conn.close()
    assert r is not None
    out["done"] = int(r["done"])
    if r["done"] != n and "error" not in out:
        out["error"] = f"{r['done']} of {n} jobs done"
    secs = (r["b"] - r["a"]).total_seconds() if r["a"] is not None else 0.0
    if secs > 0:
        out["seconds"] = round(secs, 4)
        out["jobs_per_s"] = round(r["done"] / secs, 1)
    return out


async def latency(
    dbs: Databases, system: systems.System, seconds: float, rate: float, concurrency: int = 10
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "system": system.name,
        "rate_per_s": rate,
        "seconds": seconds,
        "concurrency": concurrency,
    }
    async with dbs.fresh("lat" + system.name[:4]) as (name, url):
        await system.setup(url)
        workers = Workers(
            [system.worker_argv(concurrency)], [system.worker_env(url, 0)], f"{system.name}-latency"
        )
        samples_file = workers.tmp / "latency.txt"
        workers.envs[0]["BENCH_LATENCY_FILE"] = str(samples_file)
        async with running(workers):
            workers.go()
            await dbs.wait_backends(name, 1)
            await asyncio.sleep(2.0)
            workers.check_alive()
            warm_n = max(10, int(rate))  # one second of warm-up, not counted
            total = warm_n + int(seconds * rate)
            loop = asyncio.get_running_loop()
            async with system.latency_enqueuer(url) as enqueue:
                start = loop.time()
                for i in range(total):
                    delay = start + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await enqueue(time.time(), i < warm_n)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                lines = samples_file.read_text().splitlines() if samples_file.exists() else []
                if len(lines) >= total:
                    break
                await asyncio.sleep(0.1)
            workers.check_alive()
            finished = await _finish_times(url, system)
    fields = [ln.split() for ln in lines]
    vals = [1000 * float(f[0]) for f in fields if f[1] == "0"]
    # enqueue -> completion written: the completing transaction's now() minus t.
    done_ms = [
        1000 * (finished[int(f[2])] - float(f[3])) for f in fields if f[1] == "0" and int(f[2]) in finished
    ]
    out["completion_samples"] = len(done_ms)
    for q in (50, 95, 99):
        out[f"completion_p{q}_ms"] = round(harness.percentile(done_ms, q), 2) if done_ms else None
    out["samples"] = len(vals)
    out["missing"] = total - len(lines)
    if vals:
        for q in (50, 95, 99):
            out[f"p{q}_ms"] = round(harness.percentile(vals, q), 2)
        out["max_ms"] = round(max(vals), 2)
        out["mean_ms"] = round(statistics.fmean(vals), 2)
    else:
        out["error"] = "no samples"
    return out


async def _finish_times(url: str, system: systems.System) -> dict[int, float]:
    """Job id -> epoch seconds its completion was written, once the queue has drained."""
    conn = await asyncpg.connect(url)
    try:
        end = time.monotonic() + 10
        while not await conn.fetchval(system.done_sql) and time.monotonic() < end:  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.1)
        # A system may write completions after the job left its queue table (batched logs).
        await asyncio.sleep(1.0)
        return {int(r["job_id"]): float(r["finished"]) for r in await conn.fetch(system.finished_sql)}
    finally:
        await conn.close()


async def idle(dbs: Databases, system: systems.System, procs: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system.name, "processes": procs, "seconds": seconds}
    async with dbs.fresh("idle" + system.name[:4]) as (name, url):
        await system.setup(url)
        workers = Workers(
            [system.worker_argv(10) for _ in range(procs)],
            [system.worker_env(url, i) for i in range(procs)],
            f"{system.name}-idle",
        )
        async with running(workers):
            workers.go()
            await dbs.wait_backends(name, procs)
            await asyncio.sleep(6.0)  # start-up writes and the first heartbeat fall outside the window
            x0, t0 = await dbs.xacts(name), time.monotonic()
            await asyncio.sleep(seconds)
            x1, t1 = await dbs.xacts(name), time.monotonic()
            workers.check_alive()
            out["sessions"] = len(await dbs.backend_pids(name))
    out["transactions"] = x1 - x0
    out["tps_per_process"] = round((x1 - x0) / (t1 - t0) / procs, 3)
    return out


async def profile_kubetasks(dbs: Databases, n: int, w: int, c: int, rate: int = 250) -> dict[str, Any]:
    """One extra kubetasks drain with py-spy sampling worker 0; top frames by own and total time."""
    # The venv's bin/ need not be on PATH (python bench/run.py from a shell without it).
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    system = systems.Kubetasks()
    async with dbs.fresh("prof") as (_name, url):
        await system.setup(url)
        await system.enqueue_noop(url, n)
        await dbs.vacuum_analyze(url)
        workers = Workers(
            [system.worker_argv(c) for _ in range(w)],
            [system.worker_env(url, i) for i in range(w)],
            "profile",
        )
        raw = workers.tmp / "pyspy.txt"
        async with running(workers):
            spy = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(workers.procs[0].pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)
            workers.go()
            conn = await asyncpg.connect(url)
            try:
                while not await conn.fetchval(system.done_sql):  # noqa: ASYNC110 - polls the database
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
            spy.send_signal(2)
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            if not raw.exists():
                return {"error": "py-spy wrote nothing (ptrace not permitted?)"}
            text = raw.read_text()
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "profile-kubetasks-worker.txt").write_text(text)
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [
            f.split(" (")[0] + " " + f.split(" (")[-1].rstrip(")").rsplit("/", 1)[-1]
            for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (f, round(100 * v / max(1, total), 1)) for f, v in sorted(d.items(), key=lambda x: -x[1])[:30]
        ]

    return {
        "samples": total,
        "top_own_pct": top(own),
        "top_total_pct": top(incl),
        "raw": "bench/results/profile-kubetasks-worker.txt (py-spy --format raw: collapsed stacks)",
    }


# -- orchestration -----------------------------------------------------------------


def median(runs: list[dict[str, Any]], key: str = "jobs_per_s") -> float | None:
    vals = [r[key] for r in runs if key in r and "error" not in r]
    return round(statistics.median(vals), 1) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    admin_url = a.admin_url
    if not admin_url:
        from kubetasks import devenv

        admin_url = devenv.up().admin_url("postgres")
    dbs = Databases(admin_url)
    stale = await dbs.drop_stale()
    if stale:
        log(f"dropped {len(stale)} database(s) left by earlier runs")
    machine = await harness.machine_info(admin_url)
    all_systems: dict[str, systems.System] = {
        "kubetasks": systems.Kubetasks(
            extra_env=dict(kv.split("=", 1) for kv in a.kt_env), setup_sql=a.kt_setup_sql
        ),
        "pgqueuer": systems.PgQueuer(batch_size=a.pgq_batch_size),
        "procrastinate": systems.Procrastinate(),
        "pgqueuer-nocap": systems.PgQueuer(batch_size=a.pgq_batch_size, cap=False, name="pgqueuer-nocap"),
    }
    chosen = [all_systems[s] for s in a.systems]
    configs = [(w, c) for w in a.workers for c in a.concurrency]
    timeout = 60 + a.jobs / 50
    res: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if a.quick else "full",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "settings": {
            "jobs": a.jobs,
            "repetitions": a.reps,
            "workers": a.workers,
            "concurrency": a.concurrency,
            "systems": a.systems,
            "enqueue_chunk": systems.System.chunk,
            "after_enqueue": "VACUUM ANALYZE; CHECKPOINT",
            "start": "workers pre-imported, started together",
            "window": "first job start -> last job finish, database timestamps",
            "latency": {"rate_per_s": a.latency_rate, "seconds": a.latency_seconds, "concurrency": 10},
            "idle": {"processes": a.idle_processes, "seconds": a.idle_seconds},
            "ceiling": {"processes": 2, "modes": a.ceiling_modes, "batches": [1, 10]},
            "scale": {
                "pending_sizes": a.scale_sizes,
                "finished": a.scale_finished,
                "drained_per_run": a.scale_drain,
                "repetitions": a.scale_reps,
                "workers": 2,
                "concurrency": 50,
            },
            "recovery": {
                "tasks": a.recovery_tasks,
                "lease_ttl_s": a.recovery_ttl,
                "heartbeat_interval_s": a.recovery_heartbeat,
            },
            "k8s": {"tasks": a.k8s_tasks, "concurrency": 50},
            "contention": {"seconds": a.contention_seconds, "enqueuers": list(contention.ENQUEUERS)},
            "soak": {"minutes": a.soak_minutes, "long_tx_seconds": a.soak_long_tx_seconds, "fraction": 0.5},
            "worker_settings": {s.name: {f"{w}x{c}": s.settings(c) for w, c in configs} for s in chosen},
        },
        "design_reference": DESIGN_REFERENCE,
        "targets": TARGETS,
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s.name: {f"{w}x{c}": [] for w, c in configs} for s in chosen
    }
    ceil_runs: dict[str, list[dict[str, Any]]] = {
        f"batch{b}_{m}": [] for b in (1, 10) for m in a.ceiling_modes
    }

    if "throughput" in a.measure:
        for rep in range(a.reps):
            for i, (w, c) in enumerate(configs):
                k = (rep + i) % len(chosen)
                for s in chosen[k:] + chosen[:k]:
                    r = await guarded(
                        f"{s.name} {w}x{c}",
                        drain(dbs, s, a.jobs, w, c, timeout),
                        {"system": s.name, "workers": w, "concurrency": c},
                    )
                    runs[s.name][f"{w}x{c}"].append(r)
                    msg = (
                        r.get("error")
                        or f"{r['jobs_per_s']:,.0f} jobs/s (steady {r.get('steady_jobs_per_s', 0):,.0f})"
                    )
                    log(f"rep {rep + 1}/{a.reps} {s.name:13} {w}x{c:<3} {msg}")
            if "ceiling" in a.measure:
                for m in a.ceiling_modes:
                    for b in (1, 10):
                        r = await guarded(
                            f"ceiling {b} {m}", ceiling(dbs, a.jobs, b, m, 2, timeout), {"batch": b}
                        )
                        ceil_runs[f"batch{b}_{m}"].append(r)
                        log(
                            f"rep {rep + 1}/{a.reps} plain SQL     batch {b:<2} {m:4} "
                            f"{r.get('error') or format(r['jobs_per_s'], ',.0f') + ' jobs/s'}"
                        )
    elif "ceiling" in a.measure:
        for rep in range(a.reps):
            for m in a.ceiling_modes:
                for b in (1, 10):
                    ceil_runs[f"batch{b}_{m}"].append(
                        await guarded(
                            f"ceiling {b} {m}", ceiling(dbs, a.jobs, b, m, 2, timeout), {"batch": b}
                        )
                    )
                    log(f"rep {rep + 1}/{a.reps} plain SQL batch {b} {m}: {ceil_runs[f'batch{b}_{m}'][-1]}")

    matrix: dict[str, dict[str, dict[str, Any]]] = {
        s: {
            cfg: {
                "median_jobs_per_s": median(rs),
                "median_steady_jobs_per_s": median(rs, "steady_jobs_per_s"),
                "median_worker_cpu_ms_per_1k": median(rs, "worker_cpu_ms_per_1k"),
                "median_pg_cpu_ms_per_1k": median(rs, "pg_cpu_ms_per_1k"),
                "median_xacts_per_1k": median(rs, "xacts_per_1k"),
                "runs": rs,
            }
            for cfg, rs in by_cfg.items()
        }
        for s, by_cfg in runs.items()
    }
    res["throughput"] = matrix
    res["ratios"] = {
        cfg: {
            f"kubetasks_vs_{peer}": ratio(
                matrix.get("kubetasks", {}).get(cfg, {}).get("median_jobs_per_s"),
                matrix.get(peer, {}).get(cfg, {}).get("median_jobs_per_s"),
            )
            for peer in ("pgqueuer", "procrastinate")
        }
        for cfg in (f"{w}x{c}" for w, c in configs)
    }
    res["ceiling"] = {k: {"median_jobs_per_s": median(v), "runs": v} for k, v in ceil_runs.items()}

    singles = [s for s in chosen if s.name != "pgqueuer-nocap"]
    res["latency"] = {}
    if "latency" in a.measure:
        for s in singles if a.latency_peers else singles[:1]:
            r = await guarded(
                f"latency {s.name}", latency(dbs, s, a.latency_seconds, a.latency_rate), {"samples": 0}
            )
            res["latency"][s.name] = r
            log(
                f"latency {s.name:13} p50 {r.get('p50_ms')} ms  p99 {r.get('p99_ms')} ms  "
                f"({r.get('samples')} samples)"
            )
    res["idle"] = {}
    if "idle" in a.measure:
        for s in singles if a.idle_peers else singles[:1]:
            r = await guarded(
                f"idle {s.name}",
                idle(dbs, s, a.idle_processes, a.idle_seconds),
                {"processes": a.idle_processes, "tps_per_process": None},
            )
            res["idle"][s.name] = r
            log(f"idle {s.name:13} {r['tps_per_process']} transactions/s per process")
    if "scale" in a.measure:
        res["scale"] = await guarded(
            "scale",
            scale.measure(
                dbs,
                a.scale_sizes,
                a.scale_finished,
                a.scale_drain,
                2,
                50,
                a.scale_reps,
                log,
                all_systems["kubetasks"],
            ),
            {"by_size": {}},
        )
    if "scale" in a.measure and a.scale_spread != (1, 1):
        res["scale_spread"] = await guarded(
            "scale (spread)",
            scale.measure(
                dbs,
                a.scale_sizes,
                a.scale_finished,
                a.scale_drain,
                2,
                50,
                a.scale_reps,
                log,
                all_systems["kubetasks"],
                spread=a.scale_spread,
            ),
            {"by_size": {}},
        )
    if "recovery" in a.measure:
        res["recovery"] = await guarded(
            "recovery", recovery.measure(dbs, a.recovery_tasks, a.recovery_ttl, a.recovery_heartbeat, log), {}
        )
    if "soak" in a.measure:
        res["soak"] = await guarded(
            "soak",
            soak.measure(
                dbs,
                log,
                minutes=a.soak_minutes,
                long_tx_seconds=a.soak_long_tx_seconds,
                calibrate=5000 if a.quick else 20_000,
                calibrate_seconds=10 if a.quick else 30,
            ),
            {},
        )
        res.update({k: v for k, v in res["soak"].items() if k.startswith("soak_")})
    if "contention" in a.measure:
        res["contention"] = await guarded(
            "contention", contention.measure(dbs, a.contention_seconds, log), {"by_enqueuers": {}}
        )
    if "k8s" in a.measure:
        res["k8s"] = await guarded("k8s", k8s_bench.measure(dbs, a.k8s_tasks, 50, log), {})
        if "error" in res["k8s"]:
            log(f"k8s: n/a: {res['k8s']['error'][:300]}")
    if "profile" in a.measure:
        pn = max(a.jobs, 50000)
        log(f"profiling one kubetasks worker with py-spy during a 2x50 drain of {pn:,} jobs")
        res["profile"] = await guarded("profile", profile_kubetasks(dbs, pn, 2, 50), {})

    def cell(system: str, cfg: str, key: str = "median_jobs_per_s") -> float | None:
        value: float | None = matrix.get(system, {}).get(cfg, {}).get(key)
        return value

    def cpu_per_1k(system: str, cfg: str) -> float | None:
        """Worker plus PostgreSQL-backend CPU per 1,000 tasks (medians of the runs)."""
        w, p = cell(system, cfg, "median_worker_cpu_ms_per_1k"), cell(system, cfg, "median_pg_cpu_ms_per_1k")
        return None if w is None or p is None else round(w + p, 1)

    head = "2x50"
    kt, nocap = cell("kubetasks", head), cell("pgqueuer-nocap", head)
    res.update(
        {
            "kubetasks_jobs_per_s": kt,
            "pgqueuer_nocap_jobs_per_s": nocap,
            "kubetasks_vs_pgqueuer_nocap": round(kt / nocap, 2) if kt and nocap else None,
            "cpu_ms_per_1k_tasks": cpu_per_1k("kubetasks", head),
            "pgqueuer_cpu_ms_per_1k_tasks": cpu_per_1k("pgqueuer", head),
            "pgqueuer_nocap_cpu_ms_per_1k_tasks": cpu_per_1k("pgqueuer-nocap", head),
            "pgqueuer_jobs_per_s": cell("pgqueuer", head),
            "procrastinate_jobs_per_s": cell("procrastinate", head),
            "kubetasks_vs_pgqueuer": res["ratios"].get(head, {}).get("kubetasks_vs_pgqueuer"),
            "kubetasks_vs_procrastinate": res["ratios"].get(head, {}).get("kubetasks_vs_procrastinate"),
            "sql_ceiling_batch1_jobs_per_s": res["ceiling"].get("batch1_txn", {}).get("median_jobs_per_s"),
            "sql_ceiling_batch10_jobs_per_s": res["ceiling"].get("batch10_txn", {}).get("median_jobs_per_s"),
            "latency_p50_ms": res["latency"].get("kubetasks", {}).get("p50_ms"),
            "latency_p95_ms": res["latency"].get("kubetasks", {}).get("p95_ms"),
            "latency_p99_ms": res["latency"].get("kubetasks", {}).get("p99_ms"),
            "completion_latency_p50_ms": res["latency"].get("kubetasks", {}).get("completion_p50_ms"),
            "completion_latency_p99_ms": res["latency"].get("kubetasks", {}).get("completion_p99_ms"),
            "idle_tps_per_process": res["idle"].get("kubetasks", {}).get("tps_per_process"),
            "jobs_per_s_10k_pending": None,
            "jobs_per_s_100k_pending": None,
            "jobs_per_s_1m_pending": None,
            "scale_ratio_1m_vs_10k": None,
            "recovery_same_pod_s": res.get("recovery", {}).get("recovery_same_pod_s"),
            "recovery_silent_death_s": res.get("recovery", {}).get("recovery_silent_death_s"),
            "recovery_lease_ttl_s": res.get("recovery", {}).get("lease_ttl_s"),
            "task_objects_per_s": res.get("k8s", {}).get("tasks_per_s"),
            "task_objects_apply_to_all_succeeded_s": res.get("k8s", {}).get("apply_to_all_succeeded_s"),
        }
    )
    if "scale" in res:
        res.update(scale.summary(res["scale"]))
    if "scale_spread" in res:
        h, q = a.scale_spread
        res.update(scale.summary(res["scale_spread"], prefix=f"spread_{h}h_{q}q_"))
    if "contention" in res:
        res.update(contention.summary(res["contention"]))
    res["target_status"] = {
        "vs_pgqueuer_2x50": _ge(res["kubetasks_vs_pgqueuer"], TARGETS["vs_pgqueuer_2x50"]),
        "vs_procrastinate_2x50": _ge(res["kubetasks_vs_procrastinate"], TARGETS["vs_procrastinate_2x50"]),
        "latency_p50_ms": _le(res["latency_p50_ms"], TARGETS["latency_p50_ms"]),
        "latency_p99_ms": _le(res["latency_p99_ms"], TARGETS["latency_p99_ms"]),
        "idle_tps_per_process": _le(res["idle_tps_per_process"], TARGETS["idle_tps_per_process"]),
        "scale_ratio_1m_vs_10k": _ge(res["scale_ratio_1m_vs_10k"], TARGETS["scale_ratio_1m_vs_10k"]),
    }
    res["machine"]["loadavg_at_end"] = harness.loadavg()
    return res


def _ge(v: float | None, t: float) -> str:
    return "n/a" if v is None else ("met" if v >= t else "missed")


def _le(v: float | None, t: float) -> str:
    return "n/a" if v is None else ("met" if v <= t else "missed")


# -- report -----------------------------------------------------------------------


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, float | int):
        return f"{v:,.{digits}f}"
    return str(v)


def mark(status: str) -> str:
    return {"met": "[green]met[/green]", "missed": "[red]missed[/red]"}.get(status, status)


def report(res: dict[str, Any]) -> Table:
    m = res["machine"]
    names = res["settings"]["systems"]
    t = Table(
        title=f"kubetasks bench ({res['mode']}: {res['settings']['jobs']:,} jobs x "
        f"{res['settings']['repetitions']} rep, median) — {m['nproc']} CPU, {m['memory_mb']:,} MB, "
        f"PostgreSQL {m['postgresql_version']}, "
        f"load {m['loadavg_at_start'][0]:.1f}→{m['loadavg_at_end'][0]:.1f}",
        title_justify="left",
    )
    t.add_column("measurement")
    for n in names:
        t.add_column(n, justify="right")
    t.add_column("kt ÷ pgq", justify="right")
    t.add_column("kt ÷ proc", justify="right")
    t.add_column("target (DESIGN §8)")
    tp = res["throughput"]
    ran = any(c["runs"] for by_cfg in tp.values() for c in by_cfg.values())
    for cfg, rat in res["ratios"].items() if ran else ():
        target = ""
        if cfg == "2x50":
            target = (
                f"≥1.5× pgq {mark(res['target_status']['vs_pgqueuer_2x50'])}, "
                f"≥10× proc {mark(res['target_status']['vs_procrastinate_2x50'])}"
            )
        t.add_row(
            f"jobs/s {cfg.replace('x', '×')} (W×C)",
            *[fmt(tp.get(n, {}).get(cfg, {}).get("median_jobs_per_s")) for n in names],
            fmt(rat.get("kubetasks_vs_pgqueuer"), 2),
            fmt(rat.get("kubetasks_vs_procrastinate"), 2),
            target,
        )
    if ran and "2x50" in res["ratios"]:
        for label, key in (
            ("steady 10–90 % jobs/s", "median_steady_jobs_per_s"),
            ("worker CPU ms / 1k jobs", "median_worker_cpu_ms_per_1k"),
            ("PG backend CPU ms / 1k jobs", "median_pg_cpu_ms_per_1k"),
            ("transactions / 1k jobs", "median_xacts_per_1k"),
        ):
            t.add_row(
                f"  {label}, 2×50", *[fmt(tp.get(n, {}).get("2x50", {}).get(key)) for n in names], "", "", ""
            )
    if ran:
        t.add_section()
    kt = res.get("kubetasks_jobs_per_s")
    for key, v in res["ceiling"].items():
        if not v["runs"]:
            continue
        b, mode = key.removeprefix("batch").split("_")
        med = v["median_jobs_per_s"]
        note = f"kt 2×50 = {100 * kt / med:.0f} % of it" if kt and med else ""
        label = "in 1 transaction" if mode == "txn" else "in 1 statement"
        t.add_row(f"plain SQL ceiling: {b} job(s) {label}, 2 procs", fmt(med), *[""] * (len(names) + 1), note)
    if any(v["runs"] for v in res["ceiling"].values()):
        t.add_section()
    lat = res["latency"]
    if lat:
        for q in ("p50", "p95", "p99"):
            target = ""
            if q in ("p50", "p99"):
                limit = TARGETS[f"latency_{q}_ms"]
                target = f"≤{limit:g} ms {mark(res['target_status'][f'latency_{q}_ms'])}"
            t.add_row(
                f"enqueue→start {q} ms (idle, 50/s)",
                *[fmt(lat.get(n, {}).get(f"{q}_ms"), 1) for n in names],
                "",
                "",
                target,
            )
        for q in ("p50", "p95", "p99"):
            t.add_row(
                f"enqueue→completion written {q} ms",
                *[fmt(lat.get(n, {}).get(f"completion_{q}_ms"), 1) for n in names],
            )
        t.add_section()
    idl = res["idle"]
    if idl:
        t.add_row(
            f"idle transactions/s per process ({next(iter(idl.values()))['processes']} procs)",
            *[fmt(idl.get(n, {}).get("tps_per_process"), 2) for n in names],
            "",
            "",
            f"≤0.5 {mark(res['target_status']['idle_tps_per_process'])}",
        )
    blank = [""] * (len(names) - 1)
    for sc_key in ("scale", "scale_spread"):
        _scale_rows(t, res, sc_key, blank)
    rec = res.get("recovery")
    if rec is not None:
        t.add_section()
        same, silent = rec.get("same_pod", {}), rec.get("silent_death", {})
        t.add_row(
            f"recovery s: {rec.get('tasks', 50)} running tasks, SIGKILL, same pod re-registers",
            fmt(same.get("seconds"), 2),
            *blank,
            "",
            "",
            same.get("error", "")[:80]
            or f"+{same.get('process_start_s', 0):.2f} s process start in a real restart",
        )
        t.add_row(
            f"recovery s: SIGKILL, silent death, lease TTL {rec.get('lease_ttl_s', 0):g} s",
            fmt(silent.get("seconds"), 2),
            *blank,
            "",
            "",
            silent.get("error", "")[:80]
            or f"{silent.get('after_lease_expiry_s', 0):.2f} s after the lease expired "
            f"(heartbeat {rec.get('heartbeat_interval_s', 0):g} s)",
        )
    so = res.get("soak")
    if so and "soak_last_vs_first" in so:
        t.add_section()
        t.add_row(
            f"soak {so['minutes']:g} min at ½ sustained rate ({so.get('enqueue_rate_per_s', 0):,.0f}/s): "
            "finished/s last ÷ first minute",
            fmt(so.get("soak_last_vs_first"), 2),
            *blank,
            "",
            "",
            f"first {fmt(so.get('soak_first_minute_per_s'))}/s, "
            f"last {fmt(so.get('soak_last_minute_per_s'))}/s; "
            f"table {fmt(so.get('soak_table_mb_first'), 1)}→{fmt(so.get('soak_table_mb_last'), 1)} MB",
        )
        t.add_row(
            f"  {so['long_tx_seconds']:g} s transaction elsewhere: worst p99 enqueue→start ms",
            fmt(so.get("soak_p99_ms_max_during_long_tx")),
            *blank,
            "",
            "",
            f"backlog max {fmt(so.get('soak_backlog_max_during_long_tx'))}; after: p99 "
            f"{fmt(so.get('soak_p99_ms_max_after_long_tx'))} ms; warned {so.get('long_tx_warning_logged')}",
        )
    ct = res.get("contention", {}).get("by_enqueuers")
    if ct:
        t.add_section()
        for e, row in ct.items():
            t.add_row(
                f"enqueues/s, {e} enqueuer(s), 1 task per transaction: worker busy",
                fmt(row.get("busy_tasks_per_s")),
                *blank,
                "",
                "",
                f"worker waiting (notify) {fmt(row.get('waiting_tasks_per_s'))}, trigger off "
                f"{fmt(row.get('none_tasks_per_s'))}; busy ÷ off {fmt(row.get('busy_vs_none'), 2)}",
            )
            if "drain_tasks_per_s" in row:
                t.add_row(
                    f"enqueues/s, {e} enqueuer(s), a worker draining them (linger 5 ms)",
                    fmt(row.get("drain_tasks_per_s")),
                    *blank,
                    "",
                    "",
                    f"without linger {fmt(row.get('drain_nolinger_tasks_per_s'))}; notifications per task "
                    f"{fmt(row.get('drain_notifications_per_task'), 2)} vs "
                    f"{fmt(row.get('drain_nolinger_notifications_per_task'), 2)}",
                )
    k = res.get("k8s")
    if k is not None:
        t.add_section()
        if "tasks_per_s" in k:
            t.add_row(
                f"Task objects/s: {k['tasks']} in 1 kubectl apply → all Succeeded",
                fmt(k["tasks_per_s"], 1),
                *blank,
                "",
                "",
                f"{k['apply_to_all_succeeded_s']:.2f} s (apply {k.get('apply_s', 0):.2f} s)",
            )
        else:
            t.add_row(
                "Task objects/s (local control plane)", "n/a", *blank, "", "", str(k.get("error", ""))[:80]
            )
    return t


def _scale_rows(t: Table, res: dict[str, Any], key: str, blank: list[str]) -> None:
    sc = res.get(key)
    if sc is None:
        return
    sp = sc.get("spread", {})
    where = f" over {sp['handlers']:,} handlers, {sp['queues']} queues" if sp.get("handlers", 1) > 1 else ""
    prefix = f"spread_{sp['handlers']}h_{sp['queues']}q_" if where else ""
    t.add_section()
    if "error" in sc and not sc.get("by_size"):
        t.add_row("scale (pending tasks)", "n/a", *blank, "", "", sc["error"][:80])
    for label, r in sc.get("by_size", {}).items():
        t.add_row(
            f"jobs/s 2×50, {label} pending{where} + {sc.get('finished', 0) / 1e6:g}M finished",
            fmt(r.get("jobs_per_s")),
            *blank,
            "",
            "",
            "runs: " + ", ".join(fmt(x) for x in r.get("jobs_per_s_runs", [])),
        )
    for rkey, v in res.items():
        if rkey.startswith(prefix + "scale_ratio_"):
            hi, lo = rkey.removeprefix(prefix + "scale_ratio_").split("_vs_")
            target = ""
            if rkey in TARGETS:
                target = f"≥{TARGETS[rkey]:g} {mark(res['target_status'].get(rkey, 'n/a'))}"
            t.add_row(f"  jobs/s {hi} pending ÷ {lo} pending", fmt(v, 2), *blank, "", "", target)
    for label, r in sc.get("by_size", {}).items():
        c = r.get("claim")
        if not c:
            continue
        shape = "index scan, no seq scan" if r.get("plan_ok_every_run") else "[red]NOT index-only[/red]"
        t.add_row(
            f"  claim EXPLAIN ANALYZE, {label} pending: ms",
            fmt(c["median_execution_ms"], 2),
            *blank,
            "",
            "",
            f"{shape}; cost {c['total_cost']:.0f}; buffers hit {c['median_shared_hit_blocks']:.0f} "
            f"read {c['median_shared_read_blocks']:.0f}",
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="5,000 jobs, 1 repetition, 10 s latency, 30 s idle, scale 1 rep"
    )
    p.add_argument("--jobs", type=int, help="jobs per throughput run (full 20,000; quick 5,000)")
    p.add_argument("--reps", type=int, help="repetitions (full 3; quick 1)")
    p.add_argument("--workers", type=_ints, default=[1, 2], help="worker processes, e.g. 1,2")
    p.add_argument("--concurrency", type=_ints, default=[10, 50], help="concurrency per process, e.g. 10,50")
    p.add_argument(
        "--systems",
        type=_names,
        default=None,
        help="kubetasks,pgqueuer,procrastinate (default), and pgqueuer-nocap (default in full mode): "
        "pgqueuer without --max-concurrent-tasks, batch C, unbounded jobs in flight",
    )
    p.add_argument(
        "--measure",
        type=_names,
        default=[
            "throughput",
            "ceiling",
            "latency",
            "idle",
            "scale",
            "recovery",
            "contention",
            "soak",
            "k8s",
        ],
        help="any of throughput,ceiling,latency,idle,scale,recovery,contention,soak,k8s,profile "
        "(default: all but profile)",
    )
    p.add_argument(
        "--scale-sizes",
        type=_ints,
        default=[10_000, 100_000, 1_000_000],
        help="pending tasks for the scale measurement (default 10000,100000,1000000)",
    )
    p.add_argument("--scale-finished", type=int, default=1_000_000, help="finished tasks in the table")
    p.add_argument("--scale-drain", type=int, help="tasks drained per scale run (full 50,000; quick 20,000)")
    p.add_argument("--scale-reps", type=int, help="scale repetitions (full 5; quick 1)")
    p.add_argument(
        "--scale-spread",
        type=_spread,
        default=(10_000, 100),
        help="HxQ: scale again with the pending tasks spread over H handlers and Q queues "
        "(default 10000x100; 1x1: skip)",
    )
    p.add_argument("--recovery-tasks", type=int, default=50)
    p.add_argument(
        "--recovery-ttl", type=float, default=5.0, help="KUBETASKS_LEASE_TTL for the recovery runs"
    )
    p.add_argument(
        "--recovery-heartbeat",
        type=float,
        default=1.0,
        help="KUBETASKS_HEARTBEAT_INTERVAL for the recovery runs",
    )
    p.add_argument("--k8s-tasks", type=int, default=200, help="Task objects in the one kubectl apply")
    p.add_argument("--contention-seconds", type=float, help="per enqueuer count and mode (full 10; quick 3)")
    p.add_argument("--soak-minutes", type=float, help="sustained load (full 10; quick 1.5)")
    p.add_argument("--soak-long-tx-seconds", type=float, help="the long transaction (full 120; quick 30)")
    p.add_argument(
        "--ceiling-modes",
        type=_names,
        default=["txn", "stmt"],
        help="txn: BEGIN; SELECT ... FOR UPDATE SKIP LOCKED; UPDATE; COMMIT. stmt: one UPDATE",
    )
    p.add_argument("--latency-seconds", type=float, help="full 30; quick 10")
    p.add_argument("--latency-rate", type=float, default=50.0)
    p.add_argument(
        "--latency-peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure pgqueuer and procrastinate latency too",
    )
    p.add_argument("--idle-seconds", type=float, help="full 60; quick 30")
    p.add_argument("--idle-processes", type=int, default=4)
    p.add_argument(
        "--idle-peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the peers' idle cost too (default: full mode only)",
    )
    p.add_argument(
        "--pgq-batch-size",
        type=int,
        default=None,
        help="pgqueuer batch size (default C/2, the most --max-concurrent-tasks C allows)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also sample one kubetasks worker with py-spy during a 2x50 drain (>= 50,000 jobs)",
    )
    p.add_argument(
        "--kt-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for kubetasks workers (what-ifs: KUBETASKS_POOL_SIZE=20)",
    )
    p.add_argument(
        "--kt-setup-sql",
        action="append",
        default=[],
        metavar="SQL",
        help="what-if: SQL run on each kubetasks database after migrating (schema kubetasks)",
    )
    p.add_argument(
        "--admin-url", help="postgresql://superuser@host:port/postgres (default: kubetasks dev up)"
    )
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    a = p.parse_args(argv)
    a.jobs = a.jobs or (5000 if a.quick else 20000)
    a.reps = a.reps or (1 if a.quick else 3)
    a.latency_seconds = a.latency_seconds or (10.0 if a.quick else 30.0)
    a.idle_seconds = a.idle_seconds or (30.0 if a.quick else 60.0)
    a.scale_drain = a.scale_drain or (20000 if a.quick else 50000)
    a.scale_reps = a.scale_reps or (1 if a.quick else 5)
    a.contention_seconds = a.contention_seconds or (3.0 if a.quick else 10.0)
    a.soak_minutes = a.soak_minutes or (1.5 if a.quick else 10.0)
    a.soak_long_tx_seconds = a.soak_long_tx_seconds or (30.0 if a.quick else 120.0)
    if a.profile and "profile" not in a.measure:
        a.measure.append("profile")
    if a.systems is None:
        a.systems = ["kubetasks", "pgqueuer", "procrastinate"] + ([] if a.quick else ["pgqueuer-nocap"])
    if a.idle_peers is None:
        a.idle_peers = not a.quick
    if a.systems[0] != "kubetasks" and "kubetasks" in a.systems:
        a.systems.remove("kubetasks")
        a.systems.insert(0, "kubetasks")
    return a


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _spread(s: str) -> tuple[int, int]:
    h, _, q = s.partition("x")
    return int(h), int(q or 1)


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        res: dict[str, Any] = asyncio.run(main_async(a))
    else:
        res = uvloop.run(main_async(a))
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    console.print(report(res))
    prof = res.get("profile")
    if prof and "top_own_pct" in prof:
        console.print(
            f"py-spy, one kubetasks worker during a 2×50 drain ({prof['samples']} samples): "
            "% of busy samples, own | with callees"
        )
        for (f, pct), (g, pct2) in zip(prof["top_own_pct"][:15], prof["top_total_pct"][:15], strict=False):
            console.print(f"  {pct:5.1f} %  {f[:60]:60}  {pct2:5.1f} %  {g[:60]}", highlight=False)
    console.print(f"written: {a.output.relative_to(ROOT) if a.output.is_relative_to(ROOT) else a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
