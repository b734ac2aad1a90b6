"""Checkpoints and counts (issue 17 item 8), against a real PostgreSQL.

``task.audit(code, message, metadata)`` from async and plain ``def`` handlers
is an event of kind ``checkpoint`` with the run's attempt, worker and pod,
queryable across tasks; a write for a run that no longer holds its task is
refused; bad input names the field. ``count_tasks`` counts by tag, handler,
queue or status under any task filter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from kubetasks import App, TaskContext, ValidationError, audit
from tests.integration.apps import syncapp
from tests.integration.helpers import ROOT, RunningWorker, wait_for


def new_app(db_url: str) -> App:
    return App(database_url=db_url, pod_id="audit-pod", heartbeat_interval=0.5, lease_ttl=2.0)


async def done(app: App, task_id: int, timeout: float = 30) -> Any:
    async def finished() -> bool:
        return (await app.get_task(task_id)).status in ("succeeded", "failed")

    await wait_for(finished, timeout, f"task {task_id} to finish")
    return await app.get_task(task_id)


async def test_checkpoints_from_async_and_def_handlers(
    db_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDELOG", str(tmp_path / "side.log"))
    app = new_app(db_url)

    async def importer(task: TaskContext) -> str:
        await task.audit("payload_validated", "Payload validated", {"source": task.payload["source"]})
        await task.audit("remote_call_started")
        return "imported"

    async def sloppy(task: TaskContext) -> None:
        await task.audit("Not Snake Case")

    app.register("importer", importer)
    app.register("sloppy", sloppy, max_attempts=1)
    app.register("sync.audit", syncapp.audited)
    async with app, RunningWorker(app):
        a = await done(app, await app.enqueue("importer", {"source": "crm"}))
        b = await done(app, await app.enqueue("sync.audit"), timeout=60)
        bad = await done(app, await app.enqueue("sloppy"))
    assert (a.status, b.status) == ("succeeded", "succeeded")
    assert bad.status == "failed" and "code: must be lowercase snake_case" in (bad.error or "")
    page = await app.query_events(kind="checkpoint")
    got = sorted((e["task_id"], json.loads(e["detail"])["code"]) for e in page.items)
    assert got == [(a.id, "payload_validated"), (a.id, "remote_call_started"), (b.id, "child_checkpoint")]
    first = next(e for e in page.items if json.loads(e["detail"])["code"] == "payload_validated")
    assert json.loads(first["detail"]) == {
        "code": "payload_validated", "message": "Payload validated", "metadata": {"source": "crm"},
    }  # fmt: skip
    assert (first["attempt"], first["pod_id"], first["worker_id"]) == (1, "audit-pod", a.worker_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "kubetasks", "events", "--kind", "checkpoint", "--task", str(b.id), "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (ev,) = json.loads(res.stdout)["items"]
    assert json.loads(ev["detail"])["metadata"]["pid"] != os.getpid()


async def test_a_checkpoint_of_a_run_that_lost_its_task_is_refused(app: App) -> None:
    store = app.store
    detail = audit.checkpoint_detail("late_write")
    # No such running attempt: the task was never claimed by this worker.
    async with App(database_url=app.settings.database_url, strict_handlers=False) as other:
        task_id = await other.enqueue("anything")
    assert not await audit.record_checkpoint(store, task_id, 1, str(uuid.uuid4()), detail)
    assert (await app.query_events(task=task_id, kind="checkpoint")).items == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("",), "code: must be lowercase snake_case"),
        (("a" * 64,), "code: must be lowercase snake_case"),
        (("ok", 5), "message: must be text"),
        (("ok", "m" * 1001), "message: must be text"),
        (("ok", None, [1]), "metadata: must be a JSON object"),
        (("ok", None, {"blob": "x" * 9000}), "metadata: "),
    ],
)
def test_bad_checkpoints_name_the_field(args: tuple[Any, ...], says: str) -> None:
    with pytest.raises(ValidationError) as exc:
        audit.checkpoint_detail(*args)
    assert str(exc.value).startswith(says), str(exc.value)


async def test_counts_by_tag_handler_queue_and_status(db_url: str) -> None:
    async with App(database_url=db_url, strict_handlers=False) as app:
        await app.enqueue("a", tags=["batch-1", "img"])
        await app.enqueue("a", tags=["batch-1"], queue="q2")
        await app.enqueue("b", tags=["img"])
        tid = await app.enqueue("b")
        await app.cancel(tid)
        assert await app.count_tasks("tag") == {"batch-1": {"pending": 2}, "img": {"pending": 2}}
        assert await app.count_tasks("handler") == {"a": {"pending": 2}, "b": {"pending": 1, "cancelled": 1}}
        assert await app.count_tasks("queue", status="pending") == {
            "default": {"pending": 2},
            "q2": {"pending": 1},
        }
        assert await app.count_tasks("tag", handler="a") == {"batch-1": {"pending": 2}, "img": {"pending": 1}}
        assert await app.count_tasks("status") == {"pending": {"pending": 3}, "cancelled": {"cancelled": 1}}
        with pytest.raises(ValidationError, match=r"^by: must be one of handler, queue, tag, status"):
            await app.count_tasks("pod")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "kubetasks", "tasks", "count", "--by", "tag", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"batch-1": {"pending": 2}, "img": {"pending": 2}}
