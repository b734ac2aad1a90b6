"""Task hooks (issue 17 item 9), with real workers against a real PostgreSQL.

Before/after/failure hooks, sync and async, in registration order, with the
arguments documented; a hook that raises or hangs changes nothing about the
task's outcome and is counted; hooks run around plain ``def`` handlers too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kubetasks import App, Blueprint, Fail, Retry, TaskContext, ValidationError, metrics
from tests.integration.apps import syncapp
from tests.integration.helpers import RunningWorker, wait_for


def new_app(db_url: str) -> App:
    return App(database_url=db_url, pod_id="hook-pod", heartbeat_interval=0.5, lease_ttl=2.0)


async def finished(app: App, task_id: int, timeout: float = 20) -> Any:
    async def done() -> bool:
        return (await app.get_task(task_id)).status in ("succeeded", "failed")

    await wait_for(done, timeout, f"task {task_id} to finish")
    return await app.get_task(task_id)


async def test_hooks_run_in_order_with_their_arguments(db_url: str) -> None:
    calls: list[tuple[Any, ...]] = []
    app = new_app(db_url)

    @app.before_task
    def first(task: TaskContext) -> None:
        calls.append(("before-1", task.handler, task.attempt))

    @app.before_task(timeout=1)
    async def second(task: TaskContext) -> None:
        await asyncio.sleep(0)
        calls.append(("before-2", task.handler, task.attempt))

    @app.after_task
    async def after(task: TaskContext, result: Any) -> None:
        calls.append(("after", task.handler, result))

    @app.on_task_failure
    def failure(task: TaskContext, error: BaseException, outcome: str) -> None:
        calls.append(("failure", task.handler, type(error).__name__, outcome))

    async def ok(task: TaskContext) -> dict[str, int]:
        return {"n": 1}

    async def flaky(task: TaskContext) -> None:
        if task.attempt == 1:
            raise Retry(0, "again")
        raise Fail("no more")

    async def slow(task: TaskContext) -> None:
        await asyncio.sleep(10)

    app.register("ok", ok)
    app.register("flaky", flaky, max_attempts=3)
    app.register("slow", slow, timeout=1, max_attempts=1)
    async with app, RunningWorker(app):
        for h in ("ok", "flaky", "slow"):
            await finished(app, await app.enqueue(h))
    assert calls == [
        ("before-1", "ok", 1), ("before-2", "ok", 1), ("after", "ok", {"n": 1}),
        ("before-1", "flaky", 1), ("before-2", "flaky", 1), ("failure", "flaky", "Retry", "retried"),
        ("before-1", "flaky", 2), ("before-2", "flaky", 2), ("failure", "flaky", "Fail", "failed"),
        ("before-1", "slow", 1), ("before-2", "slow", 1), ("failure", "slow", "TimeoutError", "failed"),
    ]  # fmt: skip


async def test_a_hook_that_raises_or_hangs_changes_no_outcome(db_url: str) -> None:
    app = new_app(db_url)
    seen: list[str] = []

    @app.before_task
    def boom(task: TaskContext) -> None:
        raise RuntimeError("before hook broke")

    @app.before_task(timeout=0.3)
    async def hang(task: TaskContext) -> None:
        await asyncio.sleep(3600)

    @app.after_task
    def bad_after(task: TaskContext, result: Any) -> None:
        raise ValueError("after hook broke")

    @app.on_task_failure
    async def bad_failure(task: TaskContext, error: BaseException, outcome: str) -> None:
        raise KeyError("failure hook broke")

    @app.after_task
    def still_called(task: TaskContext, result: Any) -> None:
        seen.append(task.handler)  # the hooks after a broken one still run

    async def ok(task: TaskContext) -> int:
        return 7

    async def bad(task: TaskContext) -> None:
        raise Fail("the handler's own failure")

    app.register("ok", ok)
    app.register("bad", bad)
    errors = {k: metrics.HOOK_ERRORS.labels(k)._value.get() for k in ("before", "after", "failure")}
    async with app, RunningWorker(app):
        good = await finished(app, await app.enqueue("ok"))
        failed = await finished(app, await app.enqueue("bad"))
    assert (good.status, good.result, good.error) == ("succeeded", 7, None)
    assert (failed.status, failed.error) == ("failed", "the handler's own failure")
    assert seen == ["ok"]
    after = {k: metrics.HOOK_ERRORS.labels(k)._value.get() - errors[k] for k in errors}
    assert after == {"before": 4, "after": 1, "failure": 1}  # two before hooks per task, two tasks


async def test_hooks_run_around_plain_def_handlers(
    db_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDELOG", str(tmp_path / "side.log"))  # the child's side log
    calls: list[tuple[str, Any]] = []
    app = new_app(db_url)
    app.register("quick", syncapp.quick)

    @app.before_task
    def before(task: TaskContext) -> None:
        calls.append(("before", task.handler))

    @app.after_task
    def after(task: TaskContext, result: Any) -> None:
        calls.append(("after", result))

    async with app, RunningWorker(app):
        rec = await finished(app, await app.enqueue("quick"), timeout=60)
    assert rec.status == "succeeded"
    assert calls == [("before", "quick"), ("after", rec.result)]


def test_blueprint_hooks_follow_the_apps_and_bad_hooks_are_refused() -> None:
    app, bp = App(database_url="postgresql://u@h/d"), Blueprint()
    app.before_task(print)
    bp.before_task(repr)
    app.add_tasks_from(bp)
    assert [h.func for h in app.hooks.by_kind["before"]] == [print, repr]
    with pytest.raises(ValidationError, match=r"^hook: must be callable"):
        app.after_task(42)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^timeout: must be between 0 and 3600"):
        app.on_task_failure(print, timeout=0)
