"""An example kubetasks app: the handlers `make demo` runs.

Run it with `kubetasks run --app examples.app:app` and enqueue from Python,
the CLI (`kubetasks enqueue images.resize --payload '{"image": "x.png"}'`) or,
with the operator, `kubectl apply -f examples/tasks/`.
"""

from __future__ import annotations

import asyncio
import hashlib

from kubetasks import App, Fail, Input, SyncTaskContext, TaskContext

app = App()


@app.task(
    "images.resize",
    queue="default",
    timeout=60,
    max_attempts=5,
    inputs={"image": Input(required=True), "width": Input(default=640)},
)
async def resize(task: TaskContext) -> dict[str, object]:
    """Pretend to fetch, resize and store an image, reporting progress as it goes."""
    for step, what in enumerate(("downloaded", "resized", "uploaded"), start=1):
        await asyncio.sleep(0.2)
        await task.progress(round(step * 100 / 3), what)
    return {"image": task.payload["image"], "width": task.payload["width"], "ok": True}


@app.task("reports.checksum", retry_delay=0.5)
def checksum(task: SyncTaskContext) -> str:
    """A plain function runs in a child process of the worker: hash some text."""
    return hashlib.sha256(str(task.payload.get("text", "")).encode()).hexdigest()[:16]


@app.task("flaky.fetch", max_attempts=4, retry_delay=0.3, backoff=2)
async def flaky_fetch(task: TaskContext) -> dict[str, int]:
    """Fails twice, then succeeds: retries with backoff are part of the model."""
    if task.attempt < 3:
        raise ConnectionError(f"upstream refused (attempt {task.attempt})")
    return {"attempts": task.attempt}


@app.task("orders.validate", max_attempts=3)
async def validate_order(task: TaskContext) -> str:
    if task.payload.get("total", 0) < 0:
        raise Fail("negative total: retrying would not help")
    return "valid"
