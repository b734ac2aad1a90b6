"""Pausing a running task (issue 17 item 7), against a real PostgreSQL and real worker processes.

A running task asked to pause either pauses at a checkpoint its handler
chooses (the attempt uncharged) or, when its handler never looks, is paused
once the attempt ends instead of running again -- or, when that attempt
finished it, the request is recorded as moot. The request reaches the handler
through NOTIFY, or through the heartbeat when no notification arrives, and it
survives the worker being SIGKILLed. A pause written by an attempt that was
taken away is refused like any other stale outcome.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kubetasks import App, Pause, SyncTaskContext, TaskContext
from kubetasks.store import workers
from tests.integration.helpers import RunningWorker, read_sidelog, start_worker, stop, wait_for


async def wait_status(app: App, task_id: int, status: str, timeout: float = 15) -> None:
    async def done() -> bool:
        return (await app.get_task(task_id)).status == status

    await wait_for(done, timeout, f"task {task_id} to be {status}")


async def kinds(app: App, task_id: int) -> list[str]:
    return [e["kind"] for e in await app.get_events(task_id)]


def sync_checkpoints(task: SyncTaskContext) -> str:
    """A plain handler in its child process: pauses at the first checkpoint after it is asked."""
    for _ in range(400):
        if task.pause_requested:
            task.pause("sync checkpoint")
        time.sleep(0.05)
    return "never asked"


class Checkpoints:
    """A handler that looks at ``pause_requested`` between steps and pauses there when asked."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.steps: list[tuple[int, int]] = []  # (attempt, step) reached
        self.seen_at: list[float] = []  # loop time at which the request was seen

    async def __call__(self, task: TaskContext) -> str:
        self.started.set()
        loop = asyncio.get_running_loop()
        for step in range(400):
            self.steps.append((task.attempt, step))
            if task.pause_requested:
                self.seen_at.append(loop.time())
                raise Pause(f"stopped before step {step}")
            if task.attempt > 1 and step == 3:
                return "done on a later run"
            await asyncio.sleep(0.05)
        return "never asked"


@pytest.fixture
async def slow_beat_app(db_url: str) -> AsyncIterator[App]:
    """Heartbeats 10 s apart: a request seen sooner came through NOTIFY."""
    a = App(database_url=db_url, pod_id="pause-pod", heartbeat_interval=10.0, lease_ttl=30.0)
    await a.open()
    yield a
    await a.close()


async def test_handler_pauses_at_its_checkpoint_and_resume_runs_it_again(slow_beat_app: App) -> None:
    """Asked while it runs, the handler sees the request at its next checkpoint (through NOTIFY,
    long before a heartbeat), pauses there uncharged, and the task stays paused until resumed;
    then its handler runs again from the top and the task succeeds."""
    app = slow_beat_app
    h = Checkpoints()
    app.register("steps", h, max_attempts=1)
    async with RunningWorker(app) as w:
        tid = await app.enqueue("steps", {})
        await asyncio.wait_for(h.started.wait(), 10)
        asked_at = asyncio.get_running_loop().time()
        assert await app.pause_task(tid)
        rec = await app.get_task(tid)
        assert rec.status in ("running", "paused")
        await wait_status(app, tid, "paused")
        assert h.seen_at and h.seen_at[0] - asked_at < 2.0, "the request waited for a heartbeat"
        rec = await app.get_task(tid)
        assert rec.pause_outcome == "checkpoint" and rec.pause_requested_at is None
        assert rec.attempts_spent == 0, "a pause at a checkpoint is not charged"
        attempts = await app.get_attempts(tid)
        assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "paused")]
        assert "stopped before step" in attempts[0]["error"]
        ev = await app.get_events(tid)
        assert [e["kind"] for e in ev if e["kind"] in ("pause_requested", "paused")] == [
            "pause_requested", "paused"
        ]  # fmt: skip
        assert "at a checkpoint of attempt 1 (as asked)" in ev[-1]["detail"]
        assert w.stats.paused == 1 and w.stats.failed == 0
        # Paused means paused: nothing runs it again by itself.
        runs = len({a for a, _ in h.steps})
        await asyncio.sleep(1.0)
        assert len({a for a, _ in h.steps}) == runs == 1
        assert not await app.pause_task(tid), "a paused task has nothing left to pause"
        assert await app.resume_task(tid)
        await wait_status(app, tid, "succeeded")
    rec = await app.get_task(tid)
    assert rec.result == "done on a later run" and rec.attempt == 2 and rec.attempts_spent == 1
    assert rec.pause_outcome is None
    assert "resumed" in await kinds(app, tid)


async def test_handler_that_ignores_the_request_is_paused_after_its_attempt_not_retried(app: App) -> None:
    """A handler that never looks runs to its end; its failure would retry the task at once, but
    the task is paused instead (the attempt counted, as any failure's), and runs only when resumed."""
    go = asyncio.Event()
    runs: list[int] = []

    @app.task("ignores", max_attempts=5, retry_delay=0)
    async def ignores(task: TaskContext) -> str:
        runs.append(task.attempt)
        if task.attempt == 1:
            await go.wait()
            raise RuntimeError("flaky")
        return "second time lucky"

    async with RunningWorker(app) as w:
        tid = await app.enqueue("ignores", {})
        await wait_for(lambda: _true(runs == [1]), 10, "the first run")
        assert await app.pause_task(tid)
        assert (await app.get_task(tid)).pause_requested_at is not None
        go.set()
        await wait_status(app, tid, "paused")
        await asyncio.sleep(1.0)  # a retry would have started long since (retry_delay=0)
        assert runs == [1], "the task was retried although a pause was asked"
        rec = await app.get_task(tid)
        assert (
            rec.pause_outcome == "after_attempt"
            and rec.attempts_spent == 1
            and rec.error == "RuntimeError: flaky"
        )
        ev = await app.get_events(tid)
        tail = [e["kind"] for e in ev if e["kind"] in ("pause_requested", "retried", "paused")]
        assert tail == ["pause_requested", "retried", "paused"]
        assert "paused after attempt 1 ended" in ev[-1]["detail"]
        assert w.stats.paused == 0
        assert await app.resume_task(tid)
        await wait_status(app, tid, "succeeded")
    assert runs == [1, 2]


async def test_a_run_that_finishes_the_task_makes_the_request_moot(app: App) -> None:
    """Asked while its last attempt runs, a task that succeeds (or fails for good) keeps that end,
    and the request is recorded as moot."""
    go = asyncio.Event()

    @app.task("finishes")
    async def finishes(task: TaskContext) -> str:
        await go.wait()
        if task.payload.get("fail"):
            raise RuntimeError("no luck")
        return "done"

    async with RunningWorker(app):
        ok = await app.enqueue("finishes", {})
        bad = await app.enqueue("finishes", {"fail": True}, max_attempts=1)
        await wait_status(app, ok, "running")
        await wait_status(app, bad, "running")
        assert await app.pause_task(ok) and await app.pause_task(bad)
        go.set()
        await wait_status(app, ok, "succeeded")
        await wait_status(app, bad, "failed")
    for tid, st in ((ok, "succeeded"), (bad, "failed")):
        rec = await app.get_task(tid)
        assert rec.pause_outcome == "moot" and rec.pause_requested_at is None
        ev = [e for e in await app.get_events(tid) if e["kind"] == "pause_moot"]
        assert len(ev) == 1 and f"attempt 1 ended the task ({st})" in ev[0]["detail"]
    assert (await app.get_task(ok)).result == "done"


async def test_resume_withdraws_a_request_the_handler_has_not_acted_on(slow_beat_app: App) -> None:
    """resume_task on a running task asked to pause withdraws the request: the handler's flag
    clears again and the run ends as it would have."""
    app = slow_beat_app
    seen: list[bool] = []
    go = asyncio.Event()

    @app.task("watches")
    async def watches(task: TaskContext) -> str:
        while not go.is_set():
            seen.append(task.pause_requested)
            await asyncio.sleep(0.02)
        return "ended" if not task.pause_requested else "still asked"

    async with RunningWorker(app):
        tid = await app.enqueue("watches", {})
        await wait_status(app, tid, "running")
        assert await app.pause_task(tid)
        await wait_for(lambda: _true(bool(seen) and seen[-1]), 5, "the handler to see the request")
        assert await app.resume_task(tid)
        assert (await app.get_task(tid)).pause_requested_at is None
        await wait_for(lambda: _true(not seen[-1]), 5, "the handler to see it withdrawn")
        go.set()
        await wait_status(app, tid, "succeeded")
    rec = await app.get_task(tid)
    assert rec.result == "ended" and rec.pause_outcome is None
    assert not await app.resume_task(tid)


async def test_without_listen_the_heartbeat_delivers_the_request(db_url: str) -> None:
    """A worker with no LISTEN connection (transaction pooling, no direct URL) learns of the
    request from its next heartbeat, and the handler pauses at its checkpoint."""
    db = db_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(db_url)
    try:  # transaction pooling sends no search_path: the role must find the schema by itself
        await conn.execute(f"ALTER ROLE current_user IN DATABASE {db} SET search_path = kubetasks, public")
    finally:
        await conn.close()
    app = App(
        database_url=db_url, database_pooling="transaction", pod_id="poll-pod",
        heartbeat_interval=0.5, lease_ttl=3.0, poll_interval=0.2,
    )  # fmt: skip
    await app.open()
    try:
        h = Checkpoints()
        app.register("steps", h)
        async with RunningWorker(app):
            tid = await app.enqueue("steps", {})
            await asyncio.wait_for(h.started.wait(), 10)
            assert await app.pause_task(tid)
            await wait_status(app, tid, "paused", timeout=10)
        assert (await app.get_task(tid)).pause_outcome == "checkpoint"
        assert [a["outcome"] for a in await app.get_attempts(tid)] == ["paused"]
    finally:
        await app.close()
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(f"ALTER ROLE current_user IN DATABASE {db} RESET search_path")
        finally:
            await conn.close()


async def test_a_sync_handler_sees_the_request_in_its_child_process(app: App) -> None:
    """A plain handler, in its child process, sees pause_requested and pauses at its checkpoint."""
    app.register("plain.steps", sync_checkpoints)
    async with RunningWorker(app):
        tid = await app.enqueue("plain.steps", {})
        await wait_status(app, tid, "running")
        assert await app.pause_task(tid)
        await wait_status(app, tid, "paused")
    rec = await app.get_task(tid)
    assert rec.pause_outcome == "checkpoint" and rec.attempts_spent == 0
    assert [(a["outcome"], a["error"]) for a in await app.get_attempts(tid)] == [
        ("paused", "sync checkpoint")
    ]


async def test_a_pause_from_an_attempt_taken_away_is_refused(db_url: str) -> None:
    """A handler that pauses after its run was taken away (its pod declared gone) writes nothing:
    the pause is fenced out like any stale outcome, and the task stays as recovery left it."""
    app = App(database_url=db_url, pod_id="fenced-pod", heartbeat_interval=30.0, lease_ttl=90.0)
    await app.open()
    go = asyncio.Event()

    @app.task("late")
    async def late(task: TaskContext) -> str:
        await go.wait()
        raise Pause("too late")

    try:
        async with RunningWorker(app) as w:
            tid = await app.enqueue("late", {}, max_attempts=3)
            await wait_status(app, tid, "running")
            # The Pod watcher's path: the pod is gone, its workers dead, their tasks recovered.
            await app.store.pool.execute("SELECT kubetasks.release_pod('fenced-pod', 'pod deleted (test)')")
            assert (await app.get_task(tid)).status == "pending"
            go.set()
            await wait_for(lambda: _true(w.stats.fenced_out >= 1), 10, "the pause to be fenced out")
            rec = await app.get_task(tid)
            assert rec.status == "pending" and rec.pause_outcome is None
            assert "paused" not in [a["outcome"] for a in await app.get_attempts(tid)]
            ev = await app.get_events(tid)
            assert [e["detail"] for e in ev if e["kind"] == "fenced_out"] == ["outcome paused"]
            assert "paused" not in [e["kind"] for e in ev]
    finally:
        await app.close()


async def test_pause_runs_is_fenced_on_attempt_and_worker(app: App) -> None:
    """The checkpoint pause writes only a row that is still this attempt's, of this worker, running."""
    go = asyncio.Event()

    @app.task("held")
    async def held(task: TaskContext) -> None:
        await go.wait()

    async with RunningWorker(app) as w:
        tid = await app.enqueue("held", {})
        await wait_status(app, tid, "running")
        rec = await app.get_task(tid)
        wid = w.worker_id
        other = await app.store.pool.fetchval("SELECT gen_random_uuid()")
        for worker_id, attempt in ((wid, rec.attempt + 1), (wid, rec.attempt - 1), (other, rec.attempt)):
            rows = await workers.pause_runs(
                app.store, worker_id=worker_id, task_ids=[tid], attempts=[attempt], reasons=[None]
            )
            assert rows == []
        assert (await app.get_task(tid)).status == "running"
        rows = await workers.pause_runs(
            app.store, worker_id=wid, task_ids=[tid], attempts=[rec.attempt], reasons=["now"]
        )
        assert [r["id"] for r in rows] == [tid]
        assert (await app.get_task(tid)).status == "paused"
        go.set()


# -- real processes ------------------------------------------------------------------------


def _true(v: bool) -> Any:
    async def f() -> bool:
        return v

    return f()


async def _row(db_url: str, tid: int) -> asyncpg.Record:
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow("SELECT * FROM kubetasks.tasks WHERE id = $1", tid)
        assert row is not None
        return row
    finally:
        await conn.close()


async def test_the_request_survives_a_sigkilled_worker(db_url: str, tmp_path: Path) -> None:
    """A worker process SIGKILLed while its task is asked to pause: the task, recovered when the
    pod's next process registers, is paused -- not pending, not run again -- and runs once resumed."""
    side = tmp_path / "side.log"
    app = App(database_url=db_url, strict_handlers=False)
    await app.open()
    first = start_worker(db_url, pod="kill-pod", sidelog=side, log_path=tmp_path / "w1.log")
    second = None
    try:
        tid = await app.enqueue("side.sleep", {"s": 3600})

        async def started() -> bool:
            return any(k == "start" and t == tid for k, t, *_ in read_sidelog(side))

        await wait_for(started, 30, "the handler to start")
        assert await app.pause_task(tid)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert (await _row(db_url, tid))["status"] == "running", "nothing recovered it yet"
        # The pod's container restarts: its new process supersedes the dead one at once.
        second = start_worker(db_url, pod="kill-pod", sidelog=side, log_path=tmp_path / "w2.log")
        await wait_status(app, tid, "paused", timeout=30)
        row = await _row(db_url, tid)
        assert row["pause_outcome"] == "after_attempt" and row["pause_requested_at"] is None
        ev = [e["kind"] for e in await app.get_events(tid)]
        assert ev[-2:] == ["recovered", "paused"]
        await asyncio.sleep(1.5)
        starts = [a for k, t, a, *_ in read_sidelog(side) if k == "start" and t == tid]
        assert starts == [1], "the recovered task ran again although a pause was asked"
        await app.store.pool.execute(
            "UPDATE kubetasks.tasks SET payload = '{\"s\": 0.1}' WHERE id = $1", tid
        )  # the next run is short
        assert await app.resume_task(tid)
        await wait_status(app, tid, "succeeded", timeout=30)
        assert [a for k, t, a, *_ in read_sidelog(side) if k == "end" and t == tid] == [2]
    finally:
        if second is not None:
            stop(second)
        await app.close()


async def test_a_process_worker_pauses_at_a_checkpoint_and_an_ignoring_one_after(
    db_url: str, tmp_path: Path
) -> None:
    """In a `kubetasks worker` process: side.sleep with checkpoints pauses there; side.sleep without
    them that fails at its end is paused instead of retried."""
    side = tmp_path / "side.log"
    app = App(database_url=db_url, strict_handlers=False)
    await app.open()
    proc = start_worker(db_url, pod="proc-pod", sidelog=side, log_path=tmp_path / "w.log")
    try:
        looks = await app.enqueue("side.sleep", {"s": 60, "checkpoints": True})
        ignores = await app.enqueue("side.sleep", {"s": 1.5, "fail": True}, max_attempts=5, retry_delay=0)
        await wait_status(app, looks, "running", 30)
        await wait_status(app, ignores, "running", 30)
        assert await app.pause_task(looks) and await app.pause_task(ignores)
        await wait_status(app, looks, "paused")
        await wait_status(app, ignores, "paused")
        lines = read_sidelog(side)
        assert [k for k, t, *_ in lines if t == looks] == ["start", "paused"]
        assert [k for k, t, *_ in lines if t == ignores] == ["start", "end"]
        assert (await app.get_task(looks)).pause_outcome == "checkpoint"
        assert (await app.get_task(ignores)).pause_outcome == "after_attempt"
    finally:
        stop(proc)
        await app.close()


async def test_pause_and_resume_a_running_task_from_the_cli(db_url: str) -> None:
    """`kubetasks tasks pause` on a running task says it asked, `tasks get` shows the request and
    then what became of it, `tasks resume` withdraws it or releases the paused task."""
    from tests.integration.test_cli_operations import kt, ok

    app = App(database_url=db_url, pod_id="cli-pod", heartbeat_interval=0.5, lease_ttl=2.0)
    await app.open()
    h = Checkpoints()
    app.register("steps", h)
    go = asyncio.Event()

    @app.task("deaf")
    async def deaf(task: TaskContext) -> str:
        await go.wait()
        return "done"

    def cli(*args: str) -> Any:
        return asyncio.to_thread(kt, db_url, "tasks", *args)

    try:
        async with RunningWorker(app):
            busy = await app.enqueue("deaf", {})
            await wait_status(app, busy, "running")
            out = ok(await cli("pause", str(busy)))
            assert f"task {busy} is running: asked to pause" in out
            shown = json.loads(ok(await cli("get", str(busy), "-o", "json")))
            assert shown["pause_requested_at"] and "pause_requested" in [e["kind"] for e in shown["events"]]
            assert f"task {busy} is running: no longer asked to pause" in ok(await cli("resume", str(busy)))
            go.set()
            await wait_status(app, busy, "succeeded")

            tid = await app.enqueue("steps", {})
            await asyncio.wait_for(h.started.wait(), 10)
            ok(await cli("pause", str(tid)))
            await wait_status(app, tid, "paused")
            shown = json.loads(ok(await cli("get", str(tid), "-o", "json")))
            assert shown["pause_outcome"] == "checkpoint" and shown["status"] == "paused"
            assert [a["outcome"] for a in shown["attempts"]] == ["paused"]
            again = await cli("pause", str(tid))
            assert again.returncode == 1 and f"task {tid} is paused: nothing to pause" in again.stdout
            assert f"task {tid} resumed" in ok(await cli("resume", str(tid)))
            await wait_status(app, tid, "succeeded")
            again = await cli("resume", str(tid))
            assert again.returncode == 1 and "not paused, nor asked to pause" in again.stdout
    finally:
        await app.close()


async def test_a_workflow_parent_asked_to_pause_stays_paused_when_its_children_end(app: App) -> None:
    """A parent asked to pause that then waits for its children is paused rather than left waiting:
    its children ending do not wake it, and once resumed it collects their results."""
    go = asyncio.Event()

    @app.task("kid")
    async def kid(task: TaskContext) -> int:
        await go.wait()
        return int(task.payload["n"])

    @app.task("parent")
    async def parent(task: TaskContext) -> int:
        kids = [await task.spawn("kid", {"n": n}) for n in range(3)]
        for _ in range(500):  # polls the flag, as a handler's checkpoint does
            if task.pause_requested or task.attempt > 1:
                break
            await asyncio.sleep(0.02)
        return sum(await task.wait(kids))  # ignores the request: suspends for its children

    async with RunningWorker(app):
        tid = await app.enqueue("parent", {})
        await wait_status(app, tid, "running")
        assert await app.pause_task(tid) == "requested"
        await wait_status(app, tid, "paused")
        assert (await app.get_task(tid)).pause_outcome == "after_attempt"
        go.set()
        kids = (await app.find_tasks(parent=tid)).items
        for k in kids:
            await wait_status(app, k.id, "succeeded")
        await asyncio.sleep(0.5)
        assert (await app.get_task(tid)).status == "paused", "a child's end woke a paused parent"
        assert await app.resume_task(tid) == "resumed"
        await wait_status(app, tid, "succeeded")
    assert (await app.get_task(tid)).result == 3
