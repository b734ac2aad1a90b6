"""Retry delay, backoff and cap per task (issue 17 item 4), against a real PostgreSQL.

Set at enqueue, in ``EnqueueRequest`` (``enqueue_many``, ``spawn``), from the
CLI and in a Task object's spec; each one not given comes from the handler's
option, else the App default: task > handler > app, as for the other options.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest, TaskContext, ValidationError
from kubetasks.k8s import handlers as k8s_handlers
from tests.integration.helpers import ROOT, RunningWorker, wait_for


def new_app(db_url: str, **kw: Any) -> App:
    return App(database_url=db_url, pod_id="retry-pod", heartbeat_interval=0.5, lease_ttl=2.0, **kw)


async def policy(db_url: str, task_id: int) -> tuple[float, float, float]:
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        r = await conn.fetchrow(
            "SELECT retry_delay_s, retry_backoff, max_retry_delay_s FROM tasks WHERE id = $1", task_id
        )
    finally:
        await conn.close()
    return (r["retry_delay_s"], r["retry_backoff"], r["max_retry_delay_s"])


async def noop(task: TaskContext) -> None:
    return None


async def test_precedence_task_over_handler_over_app(db_url: str) -> None:
    app = new_app(db_url, default_retry_delay=7, default_backoff=3, default_max_retry_delay=70)
    app.register("declared", noop, retry_delay=100, backoff=5)
    app.register("bare", noop)
    async with app:
        # Nothing given: the handler's options, the App default for the one it lacks.
        assert await policy(db_url, await app.enqueue("declared")) == (100, 5, 70)
        assert await policy(db_url, await app.enqueue("bare")) == (7, 3, 70)
        # Given at enqueue: the task's own, also zero (not mistaken for "unset").
        t = await app.enqueue("declared", retry_delay=0, backoff=1, max_retry_delay=0)
        assert await policy(db_url, t) == (0, 1, 0)
        t = await app.enqueue("declared", backoff=2)
        assert await policy(db_url, t) == (100, 2, 70)
        ids = await app.enqueue_many(
            [EnqueueRequest("bare", retry_delay=1.5, max_retry_delay=9), EnqueueRequest("declared")]
        )
        assert [await policy(db_url, i) for i in ids] == [(1.5, 3, 9), (100, 5, 70)]


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"retry_delay": -1}, "retry_delay: must be between 0"),
        ({"retry_delay": 86401}, "retry_delay: must be between 0"),
        ({"backoff": 0.5}, "backoff: must be between 1"),
        ({"backoff": 11}, "backoff: must be between 1"),
        ({"max_retry_delay": 604801}, "max_retry_delay: must be between 0"),
        ({"retry_delay": "soon"}, "retry_delay: must be a number"),
    ],
)
async def test_bad_policy_is_refused_naming_the_field(db_url: str, kw: dict[str, Any], says: str) -> None:
    app = new_app(db_url)
    app.register("h", noop)
    async with app:
        with pytest.raises(ValidationError) as exc:
            await app.enqueue("h", **kw)
        assert str(exc.value).startswith(says), str(exc.value)
        with pytest.raises(ValidationError):
            await app.enqueue_many([EnqueueRequest("h", **kw)])
        assert (await app.list_tasks()).total == 0  # nothing written


async def test_the_worker_waits_the_tasks_own_delay(db_url: str) -> None:
    """A handler declaring an hour between retries; the task asks for 0.2 s: its retry runs
    at once (were the handler's option used, the test would time out)."""
    runs: list[int] = []

    async def flaky(task: TaskContext) -> str:
        runs.append(task.attempt)
        if task.attempt == 1:
            raise RuntimeError("first run fails")
        return "ok"

    app = new_app(db_url)
    app.register("flaky", flaky, retry_delay=3600, max_attempts=3)
    async with app:
        fast = await app.enqueue("flaky", retry_delay=0.2)
        slow = await app.enqueue("flaky")
        async with RunningWorker(app):

            async def fast_done() -> bool:
                return (await app.get_task(fast)).status == "succeeded"

            await wait_for(fast_done, 20, "the retry after the task's own 0.2 s")
            rec = await app.get_task(slow)
            assert rec.status == "pending" and rec.attempt == 1
            # Its retry waits for the handler's hour (jitter +-10 %).
            conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
            try:
                wait_s = await conn.fetchval(
                    "SELECT extract(epoch FROM run_at - now()) FROM tasks WHERE id = $1", slow
                )
            finally:
                await conn.close()
            assert 3000 < float(wait_s) < 4000


async def test_spawned_children_carry_their_policy(db_url: str) -> None:
    async def parent(task: TaskContext) -> list[int]:
        a = await task.spawn("child", retry_delay=2.5, backoff=1.5, max_retry_delay=30)
        (b,) = await task.spawn_many([EnqueueRequest("child", max_retry_delay=12)])
        return [a, b]

    app = new_app(db_url, default_retry_delay=4)
    app.register("parent", parent)
    app.register("child", noop, backoff=6)
    async with app:
        pid = await app.enqueue("parent")
        async with RunningWorker(app):

            async def done() -> bool:
                return (await app.get_task(pid)).status == "succeeded"

            await wait_for(done, 20, "the parent to spawn its children")
        a, b = (await app.get_task(pid)).result
        assert await policy(db_url, a) == (2.5, 1.5, 30)
        assert await policy(db_url, b) == (4, 6, 12)


async def test_task_object_spec_sets_the_policy(db_url: str) -> None:
    """A Task's retryDelaySeconds, retryBackoff and maxRetryDelaySeconds; an out-of-range one is
    recorded as the Task's failure naming the spec field."""
    app = new_app(db_url, strict_handlers=False)
    async with app:
        ctx = k8s_handlers.OperatorContext(app=app, store=app.store, kube=None)  # type: ignore[arg-type]
        spec = {
            "handler": "remote.h",
            "retryDelaySeconds": 0,
            "retryBackoff": 1.5,
            "maxRetryDelaySeconds": 20,
        }
        tid = await k8s_handlers.ingest(ctx, "uid-1", "ns", "t1", spec)
        assert await policy(db_url, tid) == (0, 1.5, 20)
        bad = await k8s_handlers.ingest(ctx, "uid-2", "ns", "t2", {"handler": "remote.h", "retryBackoff": 20})
        rec = await app.get_task(bad)
        assert rec.status == "failed"
        assert rec.error is not None and rec.error.startswith("spec.retryBackoff: must be between 1"), (
            rec.error
        )


def test_cli_enqueue_sets_the_policy(db_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "kubetasks", "enqueue", "any.handler"]
    res = subprocess.run(
        [*base, "--retry-delay", "0.5", "--backoff", "4", "--max-retry-delay", "8"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    tid = int(res.stdout.strip())
    assert asyncio.run(policy(db_url, tid)) == (0.5, 4, 8)
    bad = subprocess.run([*base, "--backoff", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "backoff: must be between 1" in bad.stderr, bad.stderr
