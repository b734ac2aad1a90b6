"""Real worker processes (`kubetasks worker`) against a real PostgreSQL."""

from __future__ import annotations

import signal
from pathlib import Path

import asyncpg

from kubetasks import App, EnqueueRequest
from tests.integration.helpers import audit, start_worker, stop, wait_for


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
