"""Real worker processes (`kubetasks worker`) against a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg

from kubetasks import App, EnqueueRequest
from tests.integration.helpers import ROOT, audit, start_worker, stop, wait_for


async def count_status(db_url: str, status: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM kubetasks.tasks WHERE status = $1", status))
    finally:
        await conn.close()


async def test_two_thousand_tasks_four_processes_each_exactly_once(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """2,000 tasks over 4 worker processes: every task's handler ends once and succeeds once."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    procs = [
        start_worker(db_url, pod=f"pod-{i}", sidelog=sidelog, concurrency=20, log_path=tmp_path / f"w{i}.log")
        for i in range(4)
    ]
    try:
        # Enqueue only once all four are up, so a slow process start cannot leave one idle.
        async def all_registered() -> bool:
            conn = await asyncpg.connect(db_url)
            try:
                n = await conn.fetchval("SELECT count(*) FROM kubetasks.workers WHERE status = 'active'")
            finally:
                await conn.close()
            return int(n) == 4

        await wait_for(all_registered, 60, "four registered workers")
        ids = await app.enqueue_many(
            [EnqueueRequest("side.work", {"n": i, "ms": [0, 5]}) for i in range(2000)]
        )

        async def drained() -> bool:
            return await count_status(db_url, "succeeded") == 2000

        await wait_for(drained, 120, "2,000 successes")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0, 0]
    result = await audit(db_url, ids, sidelog)
    assert result.lost == set()
    assert result.duplicated == set()
    assert result.unexpected == set()
    assert set(result.runs.values()) == {1}, "a handler ran to its end twice"
    assert len(result.runs) == 2000
    pods = {line.split()[4] for line in sidelog.read_text().splitlines()}
    assert pods == {"pod-0", "pod-1", "pod-2", "pod-3"}, "work was not shared"


async def test_sigterm_finishes_running_tasks_and_deregisters(app: App, db_url: str, tmp_path: Path) -> None:
    """SIGTERM: the worker stops claiming, lets running tasks end, and leaves no live lease."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    ids = await app.enqueue_many([EnqueueRequest("side.sleep", {"s": 1.0}) for _ in range(3)])
    proc = start_worker(db_url, pod="pod-term", sidelog=sidelog, concurrency=3, log_path=tmp_path / "w.log")
    try:

        async def all_running() -> bool:
            return await count_status(db_url, "running") == 3

        await wait_for(all_running, 20, "three running tasks")
    finally:
        code = stop(proc, signal.SIGTERM)
    assert code == 0
    for tid in ids:
        assert (await app.get_task(tid)).status == "succeeded"
    conn = await asyncpg.connect(db_url)
    try:
        live = await conn.fetchval(
            "SELECT count(*) FROM kubetasks.workers WHERE status IN ('active','stopping')"
        )
    finally:
        await conn.close()
    assert live == 0


async def test_a_graceful_stop_reports_no_lease_loss(app: App, db_url: str, tmp_path: Path) -> None:
    """SIGTERM ends a worker's lease on purpose: a heartbeat that lands after the worker
    deregistered must not report a lost lease (an ERROR that sends people looking for a fault).
    One process with one worker, and one with 20 workers sharing an event loop, whose stops take
    longer; heartbeats every 0.1 s, tasks running when the signal comes."""
    app.strict_handlers = False
    env = {
        "KUBETASKS_HEARTBEAT_INTERVAL": "0.1",
        "KUBETASKS_LEASE_TTL": "2",
        "FAULTS_HISTORY": str(tmp_path / "history.log"),
    }
    one = start_worker(
        db_url, pod="one", sidelog=tmp_path / "side.log", app="tests.faults.apps:app_v1", extra_env=env,
        log_path=tmp_path / "one.log",
    )  # fmt: skip
    with open(tmp_path / "many.log", "ab") as out:
        many = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.many_workers", "20", "many-"],
            cwd=ROOT,
            env={**os.environ, **env, "KUBETASKS_DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        async def count(sql: str) -> int:
            conn = await asyncpg.connect(db_url)
            try:
                return int(await conn.fetchval(sql))
            finally:
                await conn.close()

        # Tasks go in once all 21 workers are registered: whichever process started first would
        # otherwise drain them all before the other one serves.
        async def all_registered() -> bool:
            return await count("SELECT count(*) FROM kubetasks.workers WHERE status = 'active'") == 21

        await wait_for(all_registered, 60, "21 workers registered")
        await app.enqueue_many([EnqueueRequest("fx.work", {"n": i, "ms": [200, 800]}) for i in range(300)])

        async def all_busy() -> bool:
            n = await count(
                "SELECT count(DISTINCT w.worker_id) FROM kubetasks.workers w JOIN kubetasks.tasks t"
                " ON t.worker_id = w.worker_id AND t.status = 'running' WHERE w.status = 'active'"
            )
            return n == 21

        await wait_for(all_busy, 60, "21 workers running tasks")
    finally:
        codes = [stop(one), stop(many)]
    logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in ("one", "many")}
    bad = [
        f"{name}: {line}"
        for name, text in logs.items()
        for line in text.splitlines()
        if " ERROR " in line or " CRITICAL " in line or "lease lost" in line
    ]
    assert codes == [0, 0], logs
    assert logs["many"].count("stopped: WorkerStats") == 20, "not every worker stopped gracefully"
    assert bad == [], "\n".join(bad)
