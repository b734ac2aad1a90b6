"""Progress with a stage and metadata, and tasks selected by when they are due (issue 17 item 8).

Against a real PostgreSQL: a handler's ``progress(..., stage=, metadata=)``
lands in the task row (fenced, as every write of a running task), a change of
stage is an event, the listings and ``tasks get`` show it, and a new attempt
starts without it; bad input is refused naming the field and the limit, in
the handler, and the database holds the same bounds. ``run_after`` /
``run_before`` select tasks by ``run_at`` in ``list_tasks``, ``find_tasks``,
counts and every bulk action -- node-resque's ``delDelayed``: cancel or delete
the delayed tasks of a time range -- from Python and the CLI.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from kubetasks import App, Retry, SyncTaskContext, TaskContext, ValidationError
from kubetasks.validation import PROGRESS_METADATA_MAX_BYTES
from tests.integration.helpers import RunningWorker, wait_for
from tests.integration.test_cli_operations import kt, ok
from tests.support import until


async def wait_status(app: App, task_id: int, status: str, timeout: float = 15) -> None:
    async def done() -> bool:
        return (await app.get_task(task_id)).status == status

    await wait_for(done, timeout, f"task {task_id} to be {status}")


def sync_reports(task: SyncTaskContext) -> list[str]:
    """A plain handler: one good report, then the bad ones refused in its own process."""
    task.progress(40, "hashing", stage="hash", metadata={"chunks": 4})
    refused = []
    for kw in ({"stage": "two words"}, {"metadata": {"x": "y" * PROGRESS_METADATA_MAX_BYTES}}):
        try:
            task.progress(50, **kw)  # type: ignore[arg-type]
        except ValidationError as exc:
            refused.append(str(exc))
    return refused


async def test_progress_stage_and_metadata_are_recorded_shown_and_reset(app: App, db_url: str) -> None:
    """A report's stage and metadata reach the row, a change of stage is an event, `tasks list`
    and `tasks get` show them, and the next attempt starts without them."""
    step = asyncio.Event()
    second_started = asyncio.Event()
    go_on = asyncio.Event()
    finish = asyncio.Event()

    @app.task("staged", max_attempts=2, retry_delay=0)
    async def staged(task: TaskContext) -> str:
        if task.attempt == 2:
            second_started.set()
            await finish.wait()
            return "done"
        await task.progress(30, "downloading", stage="download", metadata={"bytes": 10})
        await task.progress(30, "downloading", stage="download", metadata={"bytes": 20})  # coalesced
        await task.flush_progress()
        await asyncio.sleep(0.6)  # past the coalescing interval: the next report is written on its own
        await task.progress(70, "resizing", stage="resize", metadata={"done": 3, "of": 5})
        await task.flush_progress()
        step.set()
        await go_on.wait()
        raise Retry(0, "once more")

    async with RunningWorker(app):
        tid = await app.enqueue("staged", {})
        await asyncio.wait_for(step.wait(), 10)

        async def resized() -> bool:
            return (await app.get_task(tid)).progress == 70

        # Under a loaded CI the flushed write can land after the handler moved on.
        await until(resized, 10, "the 70% report written")
        rec = await app.get_task(tid)
        assert (rec.progress, rec.progress_message, rec.progress_stage, rec.progress_metadata) == (
            70, "resizing", "resize", {"done": 3, "of": 5}
        )  # fmt: skip
        assert (await app.find_tasks(handler="staged")).items[0].progress_stage == "resize"
        listed = ok(await asyncio.to_thread(kt, db_url, "tasks", "list", "--handler", "staged"))
        assert "70% resize" in listed
        shown = json.loads(ok(await asyncio.to_thread(kt, db_url, "tasks", "get", str(tid), "-o", "json")))
        assert shown["progress_stage"] == "resize" and shown["progress_metadata"] == {"done": 3, "of": 5}
        details = [e["detail"] for e in await app.get_events(tid) if e["kind"] == "progress"]
        assert details == ["30% [download]: downloading", "70% [resize]: resizing"]
        go_on.set()
        await asyncio.wait_for(second_started.wait(), 10)
        rec = await app.get_task(tid)
        assert rec.attempt == 2 and rec.status == "running"
        assert (rec.progress, rec.progress_stage, rec.progress_metadata) == (None, None, None)
        finish.set()
        await wait_status(app, tid, "succeeded")


async def test_bad_progress_is_refused_naming_the_field_and_limit(app: App) -> None:
    """A stage that is not a name, metadata that is not an object or over 4 KiB: ValidationError in
    the handler, naming the field and the limit; the last good report stays."""
    errors: list[str] = []

    @app.task("reporter")
    async def reporter(task: TaskContext) -> None:
        await task.progress(10, "fine", stage="load", metadata={"rows": 1})
        bad: list[dict[str, Any]] = [
            {"stage": "has spaces"},
            {"stage": "x" * 64},
            {"stage": 7},
            {"metadata": ["not", "an", "object"]},
            {"metadata": {"blob": "x" * PROGRESS_METADATA_MAX_BYTES}},
            {"metadata": {"t": datetime.now()}},
        ]
        for kw in bad:
            try:
                await task.progress(20, "bad", **kw)
            except ValidationError as exc:
                errors.append(str(exc))

    async with RunningWorker(app):
        tid = await app.enqueue("reporter", {})
        await wait_status(app, tid, "succeeded")
    assert errors[0].startswith("stage: 'has spaces' has forbidden characters")
    assert errors[1] == "stage: must be at most 63 characters, got 64"
    assert errors[2] == "stage: must be a string, got int"
    assert errors[3] == "metadata: must be a JSON object (a dict), got list"
    size = len('{"blob":""}') + PROGRESS_METADATA_MAX_BYTES
    assert errors[4] == f"metadata: is {size} bytes as JSON; the limit is 4096 bytes"
    assert errors[5].startswith("metadata: is not JSON-serialisable")
    rec = await app.get_task(tid)
    assert (rec.progress, rec.progress_message, rec.progress_stage, rec.progress_metadata) == (
        10, "fine", "load", {"rows": 1}
    )  # fmt: skip


async def test_a_sync_handler_reports_stage_and_metadata(app: App) -> None:
    """A plain handler's reports cross from its child process with their stage and metadata, and
    its bad ones are refused there, naming the field."""
    app.register("plain.reports", sync_reports)
    async with RunningWorker(app):
        tid = await app.enqueue("plain.reports", {})
        await wait_status(app, tid, "succeeded")
    rec = await app.get_task(tid)
    assert (rec.progress_stage, rec.progress_metadata) == ("hash", {"chunks": 4})
    assert rec.result[0].startswith("stage: 'two words' has forbidden characters")
    size = len('{"x":""}') + PROGRESS_METADATA_MAX_BYTES
    assert rec.result[1] == f"metadata: is {size} bytes as JSON; the limit is 4096 bytes"


async def test_the_database_holds_the_progress_bounds(app: App) -> None:
    """Constraints in the database as well: no stage that is not a name, no metadata that is not a
    JSON object, none over 8 KiB as jsonb text (the API's 4 KiB of compact JSON fits)."""
    conn = await asyncpg.connect(app.settings.database_url, server_settings={"search_path": "kubetasks"})
    try:
        tid = await conn.fetchval("INSERT INTO tasks (handler) VALUES ('h') RETURNING id")
        for column, value in (
            ("progress_stage", "'two words'"),
            ("progress_metadata", "'[1, 2]'::jsonb"),
            ("progress_metadata", f"jsonb_build_object('x', repeat('y', {8192}))"),
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(f"UPDATE tasks SET {column} = {value} WHERE id = $1", tid)
        biggest = {"x": "y" * (PROGRESS_METADATA_MAX_BYTES - 8)}
        await conn.execute(
            "UPDATE tasks SET progress_stage = 'a.b:c-d_e', progress_metadata = $2::text::jsonb "
            "WHERE id = $1",
            tid, json.dumps(biggest),
        )  # fmt: skip
    finally:
        await conn.close()


# -- when tasks are due ------------------------------------------------------------------------


async def db_now(app: App) -> datetime:
    now: datetime = await app.store.pool.fetchval("SELECT now()")
    return now


async def test_delayed_tasks_by_run_at_range_listed_counted_cancelled_deleted(db_url: str) -> None:
    """node-resque delDelayed: the delayed tasks due in a time range are listed, counted, cancelled
    (a dry run first) and deleted by run_at, and nothing outside the range is touched."""
    app = App(database_url=db_url, strict_handlers=False)
    async with app:
        now = await db_now(app)
        due_now = [await app.enqueue("imp.a", {}) for _ in range(3)]
        in_1h = [await app.enqueue("imp.a", {}, delay=3600) for _ in range(4)]
        in_2h = [await app.enqueue("imp.a", {}, delay=7200) for _ in range(2)]
        lo, hi = now + timedelta(minutes=30), now + timedelta(minutes=90)
        page = await app.list_tasks(run_after=lo, run_before=hi)
        assert page.total == 4 and {t.id for t in page.items} == set(in_1h)
        assert (await app.list_tasks(run_before=lo)).total == 3
        found = await app.find_tasks(status="pending", run_after=lo)
        assert {t.id for t in found.items} == set(in_1h + in_2h)
        assert await app.count_tasks("status", run_after=lo, run_before=hi) == {"pending": {"pending": 4}}
        dry = await app.bulk_cancel(status="pending", run_after=lo, run_before=hi, dry_run=True)
        assert dry.count == 4 and dry.up_to_id == max(in_1h)
        res = await app.bulk_cancel(status="pending", run_after=lo, run_before=hi, up_to_id=dry.up_to_id)
        assert res.count == 4
        statuses = {t: (await app.get_task(t)).status for t in due_now + in_1h + in_2h}
        assert [statuses[t] for t in in_1h] == ["cancelled"] * 4
        assert {statuses[t] for t in due_now + in_2h} == {"pending"}
        deleted = await app.bulk_delete(status="cancelled", run_after=lo, run_before=hi)
        assert deleted.count == 4 and (await app.list_tasks()).total == 5


async def test_due_filters_from_the_cli_and_bad_input(db_url: str) -> None:
    """`--run-after`/`--run-before` on `tasks list`, `tasks count` and `bulk`; a bad value exits 2
    naming the option, and changes nothing."""
    app = App(database_url=db_url, strict_handlers=False)
    async with app:
        now = await db_now(app)
        soon = [await app.enqueue("imp.b", {}, delay=600) for _ in range(3)]
        await app.enqueue("imp.b", {})
        after = (now + timedelta(minutes=5)).isoformat()

        def cli(*args: str) -> Any:
            return asyncio.to_thread(kt, db_url, *args)

        listed = json.loads(ok(await cli("tasks", "list", "--run-after", after, "--json")))
        assert {i["id"] for i in listed["items"]} == set(soon)
        counted = json.loads(
            ok(await cli("tasks", "count", "--by", "status", "--run-after", after, "-o", "json"))
        )
        assert counted == {"pending": {"pending": 3}}
        dry = await cli("bulk", "cancel", "--status", "pending", "--run-after", after, "--dry-run")
        assert ok(dry).strip() == "3"
        assert "3 task(s) cancelled" in ok(
            await cli("bulk", "cancel", "--status", "pending", "--run-after", after)
        )
        for args, says in (
            (["bulk", "cancel", "--run-after", "tomorrow"], "--run-after: must be an ISO 8601"),
            (
                ["bulk", "delete", "--run-before", "2026-01-01T00:00:00"],
                "--run-before: must be timezone-aware",
            ),
            (
                ["tasks", "list", "--run-after", after, "--run-before", after],
                "--run-after: must be earlier than run_before",
            ),
        ):
            bad = await cli(*args)
            assert bad.returncode == 2 and says in bad.stderr, (args, bad.stderr)
        assert (await app.list_tasks(status="pending")).total == 1
        with pytest.raises(ValidationError, match="run_before: must be timezone-aware"):
            await app.list_tasks(run_before=datetime(2026, 1, 1))
        with pytest.raises(ValidationError, match="run_after: must be earlier than run_before"):
            await app.bulk_delete(run_after=now, run_before=now)
