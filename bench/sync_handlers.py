"""Plain (``def``) handlers in child processes: start-up latency and memory.

    python bench/sync_handlers.py                  # concurrency 10 (the chart's default)
    python bench/sync_handlers.py --concurrency 50

This module owns the sync-handler measurements (kubetasks/subprocs.py):

* pool, in this process, no database: fork-server start (spawn + import of
  bench/apps/sync_app.py), a cold child (fork request -> child says hello),
  a warm run (a no-op handler on an idle child: run message -> result back),
  and ``concurrency`` runs started at once on a cold pool until all returned;
* latency through a real worker process (C=10): enqueue -> handler start of a
  no-op ``def`` handler against its ``async def`` twin, one job at a time at
  20/s after a warm-up (same host clock, like run.py's latency);
* memory: a real worker process at ``--concurrency`` C running C ``def``
  handlers at once (each waits on ``task.cancelled``), RSS / PSS / USS from
  /proc/<pid>/smaps_rollup of the worker, its fork server and every child.
  PSS counts a page shared by k processes as 1/k in each, so the PSS sum is
  what the pod's memory limit sees of these processes.

Prints a table and writes bench/results/sync_handlers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from tests.support import connect, until  # noqa: E402

from bench.apps import sync_app  # noqa: E402
from kubetasks import App, EnqueueRequest, TaskContext, devenv, subprocs  # noqa: E402
from kubetasks.store import migrate  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


# -- pool, in process ---------------------------------------------------------------


async def pool_figures(concurrency: int) -> dict[str, Any]:
    app = App(database_url="postgresql://bench@127.0.0.1:1/none")
    app.register("noop", sync_app.noop)

    def ctx(i: int) -> TaskContext:
        return TaskContext(id=i, handler="noop", queue="default", payload={}, attempt=1, max_attempts=1)

    pool = subprocs.Pool(app, max_idle=concurrency)
    t0 = time.perf_counter()
    await pool.start()
    server_s = time.perf_counter() - t0
    cold = []
    for _ in range(20):
        t = time.perf_counter()
        child = await pool._spawn()
        cold.append(time.perf_counter() - t)
        child.kill()
    warm = []
    for i in range(500):
        t = time.perf_counter()
        assert await pool.run(sync_app.noop, ctx(i)) == i
        warm.append(time.perf_counter() - t)
    await pool.close()

    burst = subprocs.Pool(app, max_idle=concurrency)
    await burst.start()
    t = time.perf_counter()
    await asyncio.gather(*(burst.run(sync_app.noop, ctx(i)) for i in range(concurrency)))
    burst_s = time.perf_counter() - t
    await burst.close()
    return {
        "server_start_ms": ms(server_s),
        "cold_child_ms_p50": ms(statistics.median(cold)),
        "cold_child_ms_p95": ms(pct(cold, 95)),
        "warm_run_ms_p50": ms(statistics.median(warm)),
        "warm_run_ms_p99": ms(pct(warm, 99)),
        f"burst_{concurrency}_cold_ms": ms(burst_s),
    }


# -- a real worker -----------------------------------------------------------------


def start_worker(url: str, concurrency: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    e = dict(os.environ)
    e.update(KUBETASKS_DATABASE_URL=url, PYTHONPATH=str(ROOT), KUBETASKS_POD_ID=f"bench-{os.getpid()}")
    e.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "kubetasks", "worker", "--app", "bench.apps.sync_app:app",
         "--concurrency", str(concurrency)],
        cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def wait_registered(url: str, timeout: float = 60) -> None:
    conn = await connect(url)
    try:
        active = "SELECT count(*) FROM workers WHERE status = 'active'"
        await until(lambda: conn.fetchval(active), timeout, "the worker to register")
    finally:
        await conn.close()


async def latency(url: str, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for handler in ("sync.latency", "async.latency"):
        path = tmp / f"{handler}.lat"
        proc = start_worker(url, 10, {"BENCH_LATENCY_FILE": str(path)})
        app = App(database_url=url, strict_handlers=False)
        try:
            await wait_registered(url)
            for i in range(120):
                await app.enqueue(handler, {"t": time.time(), "w": i < 20})
                await asyncio.sleep(0.05)
            await until(
                lambda p=path: len(p.read_text().splitlines() if p.exists() else []) >= 120,
                30, f"{handler}: every job to run",
            )  # fmt: skip
        finally:
            await app.close()
            proc.terminate()
            proc.wait(30)
        lat = [float(line.split()[0]) for line in path.read_text().splitlines() if line.split()[1] == "0"]
        out[handler] = {
            "p50_ms": ms(statistics.median(lat)),
            "p95_ms": ms(pct(lat, 95)),
            "p99_ms": ms(pct(lat, 99)),
        }
    return out


def tree(root: int) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def mem(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"rss_kib": fields["Rss"], "pss_kib": fields["Pss"], "uss_kib": uss}


async def memory(url: str, concurrency: int, tmp: Path) -> dict[str, Any]:
    started = tmp / "started"
    started.mkdir()
    proc = start_worker(url, concurrency, {"BENCH_STARTED_DIR": str(started)})
    app = App(database_url=url, strict_handlers=False)
    try:
        await wait_registered(url)
        await asyncio.sleep(1.0)
        kids = tree(proc.pid)
        idle = {"worker": mem(proc.pid), "server": [mem(p) for p in kids.get(proc.pid, [])]}
        ids = await app.enqueue_many([EnqueueRequest("sync.hold", {"s": 60}) for _ in range(concurrency)])
        await until(lambda: len(list(started.iterdir())) >= concurrency, 60, "every task to start")
        await asyncio.sleep(1.0)
        kids = tree(proc.pid)
        servers = kids.get(proc.pid, [])
        children = [c for s in servers for c in kids.get(s, [])]
        rows = {
            "worker": mem(proc.pid),
            "server": [mem(p) for p in servers],
            "children": [mem(c) for c in children],
        }
        total = {
            k: rows["worker"][k] + sum(r[k] for r in rows["server"]) + sum(r[k] for r in rows["children"])
            for k in ("rss_kib", "pss_kib", "uss_kib")
        }
        for tid in ids:
            await app.cancel(tid)
    finally:
        await app.close()
        proc.terminate()
        proc.wait(30)
    return {
        "concurrency": concurrency,
        "idle_before_tasks": idle,
        "worker": rows["worker"],
        "server": rows["server"],
        "children": len(rows["children"]),
        "child_rss_kib_each": statistics.median(r["rss_kib"] for r in rows["children"]),
        "child_pss_kib_each": statistics.median(r["pss_kib"] for r in rows["children"]),
        "child_uss_kib_each": statistics.median(r["uss_kib"] for r in rows["children"]),
        "total": total,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--admin-url", default=None)
    args = parser.parse_args()
    admin = args.admin_url or devenv.up().admin_url()
    name = f"kbench_sync_{os.getpid()}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    url = admin.rsplit("/", 1)[0] + f"/{name}"
    results: dict[str, Any] = {}
    try:
        await migrate(url)
        results["pool"] = await pool_figures(args.concurrency)
        with tempfile.TemporaryDirectory() as d:
            results["latency"] = await latency(url, Path(d))
        with tempfile.TemporaryDirectory() as d:
            results["memory"] = await memory(url, args.concurrency, Path(d))
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()
    out = ROOT / "bench" / "results" / "sync_handlers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
