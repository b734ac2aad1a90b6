"""Plain (non-async) handlers for the sync-handler tests: each runs in a child process.

Every handler appends to the side log (SIDELOG) with O_APPEND: one line per
step, ``kind task attempt worker pid unix_time``, so a test can tell what a
child did and when, after the worker wrote the task's outcome.
"""

from __future__ import annotations

import os
import time

from kubetasks import App, EnqueueRequest, Fail, LeaseLost, Retry, SyncTaskContext

app = App()
LOG = os.environ.get("SIDELOG", "/tmp/kubetasks-sync-sidelog")


def side(kind: str, task: SyncTaskContext) -> None:
    line = f"{kind} {task.id} {task.attempt} {task.worker_id} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task("sync.quick")
def quick(task: SyncTaskContext) -> dict[str, int]:
    side("start", task)
    time.sleep(float(task.payload.get("s", 0)))
    side("end", task)
    return {"n": int(task.payload.get("n", 0)), "pid": os.getpid()}


@app.task("sync.echo", max_attempts=4, priority=7)
def echo(task: SyncTaskContext) -> dict[str, object]:
    """What a plain handler receives."""
    return {
        "id": task.id, "handler": task.handler, "queue": task.queue, "payload": task.payload,
        "attempt": task.attempt, "max_attempts": task.max_attempts, "priority": task.priority,
        "tags": task.tags, "worker_id": task.worker_id, "pod_id": task.pod_id,
        "parent_id": task.parent_id, "is_last_attempt": task.is_last_attempt,
        "cancelled": task.cancelled.is_set(), "pid": os.getpid(),
    }  # fmt: skip


@app.task("sync.spin", max_attempts=1)
def spin(task: SyncTaskContext) -> None:
    """Ignores cancellation: writes a side effect every 20 ms for ``s`` seconds (default: for ever)."""
    side("start", task)
    end = time.monotonic() + float(task.payload.get("s", 1e9))
    while time.monotonic() < end:
        side("tick", task)
        time.sleep(0.02)
    side("end", task)


@app.task("sync.stubborn", max_attempts=1)
def stubborn(task: SyncTaskContext) -> None:
    """Reports progress every 20 ms and carries on when told the task is no longer its own."""
    side("start", task)
    end = time.monotonic() + float(task.payload.get("s", 1e9))
    i = 0
    while time.monotonic() < end:
        side("tick", task)
        i += 1
        try:
            task.progress(i % 100, "working")
        except LeaseLost:
            side("told", task)
        time.sleep(0.02)
    side("end", task)


@app.task("sync.coop", max_attempts=1)
def coop(task: SyncTaskContext) -> str:
    """Stops when told: waits on ``task.cancelled`` and returns."""
    side("start", task)
    while not task.cancelled.wait(0.02):
        side("tick", task)
    side("stopped", task)
    return "stopped"


@app.task("sync.progress")
def progress(task: SyncTaskContext) -> int:
    n = int(task.payload.get("n", 1000))
    for i in range(n + 1):
        task.progress(i * 100 / n, f"step {i}")
    return n


@app.task("sync.steer", max_attempts=3)
def steer(task: SyncTaskContext) -> str:
    how = task.payload.get("how")
    if how == "retry" and task.attempt == 1:
        raise Retry(delay=0.1, message="busy, again")
    if how == "fail":
        raise Fail("bad input, no point retrying")
    if how == "raise":
        raise KeyError("missing")
    if how == "exit":
        os._exit(3)
    if how == "not-json":
        return object()  # type: ignore[return-value]
    return f"ok {task.attempt}"


@app.task("sync.flow")
def flow(task: SyncTaskContext) -> dict[str, int]:
    """A workflow from a plain function: children spawned and waited for through the worker."""
    # The children outlast the way to wait(): finished ones would let wait() return at once,
    # and the test checks that waiting suspends the parent.
    kids = task.spawn_many([EnqueueRequest("sync.quick", {"n": i, "s": 2}) for i in range(3)])
    results = task.wait(kids)
    side("flow-end", task)
    return {"sum": sum(r["n"] for r in results), "children": len(kids)}


@app.periodic("0 0 1 1 *", name="sync.yearly")
def yearly(task: SyncTaskContext) -> int:
    """A plain periodic under Forbid: the job lock is taken in the worker, the function runs in a child."""
    return os.getpid()


@app.task("sync.audit")
def audited(task: SyncTaskContext) -> str:
    """Records a checkpoint from the child (issue 17 item 8)."""
    task.audit("child_checkpoint", "from a def handler", {"pid": os.getpid()})
    return "ok"
