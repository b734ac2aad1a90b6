"""The scheduler against real PostgreSQL and Redis: one run per tick, Forbid, missed ticks.

In-process tests drive several ``Scheduler``s (each with its own App and pool)
on one injected clock: the test moves the clock, wakes them, and waits for
each one's ``Pass`` signal -- no sleeping, and 300 ticks take seconds. The
process tests run ``kubetasks run`` with a per-second schedule and SIGKILL the
pod that is running a Forbid run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kubetasks import App, TaskContext, cron, locks
from kubetasks.cron import Pass, Scheduler, ScheduleSpec
from kubetasks.errors import KubetasksError, ValidationError
from tests.integration.helpers import ROOT, stop, wait_for
from tests.support import until

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)


class FakeClock:
    """The scheduler's "now", moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    async def __call__(self) -> datetime:
        return self.now


async def db_fetch(db_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def db_now(db_url: str) -> datetime:
    rows = await db_fetch(db_url, "SELECT now() AS now")
    now: datetime = rows[0]["now"]
    return now.replace(microsecond=0)


async def next_pass(q: asyncio.Queue[Pass], at_least: datetime, into: list[cron.TickResult]) -> Pass:
    """Wait for a pass that saw the clock at ``at_least``; results of every pass go to ``into``."""
    async with asyncio.timeout(10):
        while True:
            p = await q.get()
            into.extend(p.results)
            if p.now >= at_least:
                return p


def new_app(db_url: str, pod: str, redis_url: str | None = None) -> App:
    return App(database_url=db_url, redis_url=redis_url, pod_id=pod, heartbeat_interval=0.5, lease_ttl=2.0)


class Harness:
    """Schedulers on one fake clock, each with its own App, run as services until closed."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.apps: list[App] = []
        self.scheds: list[Scheduler] = []
        self.queues: list[asyncio.Queue[Pass]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.results: list[cron.TickResult] = []

    async def start(self, app: App) -> Scheduler:
        await app.open()
        q: asyncio.Queue[Pass] = asyncio.Queue()
        s = Scheduler(app, clock=self.clock, signals=q)
        self.apps.append(app)
        self.scheds.append(s)
        self.queues.append(q)
        self.tasks.append(asyncio.create_task(s.run(self.stop)))
        await next_pass(q, self.clock.now, self.results)
        return s

    async def step(self, to: datetime) -> list[cron.TickResult]:
        """Move the clock, wake every scheduler, wait until each has passed at the new time."""
        self.clock.now = to
        before = len(self.results)
        for s in self.scheds:
            s.wake()
        for q in self.queues:
            await next_pass(q, to, self.results)
        return self.results[before:]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        for a in self.apps:
            await a.close()


@pytest.fixture
async def harness(db_url: str) -> AsyncIterator[Harness]:
    h = Harness(FakeClock(await db_now(db_url)))
    yield h
    await h.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- in-process, injected clock ------------------------------------------------------------


async def test_three_schedulers_300_ticks_one_run_each(db_url: str, harness: Harness) -> None:
    """Three schedulers race for 300 per-second ticks: each is enqueued once and runs once, none missed."""
    name = unique("every-second")
    ran: Counter[datetime] = Counter()

    async def job(ctx: TaskContext) -> None:
        tick = cron.tick_of(ctx)
        assert tick is not None
        ran[tick] += 1

    for i in range(3):
        app = new_app(db_url, f"sched-{i}")
        app.periodic("* * * * * *", name=name, concurrency_policy="Allow")(job)
        await harness.start(app)
    t0 = harness.clock.now
    for i in range(1, 301):
        await harness.step(t0 + i * SECOND)

    ticks = await db_fetch(
        db_url, "SELECT tick_at, outcome, task_id FROM cron_ticks WHERE schedule = $1", name
    )
    expected = {t0 + i * SECOND for i in range(1, 301)}
    assert {r["tick_at"] for r in ticks} == expected
    assert Counter(r["outcome"] for r in ticks) == {"enqueued": 300}
    tasks = await db_fetch(db_url, "SELECT id, tags FROM tasks WHERE handler = $1", name)
    assert len(tasks) == 300
    assert {cron.tick_of(r["tags"]) for r in tasks} == expected
    outcomes = Counter(r.outcome for r in harness.results)
    assert outcomes["enqueued"] == 300 and outcomes["missed"] == 0 and outcomes["skipped"] == 0
    wins = Counter(r.task_id is not None for r in harness.results if r.outcome == "enqueued")
    assert wins[True] == 300
    print(f"\n300 ticks x 3 schedulers: {dict(outcomes)}")

    # Now run them: each tick's handler runs exactly once.
    stop_worker = asyncio.Event()
    worker = asyncio.create_task(harness.apps[0].run_worker(stop=stop_worker, concurrency=50))

    async def all_done() -> bool:
        rows = await db_fetch(
            db_url, "SELECT count(*) AS n FROM tasks WHERE handler = $1 AND status = 'succeeded'", name
        )
        return int(rows[0]["n"]) == 300

    try:
        await wait_for(all_done, 30, "300 runs to succeed")
    finally:
        stop_worker.set()
        await worker
    assert set(ran) == expected and set(ran.values()) == {1}


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_forbid_skips_while_a_run_is_unfinished_or_the_lock_is_held(
    db_url: str, redis_url: str, harness: Harness, backend: str
) -> None:
    """Under Forbid a tick is skipped, naming the holder, until the run ends and its lock is free."""
    name = unique("forbid")
    gate = asyncio.Event()
    started: asyncio.Queue[int] = asyncio.Queue()

    app = new_app(db_url, "pod-a", redis_url if backend == "redis" else None)

    @app.periodic("* * * * *", name=name, lock_ttl=5)
    async def job(ctx: TaskContext) -> None:
        started.put_nowait(ctx.id)
        await gate.wait()

    t0 = harness.clock.now.replace(second=0)
    harness.clock.now = t0
    await harness.start(app)
    stop_worker = asyncio.Event()
    worker = asyncio.create_task(app.run_worker(stop=stop_worker))
    try:
        [r1] = await harness.step(t0 + MINUTE)
        assert r1.outcome == "enqueued" and r1.task_id is not None
        async with asyncio.timeout(10):
            assert await started.get() == r1.task_id

        [r2] = await harness.step(t0 + 2 * MINUTE)
        assert r2.outcome == "skipped"
        assert r2.holder is not None and r2.holder.startswith(f"pod-a/task-{r1.task_id}.1/")
        assert r2.reason == f"run {r1.task_id} of an earlier tick is still running on pod pod-a"
        manual = await cron.trigger(app, name)
        assert manual.outcome == "skipped" and manual.holder == r2.holder

        gate.set()

        async def finished() -> bool:
            return (await app.get_task(r1.task_id)).status == "succeeded"  # type: ignore[arg-type]

        await wait_for(finished, 10, "the first run to finish")
        [r3] = await harness.step(t0 + 3 * MINUTE)
        assert r3.outcome == "enqueued"
        await wait_for(lambda: _status_is(app, r3.task_id, "succeeded"), 10, "the third tick's run to finish")

        # The lock alone (a run that outlived its task row, a dead pod's lock) also forbids.
        async with app.job_lock(cron.lock_name(name), ttl=30, owner="someone-else"):
            [r4] = await harness.step(t0 + 4 * MINUTE)
            assert r4.outcome == "skipped" and r4.holder == "someone-else"
            assert r4.reason is not None and "is held by someone-else" in r4.reason
            status = (await cron.statuses(app, [name]))[0]
            assert status.holder == "someone-else" and status.lock_expires_at is not None
        [r5] = await harness.step(t0 + 5 * MINUTE)
        assert r5.outcome == "enqueued"
        await wait_for(lambda: _status_is(app, r5.task_id, "succeeded"), 10, "the fifth tick's run")
        manual = await cron.trigger(app, name)
        assert manual.outcome == "enqueued"
        await wait_for(lambda: _status_is(app, manual.task_id, "succeeded"), 10, "the manual run")
    finally:
        gate.set()
        stop_worker.set()
        await worker

    rows = await db_fetch(
        db_url,
        "SELECT tick_at, outcome, manual, holder FROM cron_ticks WHERE schedule = $1 ORDER BY tick_at",
        name,
    )
    scheduled = [(r["tick_at"], r["outcome"]) for r in rows if not r["manual"]]
    assert scheduled == [
        (t0 + MINUTE, "enqueued"), (t0 + 2 * MINUTE, "skipped"), (t0 + 3 * MINUTE, "enqueued"),
        (t0 + 4 * MINUTE, "skipped"), (t0 + 5 * MINUTE, "enqueued"),
    ]  # fmt: skip
    assert [r["outcome"] for r in rows if r["manual"]] == ["skipped", "enqueued"]
    [status] = await cron.statuses(app, [name], history=10)
    assert status.last_result == "succeeded" and status.active == 0 and status.holder is None
    assert status.last_task_id == manual.task_id
    assert Counter(h.outcome for h in status.history) == {"enqueued": 4, "skipped": 3}


async def _status_is(app: App, task_id: int | None, status: str) -> bool:
    assert task_id is not None
    return (await app.get_task(task_id)).status == status


async def test_missed_ticks_and_one_catch_up_run(db_url: str, harness: Harness) -> None:
    """After downtime only the newest tick runs, within startingDeadlineSeconds; the rest are counted."""
    name = unique("catch-up")
    t0 = harness.clock.now.replace(second=0)
    harness.clock.now = t0
    apps = [new_app(db_url, f"pod-{i}") for i in range(2)]
    for a in apps:
        a.task("noop")(_noop)
    await apps[0].open()
    # Allow: nothing runs the tasks here, and Forbid would skip behind the first pending run.
    spec = ScheduleSpec(
        name=name, cron="* * * * *", handler="noop", starting_deadline=30, concurrency_policy="Allow"
    )
    assert await cron.upsert_schedule(apps[0].store, spec, since=t0) is True
    for a in apps:
        await harness.start(a)

    # Down ten minutes, back 10 s after the tenth tick: it runs; nine are missed.
    res = await harness.step(t0 + 10 * MINUTE + 10 * SECOND)
    assert Counter(r.outcome for r in res) == {"enqueued": 1, "taken": 1}
    [won] = [r for r in res if r.outcome == "enqueued"]
    assert won.tick_at == t0 + 10 * MINUTE and won.missed == 9
    # Back 45 s after the twentieth: past the deadline, all ten missed.
    res = await harness.step(t0 + 20 * MINUTE + 45 * SECOND)
    assert [r.outcome for r in res if r.outcome != "taken"] == ["missed"]
    # No deadline: the newest runs however late.
    await cron.upsert_schedule(apps[0].store, dataclasses.replace(spec, starting_deadline=None))
    res = await harness.step(t0 + 25 * MINUTE + 50 * SECOND)
    [won] = [r for r in res if r.outcome == "enqueued"]
    assert won.tick_at == t0 + 25 * MINUTE and won.missed == 4

    rows = await db_fetch(db_url, "SELECT tick_at, outcome FROM cron_ticks WHERE schedule = $1", name)
    assert Counter(r["outcome"] for r in rows) == {"enqueued": 2, "missed": 23}
    assert {r["tick_at"] for r in rows} == {t0 + i * MINUTE for i in range(1, 26)}
    [status] = await cron.statuses(apps[0], [name])
    assert status.missed_total == 23 and status.last_scheduled_at == t0 + 25 * MINUTE
    assert status.next_at is not None

    # A new expression restarts the cursor at its change: the fifteen ticks since the
    # last one (25 min) are neither run nor counted as missed.
    harness.clock.now = t0 + 40 * MINUTE
    await cron.upsert_schedule(
        apps[0].store, dataclasses.replace(spec, cron="*/1 * * * *"), since=harness.clock.now
    )
    res = await harness.step(t0 + 40 * MINUTE + SECOND)
    assert [r for r in res if r.outcome != "taken"] == []
    res = await harness.step(t0 + 42 * MINUTE)
    [won] = [r for r in res if r.outcome == "enqueued"]
    assert won.tick_at == t0 + 42 * MINUTE and won.missed == 1


async def _noop(ctx: TaskContext) -> None:
    return None


async def test_schedule_changes_wake_the_scheduler_but_ticks_do_not(db_url: str, harness: Harness) -> None:
    """NOTIFY kubetasks_schedules: sent when a schedule appears, changes timing or goes; not per tick."""
    app = new_app(db_url, "pod-n")
    app.task("noop")(_noop)
    await harness.start(app)
    q = harness.queues[0]
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(db_url)
    ticked: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(cron.CHANNEL, lambda *a: heard.put_nowait(a[3]))
    await conn.add_listener(cron.TICKED_CHANNEL, lambda *a: ticked.put_nowait(a[3]))
    try:
        name = unique("notify")
        spec = ScheduleSpec(name=name, cron="* * * * *", handler="noop")
        await cron.upsert_schedule(app.store, spec, since=harness.clock.now)
        # Woken by NOTIFY, not by the clock (it did not move): a pass that sees the new schedule.
        async with asyncio.timeout(5):
            while (p := await q.get()).next_at is None:
                pass
        assert p.next_at == (harness.clock.now + MINUTE).replace(second=0)
        async with asyncio.timeout(5):
            assert await heard.get() == name

        # A tick's bookkeeping (cursor, last run) wakes no scheduler: the next thing heard is the
        # sentinel. Status writers hear of the tick on their own channel.
        res = await harness.step(harness.clock.now.replace(second=0) + MINUTE)
        assert [r.outcome for r in res] == ["enqueued"]
        sentinel = unique("sentinel")
        await cron.upsert_schedule(app.store, ScheduleSpec(name=sentinel, cron="0 0 * * *", handler="noop"))
        async with asyncio.timeout(5):
            assert await heard.get() == sentinel
            assert await ticked.get() == name

        await cron.upsert_schedule(app.store, dataclasses.replace(spec, suspend=True))
        async with asyncio.timeout(5):
            assert await heard.get() == name
        assert await cron.delete_schedule(app.store, name) is True
        assert await cron.delete_schedule(app.store, name) is False
        async with asyncio.timeout(5):
            assert await heard.get() == name
    finally:
        await conn.close()


async def test_upsert_refuses_bad_schedules_and_name_clashes(app: App) -> None:
    """The API refuses what cannot be computed, naming the field, and writes nothing."""
    bad = {
        "schedule": ScheduleSpec(name="x", cron="0 0 31 2 *", handler="h"),
        "timezone": ScheduleSpec(name="x", cron="* * * * *", handler="h", timezone="Mars/Base"),
        "concurrency_policy": ScheduleSpec(name="x", cron="* * * * *", handler="h", concurrency_policy="x"),
    }
    for field_name, spec in bad.items():
        with pytest.raises(ValidationError) as ei:
            await cron.upsert_schedule(app.store, spec)
        assert ei.value.field == field_name
    assert await cron.statuses(app) == []

    await cron.upsert_schedule(
        app.store, ScheduleSpec(name="shared", cron="* * * * *", handler="h", source="code")
    )
    with pytest.raises(ValidationError, match=r"already defined by @app\.periodic"):
        await cron.upsert_schedule(
            app.store, ScheduleSpec(name="shared", cron="* * * * *", handler="h", cr_uid="u")
        )
    assert await cron.delete_schedule(app.store, "shared", source="crd") is False
    assert await cron.delete_schedule(app.store, "shared", source="code") is True
    with pytest.raises(KubetasksError, match="not found"):
        await cron.trigger(app, "shared")


class CountingLocks:
    """The app's own lock backend, counting the calls a status list makes."""

    def __init__(self, inner: locks.LockBackend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        return await self.inner.acquire(name, owner, ttl_s)

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        return await self.inner.renew(name, owner, ttl_s)

    async def release(self, name: str, owner: str) -> bool:
        return await self.inner.release(name, owner)

    async def holder(self, name: str) -> locks.Holder | None:
        self.calls["holder"] += 1
        return await self.inner.holder(name)

    async def holders(self, names: Sequence[str]) -> dict[str, locks.Holder]:
        self.calls["holders"] += 1
        return await self.inner.holders(names)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_statuses_name_each_schedules_lock_holder_from_one_read(
    db_url: str, redis_url: str, backend: str
) -> None:
    """Each schedule shows its own lock's holder and expiry (or none), all read in one call to
    the lock backend however many schedules are listed."""
    app = new_app(db_url, "pod-s", redis_url if backend == "redis" else None)
    await app.open()
    try:
        names = sorted(unique("held") for _ in range(4))
        for n in names:
            await cron.upsert_schedule(app.store, ScheduleSpec(name=n, cron="*/5 * * * *", handler="h"))
        spy = CountingLocks(app.job_lock("any").backend)
        async with (
            app.job_lock(cron.lock_name(names[0]), ttl=30, owner="alpha"),
            app.job_lock(cron.lock_name(names[2]), ttl=600, owner="gamma"),
        ):
            before = await db_now(db_url)
            got = await cron.statuses(app, names, store=app.store, lock_backend=spy)
        assert [s.name for s in got] == names
        assert [s.holder for s in got] == ["alpha", None, "gamma", None]
        expires = [s.lock_expires_at for s in got]
        assert expires[1] is None and expires[3] is None
        assert expires[0] is not None and before + 25 * SECOND < expires[0] <= before + 31 * SECOND
        assert expires[2] is not None and before + 595 * SECOND < expires[2] <= before + 601 * SECOND
        assert spy.calls == {"holders": 1}
        assert all(s.next_at is not None and s.next_at.minute % 5 == 0 for s in got)
        # Released: nobody holds them, still in one read.
        assert [s.holder for s in await cron.statuses(app, names, store=app.store, lock_backend=spy)] == [
            None
        ] * 4
        assert spy.calls == {"holders": 2}
    finally:
        await app.close()


def _cli(db_url: str, *args: str, app: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT), COLUMNS="250")
    if app:
        env["KUBETASKS_APP"] = app
    return subprocess.run(
        [sys.executable, "-m", "kubetasks", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_list_and_trigger(db_url: str, app: App) -> None:
    """`schedules trigger` runs now and respects Forbid; `schedules list` shows next, last result, holder."""
    name = unique("cli")
    await cron.upsert_schedule(
        app.store, ScheduleSpec(name=name, cron="0 3 * * *", handler="h", timezone="Europe/Berlin")
    )
    first = await asyncio.to_thread(_cli, db_url, "schedules", "trigger", name)
    assert first.returncode == 0, first.stderr
    task_id = int(first.stdout.strip())
    again = await asyncio.to_thread(_cli, db_url, "schedules", "trigger", name)
    assert again.returncode == 1
    assert f"run {task_id} of an earlier tick is still pending" in again.stderr
    missing = await asyncio.to_thread(_cli, db_url, "schedules", "trigger", "no-such-schedule")
    assert missing.returncode == 1 and "not found" in missing.stderr

    listed = await asyncio.to_thread(_cli, db_url, "schedules", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["name"] == name and row["last_task_id"] == task_id and row["last_result"] == "pending"
    assert row["last_outcome"] == "skipped" and row["active"] == 1
    nxt = datetime.fromisoformat(row["next_at"])
    assert nxt.astimezone(cron.zone("Europe/Berlin")).hour == 3
    table = await asyncio.to_thread(_cli, db_url, "schedules", "list", "--history", "5")
    assert table.returncode == 0 and name in table.stdout and "0 3 * * *" in table.stdout


# -- real processes ----------------------------------------------------------------------------


def _start_run(db_url: str, pod: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    full = dict(os.environ)
    full.update(
        KUBETASKS_DATABASE_URL=db_url, KUBETASKS_POD_ID=pod, KUBETASKS_HEARTBEAT_INTERVAL="0.5",
        KUBETASKS_LEASE_TTL="2", KUBETASKS_SHUTDOWN_GRACE="5", KUBETASKS_OPERATOR="0", PYTHONPATH=str(ROOT),
    )  # fmt: skip
    full.update(env)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetasks", "run", "--app", "tests.integration.apps.cronapp:app"],
            cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _sidelog(path: Path) -> list[tuple[str, int, int, str, str, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, tid, attempt, tick, pod, pid, mono = line.split()
        out.append((kind, int(tid), int(attempt), tick, pod, int(pid), float(mono)))
    return out


@pytest.mark.chaos
@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_processes_sigkill_mid_run_under_forbid(
    db_url: str, redis_url: str, tmp_path: Path, backend: str
) -> None:
    """Three `kubetasks run` pods, a per-second Forbid schedule; the pod running a run is SIGKILLed.

    Every second gets exactly one tick row and none is missed; no two runs
    overlap; while the dead pod's run is unfinished or its lock live, ticks are
    skipped naming it; then runs resume.
    """
    name = unique("proc")
    sidelog, control = tmp_path / "side.log", tmp_path / "control"
    control.mkdir()
    env = {"SIDELOG": str(sidelog), "CRON_CONTROL": str(control), "CRON_NAME": name, "CRON_LOCK_TTL": "3"}
    if backend == "redis":
        env["KUBETASKS_REDIS_URL"] = redis_url
    procs = {f"pod-{i}": _start_run(db_url, f"pod-{i}", env, tmp_path / f"pod-{i}.log") for i in range(3)}
    killed_pod, kill_mono = "", 0.0
    try:
        await until(lambda: sum(1 for e in _sidelog(sidelog) if e[0] == "end") >= 8, 40, "eight runs")
        (control / "hang").touch()
        await until(lambda: any(e[0] == "hang" for e in _sidelog(sidelog)), 10, "a run to hang")
        hang = next(e for e in _sidelog(sidelog) if e[0] == "hang")
        hung_task, killed_pod = hang[1], hang[4]
        (control / "hang").unlink()
        procs[killed_pod].send_signal(signal.SIGKILL)
        kill_mono = time.monotonic()
        procs[killed_pod].wait(10)

        def recovered_and_resumed() -> bool:
            ends = [e for e in _sidelog(sidelog) if e[0] == "end"]
            return any(e[1] == hung_task for e in ends) and sum(1 for e in ends if e[1] > hung_task) >= 6

        await until(recovered_and_resumed, 40, "the killed run to be recovered and runs to resume")
    finally:
        for pod, p in procs.items():
            if pod != killed_pod:
                stop(p)
            elif p.poll() is None:
                p.kill()
                p.wait(10)

    ticks = await db_fetch(
        db_url,
        "SELECT tick_at, outcome, task_id, holder FROM cron_ticks WHERE schedule = $1 ORDER BY tick_at",
        name,
    )
    times = [r["tick_at"] for r in ticks]
    assert times == [times[0] + i * SECOND for i in range(len(times))], "a second without a tick row"
    outcomes = Counter(r["outcome"] for r in ticks)
    assert outcomes["missed"] == 0
    side = _sidelog(sidelog)
    ends = Counter(e[3] for e in side if e[0] == "end")
    assert max(ends.values()) == 1, "a tick ran twice"
    tasks = {
        r["id"]: r["status"]
        for r in await db_fetch(db_url, "SELECT id, status FROM tasks WHERE handler = $1", name)
    }
    enqueued = {r["task_id"] for r in ticks if r["outcome"] == "enqueued"}
    assert set(tasks) == enqueued
    for r in ticks:
        if r["outcome"] == "enqueued" and tasks[r["task_id"]] == "succeeded":
            assert ends[r["tick_at"].isoformat()] == 1
    assert tasks[hung_task] == "succeeded"
    # Forbid: runs never overlap (the hung attempt lasted until the kill).
    starts = {(e[1], e[2]): e[6] for e in side if e[0] == "start"}
    finish = {(e[1], e[2]): e[6] for e in side if e[0] == "end"}
    finish[(hung_task, 1)] = kill_mono
    spans = sorted((starts[k], finish[k]) for k in starts if k in finish)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), "two runs overlapped"
    retry_start = min(v for (tid, att), v in starts.items() if tid == hung_task and att > 1)
    assert retry_start >= kill_mono
    # Skipped after the kill, naming the dead pod's run, then enqueued again.
    hung_tick = next(r["tick_at"] for r in ticks if r["task_id"] == hung_task)
    after = [r for r in ticks if r["tick_at"] > hung_tick]
    dead_holder = [
        r
        for r in after
        if r["outcome"] == "skipped" and (r["holder"] or "").startswith(f"{killed_pod}/task-{hung_task}.1/")
    ]
    assert dead_holder, "no tick was skipped naming the killed pod's run"
    last_skip = max(i for i, r in enumerate(after) if r["outcome"] == "skipped")
    assert sum(1 for r in after[last_skip:] if r["outcome"] == "enqueued") >= 2
    print(
        f"\n{backend}: {len(ticks)} ticks {dict(outcomes)}; runs {sum(ends.values())}; "
        f"skipped naming the dead run {len(dead_holder)}; "
        f"retry started {retry_start - kill_mono:.1f}s after the kill"
    )


async def test_run_refuses_a_schedule_that_never_fires(db_url: str, tmp_path: Path) -> None:
    """`kubetasks run` with an impossible @app.periodic exits 2 naming the field."""
    env = {"CRON_EXPR": "0 0 31 2 *", "CRON_NAME": unique("never"), "SIDELOG": str(tmp_path / "s")}
    p = _start_run(db_url, "pod-x", env, tmp_path / "x.log")
    try:
        code = await asyncio.to_thread(p.wait, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    assert code == 2
    assert "schedule: '0 0 31 2 *' never fires" in (tmp_path / "x.log").read_text()
