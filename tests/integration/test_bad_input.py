"""Refused input writes nothing to the database."""

from __future__ import annotations

import pytest

from kubetasks import App, EnqueueRequest, ValidationError
from tests.handlers import noop


async def test_refused_enqueues_write_nothing(app: App) -> None:
    """Every refused enqueue leaves the tasks table empty; a refused batch inserts none of its rows."""
    app.register("ok", noop)
    bad_calls = [
        dict(handler="missing"),
        dict(handler="ok", payload={"s": {1}}),
        dict(handler="ok", payload={"s": "\x00"}),
        dict(handler="ok", payload={"s": "x" * (2 * 1024 * 1024)}),
        dict(handler="ok", delay=-5),
        dict(handler="ok", timeout=10**8),
        dict(handler="ok", priority=10**6),
        dict(handler="ok", max_attempts=-1),
        dict(handler="ok", queue="q" * 64),
    ]
    for kw in bad_calls:
        handler = kw.pop("handler")
        with pytest.raises(ValidationError):
            await app.enqueue(handler, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="priority"):
        await app.enqueue_many([EnqueueRequest("ok"), EnqueueRequest("ok", priority=5000)])
    assert (await app.list_tasks()).total == 0


async def test_database_constraints_hold_without_python(app: App) -> None:
    """CHECK constraints and domains refuse a bad row even when Python's checks are bypassed."""
    import asyncpg

    with pytest.raises(asyncpg.CheckViolationError, match="priority_range"):
        await app.store.pool.execute("INSERT INTO tasks (handler, priority) VALUES ('h', 5000)")
    with pytest.raises(asyncpg.CheckViolationError, match="task_status_known"):
        await app.store.pool.execute("INSERT INTO tasks (handler, status) VALUES ('h', 'weird')")
    with pytest.raises(asyncpg.CheckViolationError, match="handler_name"):
        await app.store.pool.execute("INSERT INTO tasks (handler) VALUES ('bad name')")
    with pytest.raises(asyncpg.CheckViolationError, match="queue_name"):
        await app.store.pool.execute("INSERT INTO tasks (handler, queue) VALUES ('h', 'bad queue')")
    # The names are domains (0022): checked where a value becomes one, so by an update
    # that sets the column as well as by an insert.
    await app.store.pool.execute("INSERT INTO tasks (handler, queue) VALUES ('h', 'q')")
    with pytest.raises(asyncpg.CheckViolationError, match="handler_name"):
        await app.store.pool.execute("UPDATE tasks SET handler = 'h' || chr(10)")
    with pytest.raises(asyncpg.CheckViolationError, match="queue_name"):
        await app.store.pool.execute("UPDATE tasks SET queue = repeat('q', 64)")
    assert await app.store.pool.fetchval("SELECT handler || '/' || queue FROM tasks") == "h/q"
