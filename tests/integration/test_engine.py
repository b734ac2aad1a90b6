"""The engine against a real PostgreSQL: claiming, ordering, retries, timeouts, admin verbs."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest, Fail, Input, Retry, SyncTaskContext, TaskContext
from kubetasks.errors import TaskNotFound
from tests.handlers import noop, one
from tests.integration.helpers import RunningWorker, wait_for


async def status_of(app: App, task_id: int) -> str:
    return (await app.get_task(task_id)).status


async def wait_status(app: App, task_id: int, status: str, timeout: float = 10) -> None:
    async def done() -> bool:
        return await status_of(app, task_id) == status

    await wait_for(done, timeout, f"task {task_id} to be {status}")


@pytest.fixture
async def seen(app: App) -> AsyncIterator[list[int]]:
    order: list[int] = []

    @app.task("record")
    async def record(ctx: TaskContext) -> int:
        order.append(ctx.payload["n"])
        return int(ctx.payload["n"])

    yield order


async def register_raw_worker(
    conn: asyncpg.Connection, pod: str, handlers: tuple[str, ...] = ("solo",)
) -> uuid.UUID:
    """A registered worker with no process behind it, serving ``handlers`` (the claim takes only those)."""
    wid = uuid.uuid4()
    await conn.fetchrow(
        "SELECT * FROM kubetasks.register_worker($1, $2, 'h', 1, ARRAY['default'], 1, 30)", wid, pod
    )
    await conn.fetchrow(
        "SELECT * FROM kubetasks.worker_serves($1, $2, '{}', '[]', 1000)", wid, list(handlers)
    )
    return wid


def plain_good(ctx: SyncTaskContext) -> str:
    return "fine"


class TestClaim:
    async def test_fifty_claimers_one_task_exactly_one_wins(self, app: App, db_url: str) -> None:
        """Fifty workers claiming at the same instant: the one pending task goes to exactly one."""
        app.register("solo", noop)
        task_id = await app.enqueue("solo", {})
        claim = app.store.queries["claim"].sql
        conns = [
            await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"}) for _ in range(50)
        ]
        try:
            wids = [await register_raw_worker(c, f"pod-{i}") for i, c in enumerate(conns)]
            go = asyncio.Event()

            async def claimer(conn: asyncpg.Connection, wid: uuid.UUID, i: int) -> list[int]:
                stmt = await conn.prepare(claim)
                await go.wait()
                rows = await stmt.fetch(wid, f"pod-{i}", ["default"], 1, [], [], [], [], [], [], [])
                return [r["id"] for r in rows]

            tasks = [
                asyncio.create_task(claimer(c, w, i))
                for i, (c, w) in enumerate(zip(conns, wids, strict=True))
            ]
            await asyncio.sleep(0.2)
            go.set()
            results = await asyncio.gather(*tasks)
        finally:
            for c in conns:
                await c.close()
        winners = [r for r in results if r]
        assert winners == [[task_id]]
        rec = await app.get_task(task_id)
        assert rec.status == "running" and rec.attempt == 1

    async def test_claim_refused_without_live_lease(self, app: App, db_url: str) -> None:
        """A worker whose lease has expired cannot claim, even before it is reaped."""
        app.register("solo", noop)
        await app.enqueue("solo", {})
        conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
        try:
            wid = await register_raw_worker(conn, "pod-x")
            await conn.execute(
                "UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE worker_id = $1", wid
            )
            claim = app.store.queries["claim"].sql
            rows = await conn.fetch(claim, wid, "pod-x", ["default"], 10, [], [], [], [], [], [], [])
        finally:
            await conn.close()
        assert rows == []

    async def test_completions_claim_the_next_batch_within_the_concurrency(self, app: App) -> None:
        """A busy worker claims with its completions: never more running than its concurrency,
        per-handler limits still hold, and every task runs once."""
        running = Counter[str]()
        peak = Counter[str]()
        ran: Counter[int] = Counter()

        async def body(ctx: TaskContext) -> None:
            running["all"] += 1
            running[ctx.handler] += 1
            peak["all"] = max(peak["all"], running["all"])
            peak[ctx.handler] = max(peak[ctx.handler], running[ctx.handler])
            ran[ctx.id] += 1
            await asyncio.sleep(0.001 * (ctx.id % 7))
            running["all"] -= 1
            running[ctx.handler] -= 1

        app.register("free", body)
        app.register("capped", body, concurrency=2)
        reqs = [EnqueueRequest("capped" if i % 3 == 0 else "free") for i in range(300)]
        ids = await app.enqueue_many(reqs)
        async with RunningWorker(app, concurrency=5) as worker:
            for tid in ids:
                await wait_status(app, tid, "succeeded", 30)
        assert peak["all"] == 5 and peak["capped"] == 2, peak
        assert sorted(ran) == sorted(ids) and set(ran.values()) == {1}
        assert worker.stats.claims_with_outcomes > 0
        assert worker.stats.succeeded == 300

    async def test_priority_then_run_at_then_id(self, app: App, seen: list[int]) -> None:
        """Higher priority first; equal priority in run_at order; then insertion order."""
        await app.enqueue("record", {"n": 1}, priority=0)
        await app.enqueue("record", {"n": 2}, priority=5)
        await app.enqueue("record", {"n": 3}, priority=5)
        await app.enqueue("record", {"n": 4}, priority=-3)
        await app.enqueue("record", {"n": 5}, priority=0)
        past = await app.store.run("db_now") - timedelta(seconds=10)
        await app.enqueue("record", {"n": 6}, priority=0, run_at=past)
        async with RunningWorker(app, concurrency=1):
            await wait_for(lambda: _async(len(seen) == 6), 10, "six tasks")
        assert seen == [2, 3, 6, 1, 5, 4]

    async def test_delayed_task_waits_for_run_at(self, app: App, seen: list[int]) -> None:
        """A delayed task is not claimed before its time, and starts promptly after it."""
        async with RunningWorker(app, concurrency=2):
            t0 = asyncio.get_running_loop().time()
            tid = await app.enqueue("record", {"n": 1}, delay=1.0)
            await wait_status(app, tid, "succeeded", 10)
            elapsed = asyncio.get_running_loop().time() - t0
        rec = await app.get_task(tid)
        assert rec.started_at is not None and rec.started_at >= rec.run_at
        assert 0.9 <= elapsed < 3.0

    async def test_queues_served_in_order_given(self, app: App, seen: list[int]) -> None:
        """With slots for one, the first queue named drains before the second."""
        for n in range(3):
            await app.enqueue("record", {"n": 100 + n}, queue="low")
        for n in range(3):
            await app.enqueue("record", {"n": n}, queue="high")
        async with RunningWorker(app, concurrency=1, queues=["high", "low"]):
            await wait_for(lambda: _async(len(seen) == 6), 10, "six tasks")
        assert seen == [0, 1, 2, 100, 101, 102]


async def _async(v: bool) -> bool:
    return v


class TestOutcomes:
    async def test_retry_with_backoff_then_failed(self, app: App) -> None:
        """An always-failing handler is retried with growing delays, then failed with its error kept."""

        @app.task("always.fails", max_attempts=3, retry_delay=0.3, backoff=2.0)
        async def always_fails(ctx: TaskContext) -> None:
            raise RuntimeError(f"boom {ctx.attempt}")

        async with RunningWorker(app):
            tid = await app.enqueue("always.fails", {})
            await wait_status(app, tid, "failed", 15)
        rec = await app.get_task(tid)
        assert rec.attempt == 3
        assert rec.error == "RuntimeError: boom 3"
        assert rec.traceback is not None and "RuntimeError: boom 3" in rec.traceback
        attempts = await app.get_attempts(tid)
        assert [a["outcome"] for a in attempts] == ["retried", "retried", "failed"]
        gap1 = (attempts[1]["started_at"] - attempts[0]["finished_at"]).total_seconds()
        gap2 = (attempts[2]["started_at"] - attempts[1]["finished_at"]).total_seconds()
        assert 0.25 <= gap1 < 1.0, gap1  # 0.3 s +-10 %
        assert 0.5 <= gap2 < 1.5, gap2  # 0.6 s +-10 %

    async def test_success_attempt_is_read_from_the_task_row(self, app: App, db_url: str) -> None:
        """A retried then successful task lists both attempts, in order, though only the
        retried one is a task_attempts row; a success row written there (a pod of the
        previous version, mid-upgrade) is not listed twice."""

        @app.task("second.time", retry_delay=0.0)
        async def second_time(ctx: TaskContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("first")
            return "ok"

        async with RunningWorker(app):
            tid = await app.enqueue("second.time", {})
            await wait_status(app, tid, "succeeded")
        rec = await app.get_task(tid)
        attempts = await app.get_attempts(tid)
        assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "retried"), (2, "succeeded")]
        last = attempts[-1]
        assert (last["started_at"], last["finished_at"], str(last["worker_id"])) == (
            rec.started_at, rec.finished_at, str(rec.worker_id),
        )  # fmt: skip
        kinds = [e["kind"] for e in await app.get_events(tid)]
        assert kinds == ["created", "claimed", "retried", "claimed", "succeeded"], kinds
        conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
        try:
            assert await conn.fetchval("SELECT count(*) FROM task_attempts WHERE task_id = $1", tid) == 1
            await conn.execute(
                "INSERT INTO task_attempts (task_id, attempt, outcome) VALUES ($1, 2, 'succeeded')", tid
            )
        finally:
            await conn.close()
        again = [(a["attempt"], a["outcome"]) for a in await app.get_attempts(tid)]
        assert again == [(1, "retried"), (2, "succeeded")]

    async def test_timeout_cancels_and_counts_an_attempt(self, app: App) -> None:
        """A handler over its timeout is cancelled; the attempt counts; the last one fails the task."""
        cancelled = asyncio.Event()

        @app.task("slow", timeout=1, max_attempts=2, retry_delay=0)
        async def slow(ctx: TaskContext) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async with RunningWorker(app):
            tid = await app.enqueue("slow", {})
            await wait_status(app, tid, "failed", 10)
        rec = await app.get_task(tid)
        assert cancelled.is_set()
        assert rec.attempt == 2
        assert rec.error == "timed out after 1s"
        assert [a["outcome"] for a in await app.get_attempts(tid)] == ["timeout", "timeout"]

    async def test_retry_and_fail_exceptions_steer(self, app: App) -> None:
        """Retry(delay) runs again after the delay; Fail ends the task at once."""

        @app.task("steer.retry", max_attempts=5)
        async def steer_retry(ctx: TaskContext) -> int:
            if ctx.attempt == 1:
                raise Retry(delay=0.2, message="not yet")
            return ctx.attempt

        @app.task("steer.fail", max_attempts=5)
        async def steer_fail(ctx: TaskContext) -> None:
            raise Fail("bad input, no point retrying")

        async with RunningWorker(app):
            a = await app.enqueue("steer.retry", {})
            b = await app.enqueue("steer.fail", {})
            await wait_status(app, a, "succeeded")
            await wait_status(app, b, "failed")
        ra, rb = await app.get_task(a), await app.get_task(b)
        assert ra.result == 2 and ra.attempt == 2
        assert rb.attempt == 1 and rb.error == "bad input, no point retrying"

    async def test_result_that_is_not_json_fails_the_task_not_the_worker(self, app: App) -> None:
        """A handler returning a non-JSON value fails that task with a clear error; the worker goes on."""

        @app.task("bad.result")
        async def bad_result(ctx: TaskContext) -> object:
            return {"when": object()}

        app.register("good", plain_good)  # a plain function runs in a child process

        async with RunningWorker(app):
            a = await app.enqueue("bad.result", {})
            b = await app.enqueue("good", {})
            await wait_status(app, a, "failed")
            await wait_status(app, b, "succeeded")
        ra = await app.get_task(a)
        assert ra.error is not None and "result" in ra.error and "not JSON-serialisable" in ra.error
        assert ra.attempt == 1
        assert (await app.get_task(b)).result == "fine"

    async def test_unknown_handler_waits_says_why_and_runs_once_served(self, app: App, db_url: str) -> None:
        """A task whose handler no running worker has stays pending, unclaimed and unfailed, and says
        why (naming what is served) within one heartbeat interval; it runs once a worker with the
        handler starts."""
        app.register("known.one", one)
        app.strict_handlers = False
        loop = asyncio.get_running_loop()
        async with RunningWorker(app):
            conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
            try:
                t0 = loop.time()
                tid = await app.enqueue("not.registered", {})

                async def parked() -> bool:
                    row = await conn.fetchval("SELECT to_jsonb(t) FROM tasks t WHERE id = $1", tid)
                    task = json.loads(row)
                    assert (task["status"], task["error"]) == ("pending", None), task  # never failed
                    return bool(task.get("parked"))

                await wait_for(parked, 5, "the task to be parked")
                took = loop.time() - t0
            finally:
                await conn.close()
            print(f"\n[served] unserved task reported {took * 1000:.0f} ms after it was enqueued")
            assert took <= app.settings.heartbeat_interval
            why = "no active worker serves handler 'not.registered' in queue 'default'; served: known.one"
            stats = await app.stats()
            assert stats["unserved"] == [
                {"handler": "not.registered", "queue": "default", "tasks": 1, "message": why}
            ]
            await asyncio.sleep(4 * app.settings.heartbeat_interval)
            rec = await app.get_task(tid)
            assert (rec.status, rec.attempt, rec.error) == ("pending", 0, None)
            assert await app.get_attempts(tid) == []
            other = App(database_url=db_url, pod_id="has-it", heartbeat_interval=0.5, lease_ttl=2.0)

            async def ran(ctx: TaskContext) -> str:
                return "ran"

            other.register("not.registered", ran)
            try:
                async with RunningWorker(other):
                    await wait_status(app, tid, "succeeded", 5)
            finally:
                await other.close()
        rec = await app.get_task(tid)
        assert (rec.attempt, rec.result, rec.pod_id) == (1, "ran", "has-it")
        assert (await app.stats())["unserved"] == []

    async def test_progress_is_stored_and_coalesced(self, app: App) -> None:
        """A thousand progress calls become a handful of writes; the last value is kept."""

        @app.task("progressive")
        async def progressive(ctx: TaskContext) -> None:
            for i in range(1000):
                await ctx.progress(i / 10, f"step {i}")
            await asyncio.sleep(0.6)
            await ctx.progress(99, "almost")

        async with RunningWorker(app):
            tid = await app.enqueue("progressive", {})
            await wait_status(app, tid, "succeeded")
        rec = await app.get_task(tid)
        assert (rec.progress, rec.progress_message) == (99, "almost")

    async def test_per_handler_concurrency_limit(self, app: App) -> None:
        """A handler with concurrency=2 never runs more than two at once in a process."""
        now_running = 0
        peak = 0

        @app.task("limited", concurrency=2)
        async def limited(ctx: TaskContext) -> None:
            nonlocal now_running, peak
            now_running += 1
            peak = max(peak, now_running)
            await asyncio.sleep(0.05)
            now_running -= 1

        ids = await app.enqueue_many([EnqueueRequest("limited") for _ in range(12)])
        async with RunningWorker(app, concurrency=10):
            for tid in ids:
                await wait_status(app, tid, "succeeded")
        assert peak == 2


class TestAdmin:
    async def test_pause_and_resume_task(self, app: App, seen: list[int]) -> None:
        """A paused task is not run until resumed."""
        tid = await app.enqueue("record", {"n": 7})
        assert await app.pause_task(tid)
        async with RunningWorker(app):
            await asyncio.sleep(0.5)
            assert await status_of(app, tid) == "paused"
            assert await app.resume_task(tid)
            await wait_status(app, tid, "succeeded")
        assert seen == [7]

    async def test_pause_and_resume_queue(self, app: App, seen: list[int]) -> None:
        """A paused queue is not claimed from; resuming wakes the workers at once."""
        await app.pause_queue("default")
        tid = await app.enqueue("record", {"n": 8})
        async with RunningWorker(app):
            await asyncio.sleep(0.5)
            assert await status_of(app, tid) == "pending"
            assert (await app.stats())["paused_queues"] == ["default"]
            await app.resume_queue("default")
            await wait_status(app, tid, "succeeded", 3)

    async def test_dedupe_key_returns_live_task(self, app: App) -> None:
        """The same dedupe key while the first is unfinished gives the same id; after it ends, a new one."""
        app.register("d", noop)
        a = await app.enqueue("d", {}, dedupe_key="k1", delay=60)
        b = await app.enqueue("d", {"other": 1}, dedupe_key="k1")
        assert a == b
        many = await app.enqueue_many(
            [EnqueueRequest("d", dedupe_key="k1"), EnqueueRequest("d", dedupe_key="k2")]
        )
        assert many[0] == a and many[1] != a
        assert await app.cancel(a)
        c = await app.enqueue("d", {}, dedupe_key="k1")
        assert c != a
        page = await app.list_tasks(handler="d")
        assert page.total == 3

    async def test_cancel_running_task_stops_its_handler(self, app: App) -> None:
        """Cancelling a running task cancels the handler on its worker; its result is never written."""
        started, stopped = asyncio.Event(), asyncio.Event()

        @app.task("long")
        async def long(ctx: TaskContext) -> str:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                stopped.set()
                raise
            return "finished"

        async with RunningWorker(app) as w:
            tid = await app.enqueue("long", {})
            await asyncio.wait_for(started.wait(), 10)
            assert await app.cancel(tid, "no longer needed")
            await asyncio.wait_for(stopped.wait(), 5)
            assert w.stats.cancelled == 1
        rec = await app.get_task(tid)
        assert rec.status == "cancelled" and rec.result is None and rec.error == "no longer needed"
        assert [a["outcome"] for a in await app.get_attempts(tid)] == ["cancelled"]
        assert not await app.cancel(tid)

    async def test_cancelling_a_run_whose_outcome_is_not_written_yet_stops_no_handler(self, app: App) -> None:
        """The handler has returned and its outcome waits for the flusher when the cancel
        arrives: no handler is stopped (stats.cancelled stays 0) and the outcome is fenced out.
        (A workflow's cancel met its parents this way and counted them as stopped handlers.)"""
        done = asyncio.Event()

        @app.task("quick")
        async def quick(ctx: TaskContext) -> str:
            done.set()
            return "finished"

        async with RunningWorker(app) as w:
            async with w._writing:  # the flusher cannot write the outcome meanwhile
                tid = await app.enqueue("quick", {})
                await asyncio.wait_for(done.wait(), 10)
                await wait_for(lambda: _settled(w, tid), 5, "the handler's run to end")
                assert await app.cancel(tid, "too late")
                await asyncio.sleep(0.5)  # the cancel's notification reaches the worker
            await wait_for(lambda: _fenced(w), 10, "the outcome to be fenced out")
            assert w.stats.cancelled == 0 and w.stats.succeeded == 0
        rec = await app.get_task(tid)
        assert rec.status == "cancelled" and rec.result is None and rec.error == "too late"

    async def test_retry_failed_task_and_all_of_handler(self, app: App) -> None:
        """retry(id) and retry(handler=) put failed tasks back with fresh attempts."""
        flaky_ok = False

        @app.task("flaky", max_attempts=1)
        async def flaky(ctx: TaskContext) -> str:
            if not flaky_ok:
                raise RuntimeError("not yet")
            return "ok"

        ids = await app.enqueue_many([EnqueueRequest("flaky") for _ in range(3)])
        async with RunningWorker(app):
            for tid in ids:
                await wait_status(app, tid, "failed")
            flaky_ok = True
            assert await app.retry(ids[0]) == 1
            await wait_status(app, ids[0], "succeeded")
            assert await app.retry(handler="flaky") == 2
            for tid in ids[1:]:
                await wait_status(app, tid, "succeeded")
        with pytest.raises(TaskNotFound):
            await app.retry(10**9)

    async def test_list_stats_and_delete(self, app: App) -> None:
        """list_tasks filters and pages; stats counts; delete_tasks removes finished ones only."""
        app.register("a", noop)
        app.register("b", noop)
        await app.enqueue_many([EnqueueRequest("a", tags=["x", "y"]) for _ in range(5)])
        await app.enqueue_many([EnqueueRequest("b", queue="other", tags=["x"]) for _ in range(3)])
        page = await app.list_tasks(handler="a", limit=2)
        assert page.total == 5 and len(page.items) == 2 and page.has_more
        last = await app.list_tasks(handler="a", limit=2, offset=4)
        assert len(last.items) == 1 and not last.has_more
        assert (await app.list_tasks(tags=["x", "y"])).total == 5
        assert (await app.list_tasks(tags=["x"])).total == 8
        assert (await app.list_tasks(queue="other", status="pending")).total == 3
        st = await app.stats()
        assert st["queues"]["default"]["counts"] == {"pending": 5}
        assert st["queues"]["other"]["counts"] == {"pending": 3}
        assert st["queues"]["default"]["oldest_pending_s"] >= 0
        async with RunningWorker(app, queues=["default"]):
            await wait_for(lambda: _count(app, "succeeded", 5), 10, "five successes")
        assert await app.delete_tasks(older_than=0) == 5
        assert (await app.list_tasks()).total == 3


async def _count(app: App, status: str, n: int) -> bool:
    return (await app.list_tasks(status=status)).total == n


class TestInputs:
    async def test_inputs_required_default_validator(self, app: App) -> None:
        """Inputs fill defaults and refuse missing or invalid values before anything is written."""
        from kubetasks import ValidationError

        @app.task(
            "resize",
            inputs={
                "image": Input(required=True),
                "width": {"default": 640, "validator": lambda v: isinstance(v, int) and 0 < v <= 4096},
            },
        )
        async def resize(ctx: TaskContext) -> None: ...

        tid = await app.enqueue("resize", {"image": "s3://b/1.png"})
        assert (await app.get_task(tid)).payload == {"image": "s3://b/1.png", "width": 640}
        with pytest.raises(ValidationError, match=r"payload\.image: is required by handler 'resize'"):
            await app.enqueue("resize", {"width": 10})
        with pytest.raises(ValidationError, match=r"payload\.width: value 99999 refused"):
            await app.enqueue("resize", {"image": "x", "width": 99999})
        assert (await app.list_tasks()).total == 1


class TestClusterConcurrency:
    async def test_cluster_wide_limit_across_workers(self, app: App, db_url: str) -> None:
        """cluster_concurrency=3 holds across three 10-slot workers (checked from recorded intervals)."""
        intervals: list[tuple[float, float]] = []

        @app.task("scarce", cluster_concurrency=3)
        async def scarce(ctx: TaskContext) -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.sleep(0.05)
            intervals.append((start, loop.time()))

        @app.task("plenty")
        async def plenty(ctx: TaskContext) -> None:
            await asyncio.sleep(0.01)

        ids = await app.enqueue_many([EnqueueRequest("scarce") for _ in range(30)])
        ids += await app.enqueue_many([EnqueueRequest("plenty") for _ in range(30)])
        apps = [
            App(database_url=db_url, pod_id=f"p{i}", heartbeat_interval=0.5, lease_ttl=2.0) for i in range(3)
        ]
        for a in apps:
            a.add_tasks_from(app)
        try:
            runners = [RunningWorker(a, concurrency=10) for a in apps]
            for r in runners:
                await r.__aenter__()
            try:
                for tid in ids:
                    await wait_status(app, tid, "succeeded", 30)
            finally:
                for r in runners:
                    await r.__aexit__()
        finally:
            for a in apps:
                await a.close()
        assert len(intervals) == 30
        points = sorted(
            [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1])
        )
        now = peak = 0
        for _, d in points:
            now += d
            peak = max(peak, now)
        assert peak == 3


async def _settled(w: object, tid: int) -> bool:
    run = w._running.get(tid)  # type: ignore[attr-defined]
    return run is not None and run.task is not None and run.task.done()


async def _fenced(w: object) -> bool:
    return bool(w.stats.fenced_out)  # type: ignore[attr-defined]
