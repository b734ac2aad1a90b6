"""A worker serves the queues of the handlers it has (issue 17 item 1), against a real PostgreSQL.

``KUBETASKS_QUEUES`` narrows that; ``*`` serves every queue holding tasks of its
handlers: found at start, and when a task becomes pending in a queue it never
heard of. A queue nobody serves is reported by the one unserved mechanism
(``serving``): stats, metric, Task status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from kubetasks import App, ConfigError, Settings, TaskContext
from kubetasks.errors import ValidationError
from tests.integration.helpers import RunningWorker, wait_for

URL = "postgresql://u@h/d"


def new_app(db_url: str, pod: str, **kw: Any) -> App:
    kw.setdefault("heartbeat_interval", 0.5)
    kw.setdefault("lease_ttl", 2.0)
    return App(database_url=db_url, pod_id=pod, **kw)


def returns(value: Any) -> Callable[[TaskContext], Awaitable[Any]]:
    async def handler(ctx: TaskContext) -> Any:
        return value

    return handler


async def status_of(app: App, task_id: int) -> str:
    return (await app.get_task(task_id)).status


def succeeded(app: App, task_id: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await status_of(app, task_id) == "succeeded"

    return check


async def test_worker_serves_the_queues_of_its_handlers(db_url: str) -> None:
    """The README's first example: a handler in queue "images", a worker started with no
    queue setting runs it (on main it served only "default" and the task waited)."""
    app = new_app(db_url, "images-pod")
    app.register("images.resize", returns({"ok": True}), queue="images")
    app.register("plain", returns(1))
    async with app:
        a = await app.enqueue("images.resize", {"image": "x.png"})
        b = await app.enqueue("plain")
        async with RunningWorker(app) as w:
            assert w.queues == ("images", "default")
            await wait_for(succeeded(app, a), 20, "the images task to run")
            await wait_for(succeeded(app, b), 20, "the default-queue task to run")
            conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
            try:
                assert await conn.fetchval("SELECT queues FROM workers WHERE status = 'active'") == [
                    "images",
                    "default",
                ]
            finally:
                await conn.close()


async def test_queues_setting_narrows_and_the_rest_is_reported(db_url: str) -> None:
    """KUBETASKS_QUEUES=default: the images task waits, and stats says why (the unserved report);
    a worker with the default setting then runs it."""
    narrow = new_app(db_url, "narrow-pod", queues=("default",))
    narrow.register("images.resize", returns(1), queue="images")
    async with narrow:
        tid = await narrow.enqueue("images.resize")
        async with RunningWorker(narrow) as w:
            assert w.queues == ("default",)

            async def reported() -> bool:
                return any(
                    u["handler"] == "images.resize" and u["queue"] == "images"
                    for u in (await narrow.stats())["unserved"]
                )

            await wait_for(reported, 10, "stats to report the unserved queue")
            (u,) = [u for u in (await narrow.stats())["unserved"] if u["queue"] == "images"]
            assert u["tasks"] == 1
            assert "nothing in queue 'images' (queues served: default)" in u["message"]
            assert await status_of(narrow, tid) == "pending"
            wide = new_app(db_url, "wide-pod")
            wide.register("images.resize", returns(1), queue="images")
            async with wide, RunningWorker(wide):
                await wait_for(succeeded(narrow, tid), 20, "the images task to run on the wide pod")
                assert (await narrow.stats())["unserved"] == []


async def test_star_serves_every_queue_holding_its_handlers_tasks(db_url: str) -> None:
    """``*``: a queue named at enqueue (waiting before the worker started, parked by then) and
    one that first appears while it runs are both served; a queue of another handler is not."""
    app = new_app(db_url, "star-pod", queues=("urgent", "*"))
    app.register("h", returns(1), queue="hq")
    async with app:
        early = await app.enqueue("h", queue="early")
        async with new_app(db_url, "enqueuer", strict_handlers=False) as enqueuer:
            foreign = await enqueuer.enqueue("absent", queue="foreign")  # a handler it lacks
        # Another pod parks what nobody serves before this worker starts.
        bystander = new_app(db_url, "bystander", queues=("nothing",))
        async with bystander, RunningWorker(bystander) as bw:
            await bw.housekeeper.offer(force=True)
        conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
        try:
            assert await conn.fetchval("SELECT parked FROM tasks WHERE id = $1", early)
            async with RunningWorker(app) as w:
                await wait_for(succeeded(app, early), 20, "the task parked in a queue named at enqueue")
                assert w.queues[:3] == ("urgent", "hq", "early")
                late = await app.enqueue("h", queue="late")
                await wait_for(succeeded(app, late), 20, "the task in a queue that appeared later")
                assert "late" in w.queues
                assert "foreign" not in w.queues  # no task of its handlers there
                assert await status_of(app, foreign) == "pending"
                served = await conn.fetchval("SELECT queues FROM workers WHERE worker_id = $1", w.worker_id)
                assert served[:2] == ["urgent", "hq"] and {"early", "late"} <= set(served)
        finally:
            await conn.close()


async def test_handler_registered_at_runtime_brings_its_queue(db_url: str) -> None:
    app = new_app(db_url, "runtime-pod")
    app.register("first", returns(1))
    async with app, RunningWorker(app) as w:
        assert w.queues == ("default",)
        app.register("second", returns(2), queue="fresh")
        tid = await app.enqueue("second")
        await wait_for(succeeded(app, tid), 20, "the runtime handler's task in its own queue")
        assert w.queues == ("default", "fresh")


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("*,a", "KUBETASKS_QUEUES: '*' (every queue) must come last"),
        ("a,a", "KUBETASKS_QUEUES: names a queue twice"),
        ("a b", "KUBETASKS_QUEUES: 'a b' has forbidden characters"),
    ],
)
def test_bad_queue_settings_are_refused(raw: str, says: str) -> None:
    with pytest.raises((ConfigError, ValidationError)) as exc:
        Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_QUEUES": raw})
    assert str(exc.value).startswith(says), str(exc.value)
    assert Settings.load(env={"KUBETASKS_DATABASE_URL": URL}).queues == ()
    assert Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_QUEUES": "a,*"}).queues == ("a", "*")
