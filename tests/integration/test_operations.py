"""Operating many tasks at once against the real PostgreSQL (issue 17 items 3, 5 and 8):
bulk retry / cancel / delete by filter, filtered listings, events and attempts
queries, schedules paused at runtime."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from kubetasks import App, TaskContext, cron
from kubetasks.cron import Scheduler, ScheduleSpec
from kubetasks.errors import ValidationError
from kubetasks.filters import TaskFilter
from kubetasks.schedules import ScheduleNotFound

SETTINGS = {"pod_id": "ops-pod", "heartbeat_interval": 0.5, "lease_ttl": 2.0}


@pytest.fixture
async def ops(db_url: str) -> AsyncIterator[App]:
    """An App that enqueues any handler (as the CLI and the dashboard do)."""
    a = App(database_url=db_url, strict_handlers=False, **SETTINGS)
    await a.open()
    yield a
    await a.close()


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    yield c
    await c.close()


async def seed(
    conn: asyncpg.Connection,
    n: int,
    *,
    status: str = "pending",
    queue: str = "default",
    handler: str = "h",
    tags: list[str] | None = None,
    parent: int | None = None,
    pod: str | None = None,
    attempt: int | None = None,
) -> list[int]:
    """``n`` tasks in one statement, as a worker would have left them in ``status``."""
    finished = status in ("succeeded", "failed", "cancelled")
    ran = attempt if attempt is not None else (1 if status in ("succeeded", "failed", "running") else 0)
    rows = await conn.fetch(
        """
        INSERT INTO tasks (handler, queue, status, attempt, tags, parent_id, spawn_key, pod_id, error,
                           started_at, finished_at)
        SELECT $1, $2, $3, $4, $5, $6,
               CASE WHEN $6::bigint IS NULL THEN NULL ELSE 'k' || gen_random_uuid() END, $7,
               CASE WHEN $3 = 'failed' THEN 'boom ' || g END,
               CASE WHEN $4 > 0 THEN now() END, CASE WHEN $8 THEN now() END
        FROM generate_series(1, $9::int) g
        RETURNING id
        """,
        handler, queue, status, ran, tags or [], parent, pod, finished, n,
    )  # fmt: skip
    return [int(r["id"]) for r in rows]


async def statuses(conn: asyncpg.Connection, ids: list[int]) -> dict[int, str]:
    return {
        r["id"]: r["status"] for r in await conn.fetch("SELECT id, status FROM tasks WHERE id = ANY($1)", ids)
    }


class Listener:
    """Notifications of one channel, collected."""

    def __init__(self) -> None:
        self.heard: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, _c: Any, _pid: int, _channel: str, payload: str) -> None:
        self.heard.put_nowait(payload)

    async def payloads(self, until: str, timeout: float = 10) -> list[str]:
        out: list[str] = []
        async with asyncio.timeout(timeout):
            while until not in out:
                out.append(await self.heard.get())
        return out


# -- bulk ---------------------------------------------------------------------------------------


async def test_bulk_retry_counts_first_and_never_touches_a_task_added_after_the_count(
    ops: App, conn: asyncpg.Connection
) -> None:
    """A dry run counts and names the newest match; the run bounded by it retries exactly those,
    batch after batch, wakes their queue, and leaves other queues, statuses and later tasks alone."""
    failed_a = await seed(conn, 7, status="failed", queue="a", attempt=3)
    failed_b = await seed(conn, 3, status="failed", queue="b")
    cancelled_a = await seed(conn, 2, status="cancelled", queue="a")
    ok_a = await seed(conn, 4, status="succeeded", queue="a")

    count = await ops.bulk_retry(queue="a", dry_run=True)
    assert (count.count, count.up_to_id, count.dry_run) == (7, max(failed_a), True)
    assert set((await statuses(conn, failed_a)).values()) == {"failed"}  # a dry run changes nothing

    late = await seed(conn, 2, status="failed", queue="a")  # after the count, before the confirmation
    listener = Listener()
    listen = await asyncpg.connect(ops.settings.database_url)
    await listen.add_listener("kubetasks_enqueued", listener)
    try:
        done = await ops.bulk_retry(queue="a", up_to_id=count.up_to_id, batch_size=3)
        assert (done.count, done.batches, done.done) == (7, 3, True)
        assert "a" in await listener.payloads("a")
    finally:
        await listen.close()

    assert set((await statuses(conn, failed_a)).values()) == {"pending"}
    assert set((await statuses(conn, late + failed_b)).values()) == {"failed"}
    assert set((await statuses(conn, cancelled_a)).values()) == {"cancelled"}
    assert set((await statuses(conn, ok_a)).values()) == {"succeeded"}
    rec = await ops.get_task(failed_a[0])
    assert rec.attempts_spent == 0 and rec.error is None and rec.finished_at is None
    assert [e["kind"] for e in await ops.get_events(failed_a[0])][-1] == "requeued"

    # status=cancelled takes the cancelled ones too; status=succeeded is refused, naming the field.
    more = await ops.bulk_retry(queue="a", status=["failed", "cancelled"])
    assert more.count == 4
    with pytest.raises(ValidationError) as exc:
        await ops.bulk_retry(queue="a", status="succeeded")
    assert exc.value.field == "status"


async def test_bulk_cancel_takes_descendants_and_tells_running_workers(
    ops: App, conn: asyncpg.Connection
) -> None:
    """Cancelling by tag cancels each match and its unfinished descendants; a running match's worker
    hears it; finished tasks and other tags stay as they were."""
    [root] = await seed(conn, 1, status="suspended", tags=["batch-7"])
    children = await seed(conn, 3, parent=root)
    [grandchild] = await seed(conn, 1, parent=children[0])
    [finished_child] = await seed(conn, 1, status="succeeded", parent=root)
    worker = uuid.uuid4()
    await conn.fetchrow(
        "SELECT * FROM register_worker($1, 'ops-runner', 'h', 1, ARRAY['default'], 5, 30)", worker
    )
    [running] = await seed(conn, 1, status="pending", tags=["batch-7"])
    await conn.execute(
        "UPDATE tasks SET status = 'running', attempt = 1, worker_id = $1, pod_id = 'ops-runner', "
        "started_at = now() WHERE id = $2",
        worker, running,
    )  # fmt: skip
    other = await seed(conn, 2, tags=["batch-8"])

    assert (await ops.bulk_cancel(tag="batch-7", dry_run=True)).count == 2
    listener = Listener()
    listen = await asyncpg.connect(ops.settings.database_url)
    await listen.add_listener("kubetasks_cancel", listener)
    try:
        res = await ops.bulk_cancel(tag="batch-7", reason="operator said so")
        assert await listener.payloads(f"{running}:{worker}")
    finally:
        await listen.close()
    assert (res.count, res.descendants) == (2, 4)
    st = await statuses(conn, [root, *children, grandchild, finished_child, running, *other])
    assert {st[i] for i in [root, *children, grandchild, running]} == {"cancelled"}
    assert st[finished_child] == "succeeded" and {st[i] for i in other} == {"pending"}
    assert (await ops.get_task(running)).error == "operator said so"
    with pytest.raises(ValidationError) as exc:
        await ops.bulk_cancel(tag="batch-8", status="failed")
    assert exc.value.field == "status"


async def test_bulk_delete_keeps_children_of_unfinished_parents(ops: App, conn: asyncpg.Connection) -> None:
    """Deleting finished tasks of a handler takes their events and attempts too, but never a
    child whose parent is still running, nor an unfinished task."""
    done = await seed(conn, 5, status="succeeded", handler="report")
    failed = await seed(conn, 2, status="failed", handler="report")
    await conn.execute(
        "INSERT INTO task_events (task_id, kind) SELECT unnest($1::bigint[]), 'retried'", failed
    )
    await conn.execute(
        "INSERT INTO task_attempts (task_id, attempt, outcome) SELECT unnest($1::bigint[]), 1, 'failed'",
        failed,
    )
    [parent] = await seed(conn, 1, status="suspended", handler="flow")
    kept = await seed(conn, 2, status="succeeded", handler="report", parent=parent)
    pending = await seed(conn, 2, handler="report")

    assert (await ops.bulk_delete(handler="report", dry_run=True)).count == 9
    res = await ops.bulk_delete(handler="report", batch_size=4)
    assert res.count == 7
    left = await statuses(conn, done + failed + kept + pending)
    assert set(left) == set(kept + pending)
    assert await conn.fetchval("SELECT count(*) FROM task_events WHERE task_id = ANY($1)", failed) == 0
    assert await conn.fetchval("SELECT count(*) FROM task_attempts WHERE task_id = ANY($1)", failed) == 0
    with pytest.raises(ValidationError) as exc:
        await ops.bulk_delete(handler="report", status="pending")
    assert exc.value.field == "status"


async def test_bulk_refuses_bad_input_naming_the_field(ops: App, conn: asyncpg.Connection) -> None:
    """Nothing is written when a criterion, the batch size or the filter itself is wrong."""
    ids = await seed(conn, 3, status="failed")
    cases: list[tuple[Any, str]] = [
        (ops.bulk_retry(), "filter"),
        (ops.bulk_delete(colour="red"), "colour"),
        (ops.bulk_retry(queue="default", batch_size=0), "batch_size"),
        (ops.bulk_retry(queue="default", batch_size=10**6), "batch_size"),
        (ops.bulk_cancel(worker="w-1"), "worker"),
        (ops.bulk_retry(TaskFilter.of(queue="default"), queue="default"), "filter"),
        (ops.bulk_retry(queue="default", up_to_id=-1), "up_to_id"),
        (ops.bulk_cancel(queue="default", reason=""), "reason"),
        (ops.bulk_retry(root=10**12), None),  # a root that does not exist matches nothing
    ]
    for call, field in cases:
        if field is None:
            assert (await call).count == 0
            continue
        with pytest.raises(ValidationError) as exc:
            await call
        assert exc.value.field == field, str(exc.value)
    assert set((await statuses(conn, ids)).values()) == {"failed"}


async def test_bulk_stops_at_its_deadline_and_resumes_where_it_stopped(
    ops: App, conn: asyncpg.Connection
) -> None:
    """With a deadline already past, one batch runs and the result says where to go on; going on
    from there retries the rest, each task once."""
    from kubetasks import bulk

    ids = await seed(conn, 10, status="failed", queue="slow")
    loop = asyncio.get_running_loop()
    first = await bulk.run(
        ops.store, "retry", TaskFilter.of(queue="slow"), batch_size=3, deadline=loop.time()
    )
    assert (first.count, first.done, first.resume_after) == (3, False, ids[2])
    rest = await bulk.run(
        ops.store, "retry", TaskFilter.of(queue="slow"), batch_size=3,
        after_id=first.resume_after or 0, up_to_id=first.up_to_id,
    )  # fmt: skip
    assert (rest.count, rest.done) == (7, True)
    events = await conn.fetchval(
        "SELECT count(*) FROM task_events WHERE kind = 'requeued' AND task_id = ANY($1)", ids
    )
    assert events == 10


# -- listing ------------------------------------------------------------------------------------


async def test_find_tasks_walks_bounded_windows_and_finds_every_match_once(
    ops: App, conn: asyncpg.Connection
) -> None:
    """A sparse filter over a small scan window returns short pages with a cursor that goes on
    below the window; following it yields every match exactly once, newest first."""
    wanted: list[int] = []
    for _ in range(5):
        await seed(conn, 37, status="succeeded")
        wanted += await seed(conn, 2, status="failed", handler="needle")
    pages = 0
    found: list[int] = []
    cursor: str | None = None
    while True:
        page = await ops.find_tasks(handler="needle", status="failed", cursor=cursor, limit=3, scan=25)
        assert len(page.items) <= 3 and page.scanned_below - page.scanned_from <= 25
        found += [t.id for t in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert found == sorted(wanted, reverse=True)
    assert pages >= 195 // 25  # bounded windows, not one statement over the table
    one = (await ops.find_tasks(handler="needle", limit=1)).items[0]
    assert one.id == max(wanted) and one.error and one.error.startswith("boom") and one.attempts_spent == 1


async def test_find_tasks_by_parent_root_pod_and_time(ops: App, conn: asyncpg.Connection) -> None:
    """parent: direct children; root: the whole tree; pod, tag and created_* narrow further."""
    [root] = await seed(conn, 1, status="suspended", handler="flow")
    await seed(conn, 50, status="succeeded")  # noise between the levels
    kids = await seed(conn, 3, parent=root, pod="pod-a")
    grand = await seed(conn, 2, parent=kids[1], pod="pod-b", tags=["deep"])
    by_parent = await ops.find_tasks(parent=root)
    assert [t.id for t in by_parent.items] == sorted(kids, reverse=True) and by_parent.next_cursor is None
    by_root = await ops.find_tasks(root=root)
    assert {t.id for t in by_root.items} == {root, *kids, *grand}
    assert {t.id for t in (await ops.find_tasks(root=root, pod="pod-b")).items} == set(grand)
    assert {t.id for t in (await ops.find_tasks(root=root, tag="deep", queue="default")).items} == set(grand)
    now = await conn.fetchval("SELECT now()")
    assert (await ops.find_tasks(root=root, created_after=now + timedelta(seconds=1))).items == []
    # A paged tree: two at a time, each once.
    seen: list[int] = []
    cursor = None
    while True:
        page = await ops.find_tasks(root=root, limit=2, cursor=cursor)
        seen += [t.id for t in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == sorted({root, *kids, *grand}, reverse=True)


async def test_find_tasks_refuses_bad_paging(ops: App) -> None:
    for kwargs, field in [
        ({"limit": 0}, "limit"),
        ({"limit": 100_000}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"scan": 10**9}, "scan"),
        ({"status": "finished"}, "status"),
    ]:
        with pytest.raises(ValidationError) as exc:
            await ops.find_tasks(**kwargs)
        assert exc.value.field == field


# -- events and attempts ------------------------------------------------------------------------


async def _run_some(ops: App) -> dict[str, int]:
    """Real runs: one success, one task that fails twice then succeeds, one that fails for good."""
    from tests.integration.helpers import RunningWorker

    calls: dict[int, int] = {}

    async def flaky(ctx: TaskContext) -> str:
        calls[ctx.id] = calls.get(ctx.id, 0) + 1
        if ctx.payload.get("fail_until", 0) >= calls[ctx.id]:
            raise RuntimeError(f"attempt {calls[ctx.id]} failed")
        return "ok"

    ops.task("flaky", retry_delay=0.0, max_attempts=3)(flaky)
    ids = {
        "ok": await ops.enqueue("flaky", {}),
        "third": await ops.enqueue("flaky", {"fail_until": 2}),
        "never": await ops.enqueue("flaky", {"fail_until": 9}),
    }
    async with RunningWorker(ops):
        async with asyncio.timeout(30):
            while True:
                states = [(await ops.get_task(i)).status for i in ids.values()]
                if all(st in ("succeeded", "failed") for st in states):
                    break
                await asyncio.sleep(0.05)
    return ids


async def test_events_and_attempts_across_tasks(ops: App) -> None:
    """Attempts by pod and outcome, events by kind and task, paged with cursors, newest first."""
    ids = await _run_some(ops)
    page = await ops.query_attempts(pod="ops-pod")
    assert {(a["task_id"], a["attempt"], a["outcome"]) for a in page.items} == {
        (ids["ok"], 1, "succeeded"),
        (ids["third"], 1, "retried"), (ids["third"], 2, "retried"), (ids["third"], 3, "succeeded"),
        (ids["never"], 1, "retried"), (ids["never"], 2, "retried"), (ids["never"], 3, "failed"),
    }  # fmt: skip
    keys = [(a["task_id"], a["attempt"]) for a in page.items]
    assert keys == sorted(keys, reverse=True)
    failed = await ops.query_attempts(outcome=["retried", "failed"], limit=2)
    collected = list(failed.items)
    while failed.next_cursor is not None:
        failed = await ops.query_attempts(outcome=["retried", "failed"], limit=2, cursor=failed.next_cursor)
        collected += failed.items
    assert len(collected) == 5 and all(a["error"].startswith("RuntimeError") for a in collected)
    assert (await ops.query_attempts(pod="elsewhere")).items == []

    ev = await ops.query_events(kind="retried")
    assert sorted(e["task_id"] for e in ev.items) == sorted([ids["third"]] * 2 + [ids["never"]] * 2)
    assert [e["id"] for e in ev.items] == sorted((e["id"] for e in ev.items), reverse=True)
    one = await ops.query_events(task=ids["never"])
    assert [e["kind"] for e in one.items] == ["failed", "retried", "retried"]
    assert (await ops.query_events(task=ids["never"], kind="failed")).items[0]["pod_id"] == "ops-pod"
    for kwargs, field in [
        ({"kind": "exploded"}, "kind"),
        ({"outcome": "fine"}, "outcome"),
        ({"task": 1, "root": 1}, "task"),
        ({"cursor": "zzz"}, "cursor"),
        ({"limit": 10_000}, "limit"),
    ]:
        call = ops.query_attempts if "outcome" in kwargs else ops.query_events
        with pytest.raises(ValidationError) as exc:
            await call(**kwargs)
        assert exc.value.field == field


# -- schedules at runtime -----------------------------------------------------------------------


async def test_a_paused_schedule_does_not_tick_survives_its_source_and_resumes_without_catch_up(
    ops: App, conn: asyncpg.Connection
) -> None:
    """Paused: no tick runs, even after the code re-syncs the schedule with suspend=False; a
    manual trigger still runs; resumed: the paused time brings no catch-up run, the next tick runs."""
    from tests.integration.test_cron import FakeClock, next_pass

    async def noop(ctx: TaskContext) -> None:
        return None

    now = (await conn.fetchval("SELECT now()")).replace(second=0, microsecond=0)
    ops.task("tick")(noop)
    spec = ScheduleSpec(name="every-minute", cron="* * * * *", handler="tick", concurrency_policy="Allow")
    await cron.upsert_schedule(ops.store, spec, since=now)
    clock = FakeClock(now)
    passes: asyncio.Queue[cron.Pass] = asyncio.Queue()
    sched = Scheduler(ops, clock=clock, signals=passes)
    stop = asyncio.Event()
    runner = asyncio.create_task(sched.run(stop))
    results: list[cron.TickResult] = []
    try:
        await next_pass(passes, now, results)
        assert await ops.pause_schedule("every-minute", by="alice") is True
        assert await ops.pause_schedule("every-minute", by="bob") is False  # already paused: unchanged
        await cron.upsert_schedule(ops.store, spec, since=now)  # the code syncs: suspend=False
        for minutes in (1, 2, 3):
            clock.now = now + timedelta(minutes=minutes, seconds=5)
            sched.wake()
            await next_pass(passes, clock.now, results)
        assert [r for r in results if r.outcome == "enqueued"] == []
        from kubetasks import schedules

        [st] = await schedules.statuses(ops, ["every-minute"], history=0)
        assert (st.paused, st.paused_by, st.next_at) == (True, "alice", None)
        manual = await ops.trigger_schedule("every-minute")
        assert manual.outcome == "enqueued"

        assert await schedules.resume(ops, "every-minute", since=clock.now) is True
        assert await ops.resume_schedule("every-minute") is False
        clock.now = now + timedelta(minutes=3, seconds=30)
        sched.wake()
        await next_pass(passes, clock.now, results)
        assert [r for r in results if r.outcome == "enqueued"] == []  # 3:00 fell in the paused time
        clock.now = now + timedelta(minutes=4, seconds=1)
        sched.wake()
        await next_pass(passes, clock.now, results)
        assert [r.tick_at for r in results if r.outcome == "enqueued"] == [now + timedelta(minutes=4)]
    finally:
        stop.set()
        await runner
    with pytest.raises(ScheduleNotFound):
        await ops.pause_schedule("no-such-schedule")
    with pytest.raises(ScheduleNotFound):
        await ops.trigger_schedule("no-such-schedule")
    with pytest.raises(ValidationError) as exc:
        await ops.pause_schedule("every-minute", by="")
    assert exc.value.field == "by"
