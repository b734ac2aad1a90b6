"""Plain (non-async) handlers run in child processes that the worker kills.

Real worker processes run tests/integration/apps/syncapp.py against the real
PostgreSQL; the handlers write a side log (a line per step, with the time) so
each test can prove that nothing a handler did landed after the worker wrote
the task's failure, its cancel took effect, or it was handed back. With
handlers in threads (before), every one of these failed: a thread cannot be
stopped, and six of them filled the shared executor.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest
from tests.integration.apps import syncapp
from tests.integration.helpers import RunningWorker, start_worker, stop, wait_for

APP = "tests.integration.apps.syncapp:app"
KILL_WITHIN = 2.0  # seconds: the promise for timeouts, cancels and fencing


@dataclass(frozen=True)
class Line:
    kind: str
    task: int
    attempt: int
    worker: str
    pid: int
    at: float


def read_side(path: Path) -> list[Line]:
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().splitlines():
        kind, tid, attempt, worker, pid, at = raw.split()
        out.append(Line(kind, int(tid), int(attempt), worker, int(pid), float(at)))
    return out


def last_of(lines: list[Line], task: int) -> Line:
    mine = [ln for ln in lines if ln.task == task]
    assert mine, f"task {task} left no side effect: it never started"
    return max(mine, key=lambda ln: ln.at)


async def epoch(db_url: str, sql: str, *args: object) -> float:
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        value = await conn.fetchval(sql, *args)
    finally:
        await conn.close()
    assert value is not None, f"no value for {sql} {args}"
    return float(value)


async def finished_at(db_url: str, task: int) -> float:
    return await epoch(db_url, "SELECT extract(epoch FROM finished_at) FROM tasks WHERE id = $1", task)


async def wait_started(path: Path, tasks: list[int], timeout: float) -> None:
    async def started() -> bool:
        seen = {ln.task for ln in read_side(path) if ln.kind == "start"}
        return set(tasks) <= seen

    await wait_for(started, timeout, f"tasks {tasks} to start")


async def wait_status(app: App, task: int, status: str, timeout: float) -> None:
    async def reached() -> bool:
        return (await app.get_task(task)).status == status

    await wait_for(reached, timeout, f"task {task} to be {status}")


def worker(db_url: str, tmp_path: Path, pod: str, concurrency: int, **env: str) -> subprocess.Popen[bytes]:
    return start_worker(
        db_url, pod=pod, sidelog=tmp_path / "side.log", concurrency=concurrency, app=APP,
        extra_env=env, log_path=tmp_path / f"{pod}.log",
    )  # fmt: skip


async def test_timeout_kills_the_handler_before_the_failure_is_written(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """A handler that ignores its 1 s timeout is killed within 2 s of it, and before its failure is
    written: no side effect of it is later than the failure, or appears afterwards."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    proc = worker(db_url, tmp_path, "timeouts", 4)
    try:
        ids = await app.enqueue_many([EnqueueRequest("sync.spin", {"s": 6}, timeout=1) for _ in range(3)])
        for tid in ids:
            await wait_status(app, tid, "failed", 30)
        settled = read_side(side)
        await asyncio.sleep(1.5)  # a handler still alive would have written ~75 more lines by now
        later = read_side(side)
        for tid in ids:
            rec = await app.get_task(tid)
            assert rec.error == "timed out after 1s", rec.error
            started = last_of([ln for ln in later if ln.kind == "start"], tid).at
            last = last_of(later, tid)
            done = await finished_at(db_url, tid)
            assert last.at < done, (
                f"task {tid}: a side effect {last.at - done:.3f}s after its failure was written"
            )
            assert last.at - started <= 1 + KILL_WITHIN, (
                f"task {tid}: its handler ran {last.at - started:.2f}s, past its 1 s timeout + {KILL_WITHIN}s"
            )
        assert len(later) == len(settled), f"{len(later) - len(settled)} side effects after the failures"
    finally:
        stop(proc)


async def test_quick_sync_tasks_start_while_slow_ones_run(app: App, db_url: str, tmp_path: Path) -> None:
    """With 12 slots, six slow sync handlers do not keep six quick ones from starting (they used to
    queue behind them in a six-thread executor and fail "timed out" without a start)."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    proc = worker(db_url, tmp_path, "slots", 12)
    try:
        slow = await app.enqueue_many([EnqueueRequest("sync.spin", {"s": 8}, timeout=30) for _ in range(6)])
        await wait_started(side, slow, 30)
        quick = await app.enqueue_many(
            [EnqueueRequest("sync.quick", {"n": i}, timeout=2, max_attempts=1) for i in range(6)]
        )
        for tid in quick:
            await wait_status(app, tid, "succeeded", 20)
        starts = read_side(side)
        for tid in quick:
            claimed = await epoch(
                db_url, "SELECT extract(epoch FROM started_at) FROM tasks WHERE id = $1", tid
            )
            began = last_of([ln for ln in starts if ln.kind == "start"], tid).at
            assert began - claimed < 1.0, f"task {tid} started {began - claimed:.2f}s after it was claimed"
        for tid in slow:
            await app.cancel(tid)
    finally:
        stop(proc)


async def test_cancel_kills_the_handler_within_2s(app: App, db_url: str, tmp_path: Path) -> None:
    """app.cancel: a handler that polls ``task.cancelled`` returns at once; one that ignores it is
    killed within 2 s; neither leaves a side effect later than that."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    proc = worker(db_url, tmp_path, "cancels", 4)
    try:
        deaf = await app.enqueue("sync.spin", {"s": 8}, timeout=60)
        polite = await app.enqueue("sync.coop", {}, timeout=60)
        await wait_started(side, [deaf, polite], 30)
        await asyncio.sleep(0.2)
        assert await app.cancel(deaf) and await app.cancel(polite)
        cancelled_at = time.time()
        await asyncio.sleep(KILL_WITHIN + 1.5)
        lines = read_side(side)
        assert last_of(lines, deaf).at <= cancelled_at + KILL_WITHIN, (
            f"the handler of a cancelled task ran on {last_of(lines, deaf).at - cancelled_at:.2f}s"
        )
        stopped = [ln for ln in lines if ln.task == polite and ln.kind == "stopped"]
        assert stopped, "the cooperative handler never saw task.cancelled"
        assert stopped[0].at <= cancelled_at + 1.0
        assert last_of(lines, polite).kind == "stopped"
        for tid in (deaf, polite):
            assert (await app.get_task(tid)).status == "cancelled"
    finally:
        stop(proc)


async def test_task_taken_away_kills_the_handler_within_2s_of_the_fenced_write(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """The task is taken from the worker behind its back (as a peer's recovery would): the worker
    learns it at its next heartbeat (or a fenced progress write, whichever is first), and the
    handler, which ignores that, is killed within 2 s of it."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    proc = worker(db_url, tmp_path, "fenced", 2)
    try:
        tid = await app.enqueue("sync.stubborn", {"s": 8}, timeout=60)
        await wait_started(side, [tid], 30)
        await asyncio.sleep(0.3)
        conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
        try:
            taken_at = await conn.fetchval(
                "UPDATE tasks SET status = 'pending', worker_id = NULL, pod_id = NULL, "
                "run_at = now() + interval '1 hour' WHERE id = $1 AND status = 'running' "
                "RETURNING extract(epoch FROM clock_timestamp())::float8",
                tid,
            )
        finally:
            await conn.close()
        assert taken_at is not None
        learns_within = 0.5 * 1.1 + 0.5  # the test workers' heartbeat interval, jitter, a round trip
        await asyncio.sleep(learns_within + KILL_WITHIN + 1.0)
        last = last_of(read_side(side), tid)
        after = last.at - taken_at
        assert after <= learns_within + KILL_WITHIN, f"ran on {after:.2f}s after the task was taken away"
        assert last.kind != "end"
    finally:
        stop(proc)


async def test_graceful_shutdown_kills_the_handler_before_handing_back(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """SIGTERM past the shutdown grace: the task is handed back only once its handler's process is
    gone, so the next worker's run is the only one that ends and nothing of the first lands later."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    first = worker(db_url, tmp_path, "leaving", 2, KUBETASKS_SHUTDOWN_GRACE="1")
    second: subprocess.Popen[bytes] | None = None
    try:
        tid = await app.enqueue("sync.spin", {"s": 5}, timeout=60, max_attempts=1)
        await wait_started(side, [tid], 30)
        old = read_side(side)[0].worker
        assert stop(first, signal.SIGTERM, timeout=20) == 0
        events = await app.get_events(tid)
        released = [e for e in events if e["kind"] == "released"]
        assert released, f"not handed back: {[e['kind'] for e in events]}"
        handed_back = released[-1]["at"].timestamp()
        await asyncio.sleep(KILL_WITHIN)
        mine = [ln for ln in read_side(side) if ln.worker == old]
        assert max(ln.at for ln in mine) < handed_back, "the first run wrote after its task was handed back"
        second = worker(db_url, tmp_path, "arriving", 2)
        await wait_status(app, tid, "succeeded", 40)
        ends = [ln for ln in read_side(side) if ln.task == tid and ln.kind == "end"]
        assert len(ends) == 1 and ends[0].worker != old, ends
        assert (await app.get_task(tid)).attempts_spent == 1  # a graceful hand-back spends no attempt
        assert not [ln for ln in read_side(side) if ln.worker == old and ln.at >= handed_back]
    finally:
        stop(first)
        if second is not None:
            stop(second)


async def test_stopped_worker_cannot_leave_its_handler_running(app: App, db_url: str, tmp_path: Path) -> None:
    """A worker SIGSTOPped past its lease: its handler's process dies by the lease deadline, before a
    peer recovers the task, and stays dead after SIGCONT."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    frozen = worker(db_url, tmp_path, "frozen", 2)
    peer: subprocess.Popen[bytes] | None = None
    try:
        tid = await app.enqueue("sync.spin", {"s": 4}, timeout=60, max_attempts=3)
        await wait_started(side, [tid], 30)
        old = read_side(side)[0].worker
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        peer = worker(db_url, tmp_path, "peer", 2)

        async def recovered() -> bool:
            return any(ln.task == tid and ln.worker != old for ln in read_side(side))

        await wait_for(recovered, 30, "the peer to run the task")
        await asyncio.sleep(KILL_WITHIN)
        mine = [ln for ln in read_side(side) if ln.worker == old]
        theirs = min(ln.at for ln in read_side(side) if ln.task == tid and ln.worker != old)
        assert max(ln.at for ln in mine) < theirs, "both runs of the task were alive at once"
        assert max(ln.at for ln in mine) <= stopped_at + 2.0 + KILL_WITHIN  # lease TTL 2 s in tests
        frozen.send_signal(signal.SIGCONT)
        count = len(mine)
        await wait_status(app, tid, "succeeded", 30)
        await asyncio.sleep(1.0)
        assert len([ln for ln in read_side(side) if ln.worker == old]) == count
        ends = [ln for ln in read_side(side) if ln.task == tid and ln.kind == "end"]
        assert len(ends) == 1 and ends[0].worker != old
    finally:
        with_cont(frozen)
        stop(frozen)
        if peer is not None:
            stop(peer)


async def test_a_blocked_event_loop_does_not_kill_a_sync_handler_under_a_live_lease(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """An async handler holds the worker's event loop for 2 x the lease TTL while a sync handler
    runs in its child. The lease thread keeps renewing, so the child runs on to its end: no kill,
    no second attempt (the child once learnt its lease deadline from the event loop, and killed
    itself when the loop stopped passing it on)."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    proc = start_worker(
        db_url, pod="hog", sidelog=side, concurrency=2, app="tests.integration.apps.hogapp:app",
        log_path=tmp_path / "hog.log",
    )  # fmt: skip
    try:
        tid = await app.enqueue("sync.spin", {"s": 6}, timeout=60, max_attempts=1)
        await wait_started(side, [tid], 30)
        hog = await app.enqueue("hog.block", {"s": 4.0}, timeout=60)
        await wait_status(app, hog, "succeeded", 30)
        blocked_until = await finished_at(db_url, hog)
        await wait_for(lambda: _ended(app, tid), 30, f"task {tid} to end")
        task = await app.get_task(tid)
    finally:
        stop(proc)
    ticks = [ln.at for ln in read_side(side) if ln.task == tid]
    during = [t for t in ticks if blocked_until - 3.5 <= t <= blocked_until - 0.5]
    assert during, "the sync handler did not run while the loop was blocked: nothing was tested"
    assert (task.status, task.attempts_spent) == ("succeeded", 1), (task.status, task.error)
    assert [ln.kind for ln in read_side(side) if ln.task == tid].count("end") == 1
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 1.0


async def _ended(app: App, tid: int) -> bool:
    return (await app.get_task(tid)).status in ("succeeded", "failed")


def with_cont(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)


async def test_sigkilled_worker_takes_its_handlers_with_it(app: App, db_url: str, tmp_path: Path) -> None:
    """SIGKILL of the worker: its handlers' processes die with it (no orphan keeps writing)."""
    app.strict_handlers = False
    side = tmp_path / "side.log"
    proc = worker(db_url, tmp_path, "killed", 3)
    try:
        ids = await app.enqueue_many([EnqueueRequest("sync.spin", {"s": 8}, timeout=60) for _ in range(3)])
        await wait_started(side, ids, 30)
        proc.kill()
        proc.wait(10)
        killed_at = time.time()
        await asyncio.sleep(KILL_WITHIN + 0.5)
        lines = read_side(side)
        assert max(ln.at for ln in lines) <= killed_at + KILL_WITHIN
        pids = {ln.pid for ln in lines}
        assert not [p for p in pids if _alive(p)], "a handler's process outlived its worker"
    finally:
        stop(proc)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper has stopped running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_what_a_sync_handler_receives_and_how_it_ends(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identity and payload in, progress relayed and written, Retry/Fail kept, any other exception
    (or a dead process) a failure with its text and the child's traceback, a non-JSON result
    refused, and spawn/wait carried out by the worker."""
    monkeypatch.setenv("SIDELOG", str(tmp_path / "side.log"))
    app.add_tasks_from(syncapp.app)
    async with RunningWorker(app, concurrency=6) as w:
        echo = await app.enqueue("sync.echo", {"x": [1, "two"]}, tags=["a", "b"])
        steer = {
            how: await app.enqueue("sync.steer", {"how": how})
            for how in ("retry", "fail", "raise", "exit", "not-json")
        }
        prog = await app.enqueue("sync.progress", {"n": 2000})
        flow = await app.enqueue("sync.flow", {})
        yearly = await app.enqueue("sync.yearly", {})
        for tid in (echo, steer["retry"], prog, flow, yearly):
            await wait_status(app, tid, "succeeded", 60)
        for how in ("fail", "raise", "exit", "not-json"):
            await wait_status(app, steer[how], "failed", 60)
        stats = dict(w.subprocs.stats)

    got = (await app.get_task(echo)).result
    assert got["pid"] != os.getpid()
    assert {k: v for k, v in got.items() if k != "pid"} == {
        "id": echo, "handler": "sync.echo", "queue": "default", "payload": {"x": [1, "two"]},
        "attempt": 1, "max_attempts": 4, "priority": 7, "tags": ["a", "b"],
        "worker_id": str(w.worker_id), "pod_id": "test-pod",
        "parent_id": None, "is_last_attempt": False, "cancelled": False,
    }  # fmt: skip

    retried = await app.get_task(steer["retry"])
    assert (retried.result, retried.attempt) == ("ok 2", 2)
    failed = await app.get_task(steer["fail"])
    assert (failed.error, failed.attempt) == ("bad input, no point retrying", 1)
    raised = await app.get_task(steer["raise"])
    assert raised.error == "KeyError: 'missing'" and raised.attempt == 3
    assert raised.traceback is not None and 'raise KeyError("missing")' in raised.traceback
    assert "apps/syncapp.py" in raised.traceback
    died = await app.get_task(steer["exit"])
    assert died.error is not None and died.error.startswith(
        "SyncHandlerDied: the process running handler 'sync.steer'"
    )
    assert died.error.endswith("exited with code 3") and died.attempt == 3
    bad = await app.get_task(steer["not-json"])
    assert bad.attempt == 1 and bad.error is not None
    assert bad.error.startswith(
        "handler returned a result that cannot be stored: result: is not JSON-serialisable"
    )

    p = await app.get_task(prog)
    assert (p.result, p.progress, p.progress_message) == (2000, 100, "step 2000")
    progress_events = [e for e in await app.get_events(prog) if e["kind"] == "progress"]
    assert len(progress_events) < 100  # coalesced, not one write per call

    f = await app.get_task(flow)
    assert f.result == {"sum": 3, "children": 3}
    assert "suspended" in [e["kind"] for e in await app.get_events(flow)]
    assert stats["reused"] > 0  # children serve task after task
    assert (await app.get_task(yearly)).result not in (None, os.getpid())
