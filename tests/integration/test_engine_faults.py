"""The engine's guarantees under real faults (issue 13), one focused test per defect.

Each test injects the fault that broke a guarantee -- an outcome PostgreSQL
cannot store, a claim whose reply is late, a commit that lands after a reap, a
stall of the database longer than the lease, two processes with one pod id, a
handler that blocks its event loop, a cancel sent while LISTEN is down -- and
asserts the guarantee, not a figure. Figures are printed for the closing note
(`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest, Fail, Retry, TaskContext, devenv
from kubetasks.errors import ValidationError
from kubetasks.store import migrate
from kubetasks.worker import Outcome, Worker
from tests.integration.helpers import RunningWorker, audit, read_sidelog, start_worker, stop, wait_for
from tests.support import connect

pytestmark = pytest.mark.chaos
BLOCKAPP = "tests.integration.apps.blockapp:app"


def report(title: str, **figures: object) -> None:
    print(f"\n[engine-faults] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def fetchval(db_url: str, sql: str, *args: object) -> Any:
    conn = await connect(db_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def fetch(db_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await connect(db_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def statuses(db_url: str, ids: list[int]) -> Counter[str]:
    rows = await fetch(db_url, "SELECT status FROM tasks WHERE id = ANY($1)", ids)
    return Counter(r["status"] for r in rows)


async def register_raw(
    conn: asyncpg.Connection, pod: str, ttl: float = 30.0, handlers: tuple[str, ...] = ()
) -> uuid.UUID:
    """A worker registered with the statement every version has (no process behind it), serving
    ``handlers`` as a worker records them right after registering (the claim takes only those)."""
    wid = uuid.uuid4()
    await conn.fetchrow(
        "SELECT * FROM register_worker($1, $2, 'h', 1, ARRAY['default'], 10, $3)", wid, pod, ttl
    )
    if handlers:
        await conn.fetchrow("SELECT * FROM worker_serves($1, $2, '{}', '[]', 1000)", wid, list(handlers))
    return wid


async def noop(ctx: TaskContext) -> None:
    return None


def starts(sidelog: Path) -> Counter[tuple[int, int]]:
    """How often each (task, attempt) started, from the side log."""
    return Counter((t, a) for kind, t, a, *_ in read_sidelog(sidelog) if kind == "start")


# -- 1. an outcome PostgreSQL cannot store ----------------------------------------


class TestUnstorableOutcomes:
    async def test_poison_errors_and_results_do_not_wedge_the_worker(self, app: App) -> None:
        """Error texts with NUL or lone surrogates, results PostgreSQL cannot store and an absurd
        retry delay all end as failures with the attempt counted; every other task succeeds."""

        @app.task("poison", max_attempts=1)
        async def poison(ctx: TaskContext) -> Any:
            kind = ctx.payload["kind"]
            if kind == "nul":
                raise RuntimeError("bad byte \x00 in the middle")
            if kind == "surrogate":
                name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
                raise FileNotFoundError(f"no such file: {name}")
            if kind == "delay":
                raise Retry(delay=1e14)
            if kind == "result_surrogate":
                return {"name": b"\xfe".decode("utf-8", "surrogateescape")}
            return {"text": "nul \x00 here"}

        @app.task("fine")
        async def fine(ctx: TaskContext) -> int:
            await asyncio.sleep(0.01)
            return int(ctx.payload["n"])

        kinds = ["nul", "surrogate", "delay", "result_surrogate", "result_nul"]
        bad = await app.enqueue_many([EnqueueRequest("poison", {"kind": k}) for k in kinds])
        good = await app.enqueue_many([EnqueueRequest("fine", {"n": i}) for i in range(40)])
        async with RunningWorker(app, concurrency=4) as worker:

            async def settled() -> bool:
                recs = [await app.get_task(t) for t in bad + good]
                return all(r.status in ("succeeded", "failed") for r in recs)

            await wait_for(settled, 30, "every task to end")
        errors = {k: (await app.get_task(t)) for k, t in zip(kinds, bad, strict=True)}
        report("poison outcomes", stats=worker.stats, **{k: r.error for k, r in errors.items()})
        for t in good:
            assert (await app.get_task(t)).status == "succeeded"
        for k, rec in errors.items():
            assert rec.status == "failed", (k, rec.status)
            assert rec.attempts_spent == 1, k
            assert rec.error and "\x00" not in rec.error, k
            rec.error.encode("utf-8")  # storable, so readable
        assert "\\x00" in (errors["nul"].error or "")
        assert "\\udcff" in (errors["surrogate"].error or "")
        assert "delay" in (errors["delay"].error or "")
        assert "result.name" in (errors["result_surrogate"].error or "")
        assert "result.text" in (errors["result_nul"].error or "")

    async def test_an_outcome_refused_by_the_database_is_split_from_its_batch(self, app: App) -> None:
        """A worker that let an unstorable error through (simulated by a subclass) still writes
        every other outcome of the batch, and the bad one as a failure saying why."""
        release = asyncio.Event()

        @app.task("batch", max_attempts=3)
        async def batch(ctx: TaskContext) -> int:
            await release.wait()
            if ctx.payload["bad"]:
                raise RuntimeError("handler failed")
            return 1

        class Careless(Worker):
            def _set_failure(self, out: Outcome, row: Any, *args: Any, **kw: Any) -> None:
                super()._set_failure(out, row, *args, **kw)
                out.error = "unsanitised \x00 text"  # what an unguarded path would send
                out.delay = 1e300

        ids = await app.enqueue_many([EnqueueRequest("batch", {"bad": i == 3}) for i in range(8)])
        worker = Careless(app, concurrency=8)
        stop_ev = asyncio.Event()
        task = asyncio.create_task(worker.run(stop_ev))
        try:
            await asyncio.wait_for(worker.ready.wait(), 10)

            async def all_running() -> bool:
                return (await statuses(app.settings.database_url, ids))["running"] == 8

            await wait_for(all_running, 15, "eight running")
            release.set()  # all eight end together: one batch

            async def settled() -> bool:
                c = await statuses(app.settings.database_url, ids)
                return c["succeeded"] == 7 and c["failed"] == 1

            await wait_for(settled, 20, "seven successes and the bad one failed")
        finally:
            stop_ev.set()
            await asyncio.wait_for(task, 30)
        rec = await app.get_task(ids[3])
        report("split batch", error=rec.error, unstorable=worker.stats.unstorable)
        assert rec.error is not None and rec.error.startswith("outcome could not be stored (retried)")
        assert rec.attempts_spent == 1
        assert worker.stats.unstorable >= 1


# -- 2. Fail and Retry used wrongly ---------------------------------------------------


class TestMisusedFailAndRetry:
    def test_arguments_are_checked_where_they_are_built(self) -> None:
        """Wrong types and absurd delays are refused by the constructor, naming the argument."""
        for bad in ("busy", -1, float("nan"), float("inf"), 1e14, True):
            with pytest.raises(ValidationError) as ei:
                Retry(bad)  # type: ignore[arg-type]
            assert ei.value.field == "delay", bad
        with pytest.raises(ValidationError) as ei:
            Fail(42)  # type: ignore[arg-type]
        assert ei.value.field == "message"
        with pytest.raises(ValidationError) as ei:
            Retry(1.0, message=None)  # type: ignore[arg-type]
        assert ei.value.field == "message"
        assert Fail(RuntimeError("boom")).message == "RuntimeError: boom"
        assert Retry(2, RuntimeError("later")).delay == 2.0

    async def test_a_misused_fail_or_retry_never_leaks_a_slot(self, app: App) -> None:
        """With one slot: Fail(exc), Retry("busy") and an exception whose text cannot be read
        each end their task, and the next task still runs."""

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no text for you")

        @app.task("misuse", max_attempts=1)
        async def misuse(ctx: TaskContext) -> None:
            how = ctx.payload["how"]
            if how == "fail_exc":
                raise Fail(RuntimeError("boom"))
            if how == "retry_str":
                raise Retry("busy")  # type: ignore[arg-type]
            raise Unprintable()

        @app.task("after")
        async def after(ctx: TaskContext) -> str:
            return "ran"

        ids = await app.enqueue_many(
            [
                EnqueueRequest("misuse", {"how": h}, priority=10)
                for h in ("fail_exc", "retry_str", "unprintable")
            ]
        )
        last = await app.enqueue("after", {})
        async with RunningWorker(app, concurrency=1):

            async def ran() -> bool:
                return (await app.get_task(last)).status == "succeeded"

            await wait_for(ran, 20, "the task after the misused ones to run")
        recs = [await app.get_task(t) for t in ids]
        report("misused Fail/Retry", errors=[r.error for r in recs])
        assert [r.status for r in recs] == ["failed"] * 3
        assert recs[0].error == "RuntimeError: boom"
        assert "delay" in (recs[1].error or "") and "busy" in (recs[1].error or "")
        assert recs[2].error


# -- 3. the fencing token is never reused -----------------------------------------------


class TestFencingToken:
    async def test_no_attempt_number_starts_twice_across_graceful_releases(
        self, app: App, db_url: str, tmp_path: Path
    ) -> None:
        """SIGTERM hands long tasks back; the next run takes a new attempt number, uncharged."""
        app.strict_handlers = False
        sidelog = tmp_path / "side.log"
        ids = await app.enqueue_many(
            [EnqueueRequest("side.sleep", {"s": 3.0}, max_attempts=1) for _ in range(4)]
        )
        env = {"KUBETASKS_SHUTDOWN_GRACE": "0.2"}
        first = start_worker(db_url, pod="first", sidelog=sidelog, extra_env=env, log_path=tmp_path / "f.log")
        second = None
        try:

            async def running() -> bool:
                return (await statuses(db_url, ids))["running"] == 4

            await wait_for(running, 20, "four running")
            assert stop(first) == 0
            second = start_worker(db_url, pod="second", sidelog=sidelog, log_path=tmp_path / "s.log")

            async def done() -> bool:
                return (await statuses(db_url, ids))["succeeded"] == 4

            await wait_for(done, 30, "all four to succeed elsewhere")
        finally:
            if second:
                stop(second)
        twice = [k for k, n in starts(sidelog).items() if n > 1]
        report("graceful release", started_twice=twice)
        assert twice == []
        rows = await fetch(db_url, "SELECT attempt, uncharged FROM tasks WHERE id = ANY($1)", ids)
        assert all((r["attempt"], r["uncharged"]) == (2, 1) for r in rows)

    async def test_a_lost_claim_reply_hands_back_a_new_number(self, app: App, db_url: str) -> None:
        """A claim whose reply never arrived is handed back; the next claim of that task gets
        attempt 2, not attempt 1 again."""
        app.register("solo", noop)
        tid = await app.enqueue("solo", {})
        claim = app.store.queries["claim"].sql
        conn = await connect(db_url)
        try:
            wid = await register_raw(conn, "lost-reply", handlers=("solo",))
            first = await conn.fetch(claim, wid, "lost-reply", ["default"], 1, [], [], [], [], [], [], [])
            assert [(r["id"], r["attempt"]) for r in first] == [(tid, 1)]
            # The worker never saw that reply: it hands back what it does not run.
            await conn.fetchval(app.store.queries["release_orphans"].sql, wid, [], "claim reply lost")
            again = await conn.fetch(claim, wid, "lost-reply", ["default"], 1, [], [], [], [], [], [], [])
        finally:
            await conn.close()
        report("lost claim reply", first=first[0]["attempt"], again=[r["attempt"] for r in again])
        assert [(r["id"], r["attempt"]) for r in again] == [(tid, 2)]

    async def test_orphans_are_never_released_while_a_claim_is_in_flight(self, app: App) -> None:
        """A claim fails, and while its retry waits, a claim made with completions commits but
        its reply is slow: that claim's tasks must not be handed back as orphans (they run)."""
        release_first = asyncio.Event()
        started: list[tuple[int, int]] = []

        @app.task("slowreply")
        async def slowreply(ctx: TaskContext) -> None:
            started.append((ctx.id, ctx.attempt))
            if ctx.payload.get("first"):
                await release_first.wait()
            else:
                await asyncio.sleep(0.5)

        flusher_claimed = asyncio.Event()

        class SlowReplies(Worker):
            """Claims fail once on demand; the reply of a claim made with completions is
            processed 0.5 s after its statement committed (a slow link)."""

            fail_next_claim = False

            async def _claim(self, free: int) -> bool:
                if self.fail_next_claim:
                    self.fail_next_claim = False
                    release_first.set()  # the running task ends: its completion claims the next
                    raise ConnectionResetError("connection reset (injected)")
                return await super()._claim(free)

            async def _run_claim(
                self,
                wid: uuid.UUID,
                q: str,
                free: int,
                blocked: list[str],
                ok: Any = (),
                *,
                full: bool = True,
            ) -> tuple[set[int], int]:
                if not (ok and free):
                    return await super()._run_claim(wid, q, free, blocked, ok, full=full)
                held: list[tuple[Any, uuid.UUID]] = []
                start = self._start
                self._start = lambda r, w: held.append((r, w))  # type: ignore[method-assign]
                try:
                    res = await super()._run_claim(wid, q, free, blocked, ok, full=full)
                finally:
                    self._start = start  # type: ignore[method-assign]
                if held:
                    flusher_claimed.set()
                    await asyncio.sleep(0.5)
                for r, w in held:
                    self._start(r, w)
                return res

        first = await app.enqueue("slowreply", {"first": True})
        worker = SlowReplies(app, concurrency=2)
        stop_ev = asyncio.Event()
        run = asyncio.create_task(worker.run(stop_ev))
        try:
            await asyncio.wait_for(worker.ready.wait(), 10)

            async def first_running() -> bool:
                return (await app.get_task(first)).status == "running"

            await wait_for(first_running, 10, "the first task to run")
            worker.fail_next_claim = True  # the claim this enqueue wakes fails
            rest = await app.enqueue_many([EnqueueRequest("slowreply", {}) for _ in range(3)])

            async def all_done() -> bool:
                recs = [await app.get_task(t) for t in [first, *rest]]
                return all(r.status == "succeeded" for r in recs)

            await wait_for(all_done, 20, "all four to succeed")
        finally:
            stop_ev.set()
            await asyncio.wait_for(run, 30)
        released = await fetchval(
            app.settings.database_url,
            "SELECT count(*) FROM task_events WHERE kind = 'released' AND detail = 'claim reply lost'",
        )
        twice = [k for k, n in Counter(started).items() if n > 1]
        report(
            "claim in flight",
            flusher_claimed=flusher_claimed.is_set(),
            released=released,
            started_twice=twice,
        )
        assert twice == []
        assert released == 0

    async def test_a_claim_survives_a_crash(self, tmp_path: Path) -> None:
        """A claim commits durably: after an immediate shutdown (a crash) the task is still
        claimed, so the attempt it started cannot start again under the same number."""
        rd = tmp_path / "own-run"
        state = devenv.up(rd)  # a server of our own: it is crashed on purpose
        try:
            admin = await asyncpg.connect(state.admin_url())
            try:
                await admin.execute("CREATE DATABASE crashy")  # synchronous_commit as the server has it
                # WAL of asynchronous commits would wait 10 s for the writer: a crash loses it.
                await admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
                await admin.execute("SELECT pg_reload_conf()")
            finally:
                await admin.close()
            url = state.admin_url("crashy")
            await migrate(url)
            app = App(database_url=url, strict_handlers=False)
            tid = await app.enqueue("anything", {})
            claim = app.store.queries["claim"].sql
            await app.close()
            conn = await connect(url)
            try:
                wid = await register_raw(conn, "crash-pod", handlers=("anything",))
                rows = await conn.fetch(claim, wid, "crash-pod", ["default"], 1, [], [], [], [], [], [], [])
                assert [(r["id"], r["attempt"]) for r in rows] == [(tid, 1)]
            finally:
                conn.terminate()
            await asyncio.to_thread(devenv.restart_postgres, state)
            row = (await fetch(url, "SELECT status, attempt, worker_id FROM tasks WHERE id = $1", tid))[0]
            report("claim across a crash", status=row["status"], attempt=row["attempt"])
            assert (row["status"], row["attempt"], row["worker_id"]) == ("running", 1, wid)
        finally:
            devenv.down(rd)


# -- 4. a claim that commits after its worker was reaped ----------------------------------


class TestLateClaim:
    async def test_a_claim_committing_after_the_reap_is_released(self, app: App, db_url: str) -> None:
        """A claim holds its transaction open (a slow commit) while its worker's lease expires
        and a peer reaps: no task stays running under a worker that is not live."""
        app.register("solo", noop)
        ids = await app.enqueue_many([EnqueueRequest("solo") for _ in range(3)])
        claim = app.store.queries["claim"].sql
        slow = await connect(db_url)
        peer = await connect(db_url)
        try:
            wid = await register_raw(slow, "slow-commit", handlers=("solo",))
            tx = slow.transaction()
            await tx.start()
            rows = await slow.fetch(claim, wid, "slow-commit", ["default"], 3, [], [], [], [], [], [], [])
            assert len(rows) == 3
            await peer.execute(
                "UPDATE workers SET lease_expires_at = now() - interval '1 s' WHERE worker_id = $1", wid
            )
            reaped_first = await peer.fetch("SELECT * FROM reap_expired_workers()")
            await tx.commit()  # the claim lands after the reap
            reaped_then = await peer.fetch("SELECT * FROM reap_expired_workers()")
            stuck = await peer.fetchval(
                "SELECT count(*) FROM tasks t WHERE t.status = 'running' AND NOT EXISTS ("
                " SELECT 1 FROM workers w"
                " WHERE w.worker_id = t.worker_id AND w.status IN ('active', 'stopping'))"
            )
            state = await peer.fetch("SELECT status FROM tasks WHERE id = ANY($1)", ids)
        finally:
            await slow.close()
            await peer.close()
        report("late claim", reaped_first=len(reaped_first), reaped_then=len(reaped_then), stuck=stuck)
        assert stuck == 0
        assert {r["status"] for r in state} == {"pending"}

    async def test_late_writes_of_a_dead_worker_are_refused_and_its_tasks_swept(
        self, app: App, db_url: str
    ) -> None:
        """A task running under a worker already declared dead (a previous-version pod's late
        claim): that worker's completion is refused, and a peer's heartbeat releases the task."""
        app.register("solo", noop)
        tid = await app.enqueue("solo", {})
        claim = app.store.queries["claim"].sql
        conn = await connect(db_url)
        try:
            dead = await register_raw(conn, "late-pod", handlers=("solo",))
            live = await register_raw(conn, "live-pod")
            await conn.fetch(claim, dead, "late-pod", ["default"], 1, [], [], [], [], [], [], [])
            await conn.execute(
                "UPDATE workers SET status = 'dead', stopped_at = now(), stop_reason = 'test'"
                " WHERE worker_id = $1",
                dead,
            )
            written = await conn.fetch(claim, dead, "late-pod", [], 0, [], [tid], [1], ["{}"], [], [], [])
            for _ in range(3):  # the sweep runs on about two heartbeats per interval across live workers
                await conn.fetchrow("SELECT * FROM heartbeat($1, 30, ARRAY['default'], 7.5)", live)
            row = (await conn.fetch("SELECT status, worker_id FROM tasks WHERE id = $1", tid))[0]
        finally:
            await conn.close()
        report("dead worker's late write", written=len(written), status=row["status"])
        assert written == []
        assert row["status"] == "pending"


# -- 5. a database stall longer than the lease ---------------------------------------------


class TestDatabaseStall:
    async def test_eighty_heartbeats_after_a_stall_declare_no_one_dead(self, app: App, db_url: str) -> None:
        """80 live workers' heartbeats wait behind a lock for longer than the ttl, then all run
        at once: no worker is declared dead and no heartbeat deadlocks."""
        n, ttl = 80, 2.0
        conns = [await connect(db_url) for _ in range(n)]
        blocker = await connect(db_url)
        try:
            wids = [await register_raw(c, f"stall-{i}") for i, c in enumerate(conns)]
            deadlocks0 = await blocker.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )

            async def beat(c: asyncpg.Connection, wid: uuid.UUID) -> str:
                try:
                    row = await c.fetchrow(
                        "SELECT * FROM heartbeat($1, $2, ARRAY['default'], 0.75)", wid, ttl
                    )
                except asyncpg.DeadlockDetectedError:
                    return "deadlock"
                return "alive" if row["alive"] else "dead"

            # All live, with leases of one ttl, when the stall begins (registering 80 one by one
            # can take longer than a ttl on a loaded machine; a lease that ran out before the
            # stall, while the others reached the database, is reaped by design).
            before = Counter(await asyncio.gather(*(beat(c, w) for c, w in zip(conns, wids, strict=True))))
            assert before == Counter({"alive": n})
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE workers IN ACCESS EXCLUSIVE MODE")
            beats = [asyncio.create_task(beat(c, w)) for c, w in zip(conns, wids, strict=True)]
            await asyncio.sleep(ttl + 1.5)  # every lease runs out while the database stalls
            await tx.commit()
            results = Counter(await asyncio.gather(*beats))
            # and once more, as the next round of heartbeats would
            again = Counter(await asyncio.gather(*(beat(c, w) for c, w in zip(conns, wids, strict=True))))
            dead = await blocker.fetchval("SELECT count(*) FROM workers WHERE status = 'dead'")
            await asyncio.sleep(1.5)  # backends publish their statistics at most once a second
            await blocker.execute("SELECT pg_stat_clear_snapshot()")
            deadlocks = (
                await blocker.fetchval(
                    "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
                )
                - deadlocks0
            )
        finally:
            for c in conns:
                await c.close()
            await blocker.close()
        report(
            "80 heartbeats after a stall",
            first=dict(results),
            second=dict(again),
            dead=dead,
            deadlocks=deadlocks,
        )
        assert results == Counter({"alive": n})
        assert again == Counter({"alive": n})
        assert dead == 0 and deadlocks == 0

    async def test_a_heartbeat_rolled_back_after_an_outage_gets_no_one_declared_dead(
        self, app: App, db_url: str
    ) -> None:
        """The first contacts after an outage, as the heartbeat storm showed them: a heartbeat
        that locked rows and then rolled back (its client had given up on it and cancelled it),
        while a process that fenced itself registers again and commits. No worker may be
        declared dead while its process comes back within a ttl; one whose process never comes
        back is declared dead one ttl (plus a heartbeat) after the database returned."""
        ttl, silence = 1.0, 0.5
        beat = "SELECT * FROM heartbeat($1, $2, ARRAY['default'], $2::float8 * 0.75, $3, NULL, NULL)"
        register = "SELECT * FROM register_worker($1, $2, 1, NULL, 'h', 1, ARRAY['default'], 1, $3, $4)"
        names = ("a", "b", "gone")
        conns = {name: await connect(db_url) for name in (*names, "new")}
        wids = {name: uuid.uuid4() for name in (*names, "new")}
        try:
            for name in names:
                await conns[name].fetchrow(register, wids[name], f"outage-{name}", ttl, silence)
            await asyncio.sleep(ttl + silence)  # nobody reaches the database; every lease runs out
            doomed = conns["a"].transaction()
            await doomed.start()
            await conns["a"].fetchrow(beat, wids["a"], ttl, silence)
            reg = await conns["new"].fetchrow(register, wids["new"], "outage-new", ttl, silence)
            await doomed.rollback()
            back = time.monotonic()
            # The next heartbeats, as they arrive: the new worker's, then those of a and b.
            seen: dict[str, list[bool]] = {name: [] for name in ("new", "a", "b")}
            gone_dead_after: float | None = None
            while time.monotonic() - back < ttl + 2.0:
                for name, alive in seen.items():
                    row = await conns[name].fetchrow(beat, wids[name], ttl, silence)
                    alive.append(bool(row["alive"]))
                status = await conns["new"].fetchval(
                    "SELECT status FROM workers WHERE worker_id = $1", wids["gone"]
                )
                if status != "active":
                    gone_dead_after = time.monotonic() - back
                    break
                await asyncio.sleep(0.1)
            dead = await conns["new"].fetch(
                "SELECT pod_id, stop_reason FROM workers WHERE status <> 'active' ORDER BY pod_id"
            )
        finally:
            for c in conns.values():
                await c.close()
        report("a heartbeat rolled back after an outage", spared=reg["extended"],
               gone_dead_after_s=gone_dead_after and round(gone_dead_after, 2),
               not_active=[tuple(r) for r in dead])  # fmt: skip
        assert all(all(v) for v in seen.values()), f"live workers declared dead: {seen}, {dead}"
        assert [tuple(r) for r in dead] == [("outage-gone", "lease expired")]
        assert gone_dead_after is not None and ttl * 0.9 <= gone_dead_after <= ttl + 1.5

    async def test_processes_still_coming_back_after_an_outage_are_not_declared_dead(
        self, app: App, db_url: str
    ) -> None:
        """After an outage every process that fenced itself comes back at once, and on a starved
        machine the last of them registers again more than a ttl after the database returned
        (hb_storm: 80 workers on two busy cores). While they keep coming back, none still on
        its way may be declared dead; one whose process never comes back is declared dead one
        ttl after the last of the others came back."""
        ttl, silence = 2.0, 1.0
        beat = "SELECT * FROM heartbeat($1, $2, ARRAY['default'], $2::float8 * 0.75, $3, NULL, NULL)"
        register = "SELECT * FROM register_worker($1, $2, 1, $5, 'h', 1, ARRAY['default'], 1, $3, $4)"
        names = ("a", "b", "c", "gone")
        conns = {name: await connect(db_url) for name in names}
        wids = {name: uuid.uuid4() for name in names}
        try:
            for name in names:
                await conns[name].fetchrow(register, wids[name], f"return-{name}", ttl, silence, None)
            await asyncio.sleep(ttl + silence)  # nobody reaches the database; every lease runs out
            row = await conns["a"].fetchrow(beat, wids["a"], ttl, silence)  # a's heartbeat ends it
            back = time.monotonic()
            assert row["alive"] and row["extended"] == 4
            returned: dict[str, float] = {}
            gone_dead_after: float | None = None
            # b's process registers again 0.6 ttl after the database returned, c's 1.2 ttl after
            # (later than a ttl); a heartbeats (and reaps) all along.
            due = {"b": 0.6 * ttl, "c": 1.2 * ttl}
            while time.monotonic() - back < 4 * ttl:
                for name, at in due.items():
                    if name not in returned and time.monotonic() - back >= at:
                        old, wids[name] = wids[name], uuid.uuid4()
                        await conns[name].fetchrow(register, wids[name], f"return-{name}", ttl, silence, old)
                        returned[name] = time.monotonic() - back
                for name in ("a", *returned):
                    assert (await conns[name].fetchrow(beat, wids[name], ttl, silence))["alive"], name
                status = await conns["a"].fetchval(
                    "SELECT status FROM workers WHERE worker_id = $1", wids["gone"]
                )
                if status != "active":
                    gone_dead_after = time.monotonic() - back
                    break
                await asyncio.sleep(0.1)
            dead = await conns["a"].fetch(
                "SELECT pod_id, stop_reason FROM workers WHERE status = 'dead' ORDER BY pod_id"
            )
        finally:
            for c in conns.values():
                await c.close()
        report("processes still coming back after an outage", returned=returned,
               gone_dead_after_s=gone_dead_after and round(gone_dead_after, 2),
               dead=[tuple(r) for r in dead])  # fmt: skip
        assert [tuple(r) for r in dead] == [("return-gone", "lease expired")], "live workers declared dead"
        assert set(returned) == {"b", "c"} and returned["c"] > ttl
        assert gone_dead_after is not None
        assert returned["c"] + ttl * 0.9 <= gone_dead_after <= returned["c"] + ttl + 1.5

    async def test_a_lease_lost_while_registering_again_fences_the_worker_again(
        self, app: App, db_url: str
    ) -> None:
        """After an outage the worker that fenced itself registers again; the new lease can be
        lost in its turn before the worker is back at work (hb_storm: its first heartbeat's
        reply came after its own clock's lease ran out, a starved process). That loss must
        fence the worker again and bring a new registration; forgotten, the process serves on
        under a lease nobody renews and is declared dead one ttl later while alive."""
        pod = app.settings.pod_id
        async with RunningWorker(app, concurrency=1) as worker:
            w = worker
            original = w._serve
            entered, gate = asyncio.Event(), asyncio.Event()

            async def gated() -> None:  # the re-registration's step after register, held open
                entered.set()
                await gate.wait()
                await original()

            w._serve = gated  # type: ignore[method-assign]
            kill = (
                "UPDATE workers SET status = 'dead', stopped_at = now(), stop_reason = 'test: lease"
                " taken' WHERE worker_id = $1 AND status = 'active'"
            )

            async def epochs() -> list[int]:
                rows = await fetch(db_url, "SELECT epoch FROM workers WHERE pod_id = $1 ORDER BY epoch", pod)
                return [int(r["epoch"]) for r in rows]

            first = w.worker_id
            assert await fetchval(db_url, kill, first) is None  # the next heartbeat loses this lease
            await asyncio.wait_for(entered.wait(), 10)
            second = w.worker_id
            assert second != first and await epochs() == [1, 2]
            await fetch(db_url, kill, second)  # lost again, while the worker is not back yet

            async def lost() -> bool:
                return w.lease is not None and w.lease.lost

            await wait_for(lost, 10, "the second lease to be lost")
            gate.set()

            async def third() -> bool:
                return len(await epochs()) == 3 and w.lease is not None and not w.lease.lost

            await wait_for(third, 10, "the worker to register a third time")
            alive = await fetchval(db_url, "SELECT status FROM workers WHERE worker_id = $1", w.worker_id)
            report("a lease lost while registering again", registrations=await epochs(), third=alive)
            assert alive == "active"

    async def test_a_registration_that_waited_out_an_outage_leaves_a_whole_lease(
        self, app: App, db_url: str
    ) -> None:
        """A worker fenced by an outage registers again, and the reply comes when the outage
        ends: by its own clock (counted from the request) that new lease has already run out,
        so its first heartbeat would get 0.1 s, and a starved process's late reply would lose a
        lease the database holds (hb_storm). The worker renews before it goes back to work."""
        ttl = app.settings.lease_ttl
        async with RunningWorker(app, concurrency=1) as worker:
            w = worker
            original = w._serve
            left: list[float] = []

            async def noting() -> None:  # runs as register() returns, before the first heartbeat
                assert w.lease is not None
                left.append(w.lease.time_left())
                await original()

            w._serve = noting  # type: ignore[method-assign]
            blocker = await connect(db_url)
            try:
                async with blocker.transaction():
                    await blocker.execute("LOCK TABLE workers IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(2 * ttl + 0.5)  # fenced after ttl; registering for > ttl

                async def registered() -> bool:
                    return bool(left)

                await wait_for(registered, 10, "the worker to register again")
            finally:
                await blocker.close()
            report("a registration that waited out an outage", time_left_s=round(left[0], 2), ttl=ttl)
            assert left[0] > ttl / 2

    async def test_a_stall_longer_than_the_ttl_spends_no_attempt(
        self, app: App, db_url: str, tmp_path: Path
    ) -> None:
        """Every worker loses the database for 3 ttl: the processes that stayed alive spend no
        attempt (max_attempts=1 tasks all succeed); the one killed meanwhile is recovered
        within ttl + 5 s of the database returning."""
        app.strict_handlers = False
        sidelog = tmp_path / "side.log"
        ttl = 2.0
        ids = await app.enqueue_many(
            [EnqueueRequest("side.sleep", {"s": 4.0}, max_attempts=1) for _ in range(4)]
        )
        victim_ids = await app.enqueue_many(
            [EnqueueRequest("side.sleep", {"s": 4.0}, max_attempts=2, queue="victim") for _ in range(2)]
        )
        a = start_worker(db_url, pod="stay-a", sidelog=sidelog, concurrency=2, log_path=tmp_path / "a.log")
        b = start_worker(db_url, pod="stay-b", sidelog=sidelog, concurrency=2, log_path=tmp_path / "b.log")
        v = start_worker(
            db_url, pod="victim", sidelog=sidelog, concurrency=2, log_path=tmp_path / "v.log",
            extra_env={"KUBETASKS_QUEUES": "victim"},
        )  # fmt: skip
        blocker = await connect(db_url)
        try:

            async def all_running() -> bool:
                c = await statuses(db_url, ids + victim_ids)
                return c["running"] == 6

            await wait_for(all_running, 30, "six running")
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE workers, tasks IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(ttl)
            v.kill()
            v.wait()
            await asyncio.sleep(2 * ttl)
            await tx.commit()
            back = time.monotonic()

            async def victim_rerun() -> bool:
                rows = await fetch(
                    db_url, "SELECT count(*) AS n FROM tasks WHERE id = ANY($1) AND status <> 'pending'"
                    " AND pod_id <> 'victim'", victim_ids,
                )  # fmt: skip
                return int(rows[0]["n"]) == 2

            v2 = start_worker(
                db_url, pod="victim-2", sidelog=sidelog, concurrency=2, log_path=tmp_path / "v2.log",
                extra_env={"KUBETASKS_QUEUES": "victim"},
            )  # fmt: skip
            try:
                await wait_for(victim_rerun, ttl + 5, "the killed worker's tasks to run again")
                rerun_after = time.monotonic() - back

                async def done() -> bool:
                    return (await statuses(db_url, ids + victim_ids))["succeeded"] == 6

                await wait_for(done, 40, "all six to succeed")
            finally:
                stop(v2)
        finally:
            with contextlib.suppress(Exception):
                await blocker.close()
            codes = [stop(a), stop(b)]
        rows = await fetch(db_url, "SELECT id, status, attempt, uncharged FROM tasks WHERE id = ANY($1)", ids)
        lost = await fetchval(
            db_url,
            "SELECT count(*) FROM task_attempts WHERE outcome = 'worker_lost' AND task_id = ANY($1)",
            ids,
        )
        report("stall of 3 ttl", rerun_after_s=round(rerun_after, 2), worker_lost_of_live=lost,
               spent=[r["attempt"] - r["uncharged"] for r in rows])  # fmt: skip
        assert codes == [0, 0]
        assert all(r["status"] == "succeeded" and r["attempt"] - r["uncharged"] == 1 for r in rows)
        assert lost == 0


# -- 6. two processes with one pod id ---------------------------------------------------------


async def test_two_processes_with_one_pod_id_do_not_supersede_each_other(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """Two processes share a pod id for 60 s under load: the pod id registers at most twice,
    and no task fails."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    ids = await app.enqueue_many(
        [EnqueueRequest("side.work", {"n": i, "ms": [100, 600]}, max_attempts=5) for i in range(400)]
    )
    procs = [
        start_worker(db_url, pod="shared", sidelog=sidelog, concurrency=3, log_path=tmp_path / f"p{i}.log")
        for i in range(2)
    ]
    try:
        await asyncio.sleep(60)
        registrations = await fetchval(db_url, "SELECT count(*) FROM workers WHERE pod_id = 'shared'")
        report("one pod id, two processes, after 60 s", registrations=registrations)
        assert registrations <= 2
        slots = await fetch(
            db_url, "SELECT pod_slot FROM workers WHERE pod_id = 'shared' AND status = 'active' ORDER BY 1"
        )

        async def drained() -> bool:
            return (await statuses(db_url, ids))["succeeded"] == len(ids)

        await wait_for(drained, 120, "every task to succeed")
    finally:
        codes = [stop(p) for p in procs]
    failed = (await statuses(db_url, ids))["failed"]
    result = await audit(db_url, ids, sidelog)
    report("one pod id, two processes", registrations=registrations, slots=[r["pod_slot"] for r in slots],
           failed=failed, lost=len(result.lost), duplicated=len(result.duplicated))  # fmt: skip
    assert registrations <= 2
    assert [r["pod_slot"] for r in slots] == [1, 2]
    assert failed == 0 and codes == [0, 0]
    assert not result.lost and not result.duplicated and not result.unexpected


# -- 8. a handler that blocks the event loop ---------------------------------------------------


class TestBlockedLoop:
    async def test_a_cpu_bound_handler_does_not_let_the_lease_expire(
        self, app: App, db_url: str, tmp_path: Path
    ) -> None:
        """An async handler blocks its loop for 3 ttl: the lease still renews, no peer runs a
        second copy, and the blocked worker's result is accepted."""
        app.strict_handlers = False
        sidelog = tmp_path / "side.log"
        tid = await app.enqueue("side.block", {"s": 6.0}, timeout=60)
        blocked = start_worker(
            db_url, pod="blocked", sidelog=sidelog, concurrency=1, app=BLOCKAPP, log_path=tmp_path / "b.log"
        )
        peer = None
        try:

            async def running() -> bool:
                return (await app.get_task(tid)).status == "running"

            await wait_for(running, 20, "the blocking task to run")
            peer = start_worker(
                db_url, pod="peer", sidelog=sidelog, concurrency=1, app=BLOCKAPP, log_path=tmp_path / "p.log"
            )

            async def done() -> bool:
                return (await app.get_task(tid)).status == "succeeded"

            await wait_for(done, 30, "the blocking task to succeed")
            dead = await fetchval(db_url, "SELECT count(*) FROM workers WHERE status = 'dead'")
        finally:
            codes = [stop(blocked)] + ([stop(peer)] if peer else [])
        rec = await app.get_task(tid)
        report("blocked loop", starts=dict(starts(sidelog)), dead_workers=dead, pod=rec.pod_id)
        assert starts(sidelog) == Counter({(tid, 1): 1})
        assert dead == 0 and rec.pod_id == "blocked"
        assert codes == [0, 0]

    async def test_a_loop_blocked_past_the_timeout_exits_the_process(
        self, app: App, db_url: str, tmp_path: Path
    ) -> None:
        """A handler blocks the loop far past its 2 s timeout: the process exits at once
        (after timeout + ttl) instead of renewing its lease for ever."""
        app.strict_handlers = False
        sidelog = tmp_path / "side.log"
        tid = await app.enqueue("side.block", {"s": 60.0}, timeout=2, max_attempts=2)
        wedged = start_worker(
            db_url, pod="wedged", sidelog=sidelog, concurrency=1, app=BLOCKAPP, log_path=tmp_path / "w.log"
        )
        try:

            async def running() -> bool:
                return (await app.get_task(tid)).status == "running"

            await wait_for(running, 20, "the blocking task to run")
            t0 = time.monotonic()
            code = await asyncio.to_thread(wedged.wait, 20)
            took = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            code, took = None, float("inf")
        finally:
            stop(wedged, signal.SIGKILL)
        log = (tmp_path / "w.log").read_text()
        report("wedged loop", exit_code=code, exited_after_s=round(took, 2))
        assert code == 70, log[-2000:]
        assert took < 2 + 2 + 3
        assert "exiting at once" in log


# -- 9. a cancel while LISTEN is down ---------------------------------------------------------


async def test_a_cancel_sent_while_listen_reconnects_reaches_the_handler(app: App, db_url: str) -> None:
    """The worker's LISTEN connection is killed again and again; a cancel sent meanwhile (its
    NOTIFY lost) still stops the handler within about one heartbeat interval."""
    ended: list[str] = []

    @app.task("long")
    async def long(ctx: TaskContext) -> None:
        try:
            await asyncio.sleep(30)
            ended.append("finished")
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    tid = await app.enqueue("long", {})
    dbname = db_url.rsplit("/", 1)[1]
    admin = await connect(db_url)
    kills = 0

    async def kill_listeners() -> int:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
                dbname,
            )
        )

    try:
        async with RunningWorker(app, concurrency=1):

            async def running() -> bool:
                return (await app.get_task(tid)).status == "running"

            await wait_for(running, 10, "the task to run")
            kills += await kill_listeners()
            assert kills == 1
            await app.cancel(tid, "stop it")  # NOTIFY goes out while nobody listens
            t0 = time.monotonic()
            while not ended and time.monotonic() - t0 < 5:
                kills += await kill_listeners()  # and keeps nobody listening
                await asyncio.sleep(0.05)
            took = time.monotonic() - t0
    finally:
        await admin.close()
    report("cancel without LISTEN", outcome=ended, seconds=round(took, 2), listener_kills=kills)
    assert ended == ["cancelled"]
    assert took < 2.0  # heartbeat interval 0.5 s


# -- 10. smaller --------------------------------------------------------------------------------


async def test_a_fourth_graceful_release_counts_an_attempt(app: App, db_url: str) -> None:
    """A task longer than the shutdown grace is released gracefully three times for free; the
    fourth release counts an attempt, and its event and Task status say why."""
    from kubetasks.k8s.status import status_of

    @app.task("endless", max_attempts=3)
    async def endless(ctx: TaskContext) -> None:
        await asyncio.sleep(60)

    tid = await app.enqueue("endless", {})
    app._settings = app.settings.with_(shutdown_grace=0.1)
    spent = []
    for _ in range(4):
        async with RunningWorker(app, concurrency=1):

            async def running() -> bool:
                return (await app.get_task(tid)).status == "running"

            await wait_for(running, 10, "the task to run")
        row = dict((await fetch(db_url, "SELECT * FROM tasks WHERE id = $1", tid))[0])
        spent.append(row["attempt"] - row.get("uncharged", 0))
    rec = await app.get_task(tid)
    released = [e for e in await app.get_events(tid) if e["kind"] == "released"]
    row = await app.store.run("get_task", tid)
    msg = status_of(row)["message"]
    report("graceful releases", spent_after_each=spent, last_event=released[-1]["detail"], status_message=msg)
    assert spent == [0, 0, 0, 1]
    assert rec.status == "pending" and rec.attempt == 4 and rec.uncharged == 3
    assert "4 times" in released[-1]["detail"] and "counts an attempt" in released[-1]["detail"]
    assert "counts an attempt" in msg


async def test_a_recovered_forbid_run_waits_out_a_dead_holders_lock(app: App) -> None:
    """Under Forbid, the run that replaces one on a dead pod waits for that pod's lock to
    expire and succeeds within its timeout; the defaults leave room for that wait."""
    from kubetasks import cron
    from kubetasks.config import Settings

    assert cron.ScheduleSpec("x", "* * * * *", "h").lock_ttl < Settings().default_timeout
    ran: list[int] = []

    @app.periodic("0 0 1 1 *", name="nightly", lock_ttl=2, timeout=6)
    async def nightly(ctx: TaskContext) -> None:
        ran.append(ctx.id)

    with pytest.raises(ValidationError) as ei:
        app.periodic("0 0 1 1 *", name="bad", lock_ttl=10, timeout=10)(nightly)
    assert ei.value.field == "lock_ttl"
    # The dead pod's run took the lock and renews it no more.
    backend = app.job_lock(cron.lock_name("nightly")).backend
    assert await backend.acquire(cron.lock_name("nightly"), "dead-pod/task-1.1/x", 2)
    tid = await app.enqueue("nightly", {})
    async with RunningWorker(app):

        async def done() -> bool:
            return (await app.get_task(tid)).status in ("succeeded", "failed")

        await wait_for(done, 15, "the recovered run to end")
    rec = await app.get_task(tid)
    assert rec.status == "succeeded", rec.error
    assert ran == [tid]


class _ReplyDropper:
    """A TCP proxy in front of Redis that swallows every reply after the first command
    naming ``marker`` on its connection (that command's reply is lost on the way back;
    the command itself ran). Other connections, and later ones, pass through."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.port = port
        self.marker = marker
        self.connections = 0
        self.dropped = False
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        swallow = asyncio.Event()

        async def upstream() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await cr.read(65536):
                    if self.marker in data and not self.dropped:
                        self.dropped = True
                        swallow.set()
                    sw.write(data)
                    await sw.drain()
            with contextlib.suppress(OSError):
                sw.close()

        async def downstream() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await sr.read(65536):
                    if not swallow.is_set():
                        cw.write(data)
                        await cw.drain()
            with contextlib.suppress(OSError):
                cw.close()

        for t in (asyncio.create_task(upstream()), asyncio.create_task(downstream())):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()


async def test_a_redis_acquire_whose_reply_was_lost_is_still_ours(redis_url: str) -> None:
    """The reply to SET NX is lost and the client sends it again: the lock it took the first
    time is recognised as its own, not reported as held by someone else."""
    from urllib.parse import urlsplit

    from kubetasks.locks import RedisLockBackend

    name = f"lost-reply-{uuid.uuid4().hex[:8]}"
    direct = RedisLockBackend(redis_url)
    try:  # warm up: whatever scripts the backend uses are cached in Redis by now
        assert await direct.acquire(f"{name}-warm", "w", 5)
        await direct.release(f"{name}-warm", "w")
    finally:
        await direct.close()
    proxy = _ReplyDropper(int(urlsplit(redis_url).port or 6379), name.encode())
    port = await proxy.start()
    backend = RedisLockBackend(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)
    try:
        got = await backend.acquire(name, "owner-1", 30)
        holder = await backend.holder(name)
        released = await backend.release(name, "owner-1")
    finally:
        await backend.close()
        await proxy.close()
    report("redis lost reply", connections=proxy.connections, acquired=got, holder=holder)
    assert proxy.dropped and proxy.connections >= 2, "no reply was lost: the fault did not happen"
    assert got is True
    assert holder is not None and holder[0] == "owner-1"
    assert released is True
