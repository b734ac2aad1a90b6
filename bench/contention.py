"""Enqueue contention (issue 18 item 3): E concurrent enqueuers, one task per transaction.

This module owns the ``contention`` measurement. Every transaction that sends a
NOTIFY takes one cluster-wide lock at commit and holds it through the commit's
WAL flush, so notifying transactions commit one at a time. For E in 1, 8, 32
and each way of waking workers, a fresh migrated database gets E connections
(spread over up to 4 processes, each an ``App`` calling ``app.enqueue`` in a
loop: the public path, one INSERT per transaction) for ``seconds``, with one
idle session LISTENing on the channel as a worker would. Figures: tasks/s,
enqueue latency p50/p99, and the ratio of each mode to "none" at the same E.

Modes (one active worker row of the queue in each, so the trigger has someone
to wake): ``waiting`` (the worker waits for work: every enqueue notifies, as
every enqueue did before migration 0014), ``busy`` (every slot of the worker
taken: since 0014 no notification), ``none`` (the trigger disabled: the
ceiling without wake-ups), and two with a real worker process (concurrency
50) running every task as it comes: ``drain`` (as shipped: while claims keep
finding work it looks on its own for ``KUBETASKS_CLAIM_LINGER``, 5 ms, and
enqueues do not notify) and ``drain_nolinger`` (``KUBETASKS_CLAIM_LINGER=0``:
the flag is set after every short claim, so enqueues notify while it runs).
Each run also counts the notifications the listening session received, and
a drain run checks that every task enqueued has succeeded. ``synchronous_commit`` is
the server's default (on) unless ``--synchronous-commit`` says otherwise: the
serialisation is of commit flushes, so turning it off hides it.

    python bench/contention.py --seconds 10            # prints a table, writes bench/results/contention.json
    python bench/contention.py --child ...             # one enqueuer process (internal)
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
from tests import support  # noqa: E402

from bench import harness, systems  # noqa: E402
from bench.harness import Databases, Workers  # noqa: E402

ENQUEUERS = (1, 8, 32)
MODES = ("waiting", "busy", "none", "drain", "drain_nolinger")
DRAIN_MODES = {"drain": {}, "drain_nolinger": {"KUBETASKS_CLAIM_LINGER": "0"}}
DRAIN_CONCURRENCY = 50
PROCESSES_MAX = 4
TRIGGER = "tasks_notify_enqueued"


async def _child(dsn: str, conns: int, seconds: float) -> dict[str, Any]:
    """``conns`` loops enqueuing one task per transaction until ``seconds`` pass."""
    from kubetasks import App

    app = App(database_url=dsn, pool_size=conns, pod_id="bench-enqueuer")

    @app.task("noop", max_attempts=1)
    async def noop(_t: Any) -> None:
        return None

    await app.open()
    lat: list[float] = []
    end = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            await app.enqueue("noop")
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(loop() for _ in range(conns)))
    await app.close()
    return {"n": len(lat), "lat_ms": [round(1000 * x, 3) for x in lat]}


async def run_one(
    dbs: Databases, enqueuers: int, mode: str, seconds: float, sync_commit: str
) -> dict[str, Any]:
    from kubetasks.store import migrate

    out: dict[str, Any] = {"enqueuers": enqueuers, "mode": mode, "seconds": seconds}
    async with dbs.fresh("enq") as (name, url):
        await migrate(url)
        conn = await asyncpg.connect(url)
        listener = await asyncpg.connect(url)
        try:
            if mode == "none":
                await conn.execute(f"ALTER TABLE kubetasks.tasks DISABLE TRIGGER {TRIGGER}")
            if sync_commit:
                await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = {sync_commit}')
            out["synchronous_commit"] = sync_commit or await conn.fetchval("SHOW synchronous_commit")
            notified = [0]

            def count(*_: object) -> None:
                notified[0] += 1

            await listener.add_listener("kubetasks_enqueued", count)
            async with contextlib.AsyncExitStack() as stack:
                if mode in DRAIN_MODES:
                    kt = systems.Kubetasks(extra_env=DRAIN_MODES[mode])
                    worker = Workers(
                        [kt.worker_argv(DRAIN_CONCURRENCY)], [kt.worker_env(url, 0)], f"contention-{mode}"
                    )
                    await stack.enter_async_context(harness.running(worker))
                    worker.go()
                    registered = "SELECT count(*) = 1 FROM kubetasks.workers WHERE status = 'active'"
                    await support.until(
                        lambda: conn.fetchval(registered), 30, "the draining worker registered"
                    )
                else:
                    await conn.execute(
                        "INSERT INTO kubetasks.workers (worker_id, pod_id, epoch, queues, concurrency, "
                        "lease_expires_at, waiting) VALUES (gen_random_uuid(), 'bench-worker', 1, "
                        "'{default}', 10, now() + interval '1 day', $1)",
                        mode != "busy",
                    )
                notified[0] = 0
                procs = min(enqueuers, PROCESSES_MAX)
                shares = [enqueuers // procs + (1 if i < enqueuers % procs else 0) for i in range(procs)]
                x0 = await dbs.xacts(name)
                argv = [harness.PY, str(Path(__file__)), "--child", "--dsn", url, "--seconds", str(seconds)]
                children = [
                    await asyncio.create_subprocess_exec(
                        *argv, "--conns", str(k), stdout=asyncio.subprocess.PIPE
                    )
                    for k in shares
                ]
                outs = [await c.communicate() for c in children]
                if any(c.returncode for c in children):
                    raise RuntimeError(f"an enqueuer process failed: {[c.returncode for c in children]}")
                got = [json.loads(o[0]) for o in outs]
                out["xacts"] = await dbs.xacts(name) - x0
                out["notifications"] = notified[0]
                counted = await conn.fetchval("SELECT count(*) FROM kubetasks.tasks")
                if mode in DRAIN_MODES:
                    with contextlib.suppress(AssertionError):  # counted below
                        done = "SELECT NOT EXISTS (SELECT 1 FROM kubetasks.tasks WHERE status <> 'succeeded')"
                        await support.until(lambda: conn.fetchval(done), 60, "every task succeeded")
                    out["succeeded"] = await conn.fetchval(
                        "SELECT count(*) FROM kubetasks.tasks WHERE status = 'succeeded'"
                    )
        finally:
            await listener.close()
            await conn.close()
    lat = [x for g in got for x in g["lat_ms"]]
    n = sum(g["n"] for g in got)
    out["tasks"] = n
    if counted != n:
        out["error"] = f"{n} enqueues returned but {counted} rows are there"
    elif "succeeded" in out and out["succeeded"] != n:
        out["error"] = f"{n} tasks enqueued but {out['succeeded']} succeeded within 60 s"
    out["tasks_per_s"] = round(n / seconds, 1)
    out["notifications_per_task"] = round(out["notifications"] / n, 3) if n else None
    out["p50_ms"] = round(harness.percentile(lat, 50), 2) if lat else None
    out["p99_ms"] = round(harness.percentile(lat, 99), 2) if lat else None
    return out


async def measure(
    dbs: Databases,
    seconds: float,
    log: Callable[[str], None],
    *,
    enqueuers: tuple[int, ...] = ENQUEUERS,
    modes: tuple[str, ...] = MODES,
    reps: int = 1,
    sync_commit: str = "",
) -> dict[str, Any]:
    """Every (E, mode) ``reps`` times, interleaved; medians and ratios to mode "none"."""
    runs: dict[str, list[dict[str, Any]]] = {f"{m}_{e}": [] for e in enqueuers for m in modes}
    for rep in range(reps):
        for e in enqueuers:
            for m in modes if rep % 2 == 0 else tuple(reversed(modes)):
                r = await run_one(dbs, e, m, seconds, sync_commit)
                runs[f"{m}_{e}"].append(r)
                log(
                    f"contention rep {rep + 1}/{reps} {e:>2} enqueuers, {m:7} {r['tasks_per_s']:,.0f} "
                    f"tasks/s (p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms)"
                )
    table: dict[str, dict[str, Any]] = {}
    for e in enqueuers:
        row: dict[str, Any] = {}
        for m in modes:
            rs = runs[f"{m}_{e}"]
            row[f"{m}_tasks_per_s"] = round(statistics.median(r["tasks_per_s"] for r in rs), 1)
            row[f"{m}_p99_ms"] = round(statistics.median(r["p99_ms"] or 0 for r in rs), 2)
            row[f"{m}_notifications_per_task"] = statistics.median(
                r["notifications_per_task"] or 0 for r in rs
            )
            errors = [r["error"] for r in rs if r.get("error")]
            if errors:
                row[f"{m}_error"] = errors[0]
        for m in modes:
            if m != "none" and row.get("none_tasks_per_s"):
                row[f"{m}_vs_none"] = round(row[f"{m}_tasks_per_s"] / row["none_tasks_per_s"], 2)
        table[str(e)] = row
    return {"seconds": seconds, "reps": reps, "by_enqueuers": table, "runs": runs}


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Headline keys for latest.json's top level."""
    out: dict[str, Any] = {}
    for e, row in res.get("by_enqueuers", {}).items():
        for k, v in row.items():
            if k.endswith(("_tasks_per_s", "_vs_none", "_notifications_per_task")):
                out[f"enqueue_{e}x_{k}"] = v
    return out


def table_lines(res: dict[str, Any]) -> list[str]:
    first = next(iter(res["by_enqueuers"].values()))
    modes = [k.removesuffix("_tasks_per_s") for k in first if k.endswith("_tasks_per_s")]
    head = f"{'enqueuers':>9} " + " ".join(
        f"{m + ' tasks/s':>16} {m + ' p99 ms':>13} {'notify/task':>11}" for m in modes
    )
    head += "".join(f" {m + ' ÷ none':>14}" for m in modes if m != "none")
    lines = [head]
    for e, row in res["by_enqueuers"].items():
        cells = (
            f"{row[m + '_tasks_per_s']:>16,.0f} {row[m + '_p99_ms']:>13.2f} "
            f"{row.get(m + '_notifications_per_task', 0):>11.2f}"
            for m in modes
        )
        line = f"{e:>9} " + " ".join(cells)
        ratios = (row.get(m + "_vs_none") for m in modes if m != "none")
        line += "".join(f" {r:>14.2f}" if r is not None else f" {'–':>14}" for r in ratios)
        lines.append(line)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--enqueuers", default=",".join(map(str, ENQUEUERS)))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--synchronous-commit", default="", help="on, off, ... (default: the server's)")
    p.add_argument("--admin-url")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "contention.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dsn", help=argparse.SUPPRESS)
    p.add_argument("--conns", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(asyncio.run(_child(a.dsn, a.conns, a.seconds))))
        return 0
    admin = a.admin_url
    if not admin:
        from kubetasks import devenv

        admin = devenv.up().admin_url("postgres")

    async def go() -> dict[str, Any]:
        dbs = Databases(admin)
        res = await measure(
            dbs,
            a.seconds,
            lambda m: print(m, flush=True),
            enqueuers=tuple(int(x) for x in a.enqueuers.split(",")),
            modes=tuple(a.modes.split(",")),
            reps=a.reps,
            sync_commit=a.synchronous_commit,
        )
        res["machine"] = await harness.machine_info(admin)
        return res

    res = asyncio.run(go())
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=2, default=str) + "\n")
    for line in table_lines(res):
        print(line)
    print(f"written: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
