"""Operations from the command line and schedules made at runtime (issue 17 items 3, 5, 8).

Against a real PostgreSQL: `kubetasks bulk retry|cancel|delete` (a dry run
prints the count, --up-to-id bounds the run), `tasks list` by parent, root and
pod with a cursor, `events` and `attempts` across tasks; schedules created,
changed, paused and deleted from Python and the CLI with one run per tick
across schedulers; ``@app.periodic`` rows whose code is gone shown orphaned
and pruned.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest

from kubetasks import App, TaskContext, ValidationError
from kubetasks.cron import Scheduler
from kubetasks.schedules import ScheduleNotFound
from tests.integration.helpers import ROOT, RunningWorker, wait_for
from tests.support import connect


def kt(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "kubetasks", *args], env=env, capture_output=True, text=True, timeout=120
    )


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout}\n{res.stderr}"
    return res.stdout


def new_app(db_url: str, pod: str = "ops-pod", **kw: Any) -> App:
    return App(
        database_url=db_url, pod_id=pod, heartbeat_interval=0.5, lease_ttl=2.0, strict_handlers=False, **kw
    )


async def test_bulk_from_the_cli(db_url: str) -> None:
    app = new_app(db_url)
    async with app:
        ids = [await app.enqueue("imp.a", queue="q1") for _ in range(5)]
        other = await app.enqueue("imp.b", queue="q2")
        conn = await connect(db_url)
        try:
            await conn.execute(
                "UPDATE tasks SET status = 'failed', finished_at = now(), error = 'x', attempt = 1 "
                "WHERE id = ANY ($1)",
                ids[:3],
            )
            # A dry run prints the count and changes nothing.
            dry = await asyncio.to_thread(kt, db_url, "bulk", "retry", "--handler", "imp.a", "--dry-run")
            assert ok(dry).strip() == "3" and f"--up-to-id {ids[2]}" in dry.stderr
            assert await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'failed'") == 3
            # A task failing after the count is left alone when the run is bounded by it.
            late = await app.enqueue("imp.a", queue="q1")
            await conn.execute(
                "UPDATE tasks SET status = 'failed', finished_at = now(), attempt = 1 WHERE id = $1", late
            )
            res = await asyncio.to_thread(
                kt, db_url, "bulk", "retry", "--handler", "imp.a", "--up-to-id", str(ids[2])
            )
            assert "3 task(s) retried" in ok(res)
            assert await conn.fetchval("SELECT status FROM tasks WHERE id = $1", late) == "failed"
            # Cancel by queue; delete by status (finished only).
            res = await asyncio.to_thread(kt, db_url, "bulk", "cancel", "--queue", "q1", "--reason", "ops")
            assert "5 task(s) cancelled" in ok(res)
            assert await conn.fetchval("SELECT status FROM tasks WHERE id = $1", other) == "pending"
            assert (
                ok(
                    await asyncio.to_thread(
                        kt, db_url, "bulk", "delete", "--status", "cancelled", "--dry-run"
                    )
                ).strip()
                == "5"
            )
            res = await asyncio.to_thread(
                kt, db_url, "bulk", "delete", "--status", "cancelled", "--queue", "q1"
            )
            assert "5 task(s) deleted" in ok(res)
            assert await conn.fetchval("SELECT count(*) FROM tasks") == 2  # other, and late (failed)
            # Bad input: exit 2, naming the option or field; nothing changes.
            for args, says in (
                (["bulk", "delete"], "filter: names no criterion"),
                (["bulk", "retry", "--status", "bogus"], "--status: unknown status 'bogus'"),
                (["bulk", "cancel", "--status", "succeeded"], "status: a bulk cancel applies to"),
                (["bulk", "retry", "--created-after", "yesterday"], "--created-after: must be an ISO 8601"),
            ):
                bad = await asyncio.to_thread(kt, db_url, *args)
                assert bad.returncode == 2 and says in bad.stderr, (args, bad.stderr)
            assert await conn.fetchval("SELECT count(*) FROM tasks") == 2
        finally:
            await conn.close()


async def test_list_events_and_attempts_from_the_cli(db_url: str) -> None:
    async def parent(task: TaskContext) -> int:
        return await task.spawn("kid", {"n": 1})

    async def kid(task: TaskContext) -> None:
        if task.attempt == 1:
            raise RuntimeError("kid fails once")

    app = new_app(db_url, "list-pod")
    app.register("parent", parent)
    app.register("kid", kid, retry_delay=0)
    async with app:
        pid = await app.enqueue("parent")
        loose = await app.enqueue("kid", queue="elsewhere")
        async with RunningWorker(app, queues=["default"]):

            async def settled() -> bool:
                page = await app.find_tasks(root=pid)
                return len(page.items) == 2 and all(t.status == "succeeded" for t in page.items)

            await wait_for(settled, 30, "the workflow to finish")
        (child,) = [t.id for t in (await app.find_tasks(parent=pid)).items]
        out = json.loads(
            ok(await asyncio.to_thread(kt, db_url, "tasks", "list", "--root", str(pid), "--json"))
        )
        assert sorted(t["id"] for t in out["items"]) == sorted([pid, child]) and out["next_cursor"] is None
        out = json.loads(
            ok(await asyncio.to_thread(kt, db_url, "tasks", "list", "--parent", str(pid), "--json"))
        )
        assert [t["id"] for t in out["items"]] == [child]
        out = json.loads(
            ok(await asyncio.to_thread(kt, db_url, "tasks", "list", "--pod", "list-pod", "--json"))
        )
        assert loose not in [t["id"] for t in out["items"]] and child in [t["id"] for t in out["items"]]
        # Paging: one at a time with the cursor, every task once.
        seen: list[int] = []
        cursor: list[str] = []
        for _ in range(5):
            page = json.loads(
                ok(await asyncio.to_thread(kt, db_url, "tasks", "list", "--limit", "1", "--json", *cursor))
            )
            seen += [t["id"] for t in page["items"]]
            if page["next_cursor"] is None:
                break
            cursor = ["--cursor", page["next_cursor"]]
        assert sorted(seen) == sorted([pid, child, loose])
        ev = json.loads(
            ok(
                await asyncio.to_thread(
                    kt, db_url, "events", "--root", str(pid), "--kind", "retried", "--json"
                )
            )
        )
        assert [(e["task_id"], e["kind"]) for e in ev["items"]] == [(child, "retried")]
        at = json.loads(ok(await asyncio.to_thread(kt, db_url, "attempts", "--task", str(child), "--json")))
        assert sorted((a["attempt"], a["outcome"]) for a in at["items"]) == [(1, "retried"), (2, "succeeded")]
        table = ok(
            await asyncio.to_thread(kt, db_url, "attempts", "--pod", "list-pod", "--outcome", "retried")
        )
        assert "retried" in table and "kid fails once" in table
        bad = await asyncio.to_thread(kt, db_url, "events", "--since", "now")
        assert bad.returncode == 2 and "--since: must be an ISO 8601" in bad.stderr
        bad = await asyncio.to_thread(kt, db_url, "events", "--kind", "exploded")
        assert bad.returncode == 2 and "kind: unknown kind 'exploded'" in bad.stderr


async def test_runtime_schedule_one_run_per_tick_across_schedulers(db_url: str) -> None:
    """A schedule created from Python ticks on every scheduler that sees it -- once per tick."""
    a, b = new_app(db_url, "sched-a"), new_app(db_url, "sched-b")
    async with a, b:
        await a.create_schedule(
            "every-second", "* * * * * *", "rt.tick", payload={"k": 1}, concurrency_policy="Allow"
        )
        conn = await connect(db_url)
        try:
            start = (await conn.fetchval("SELECT now()")).replace(microsecond=0) + timedelta(seconds=1)
            clock_now = [start]

            async def clock() -> Any:
                return clock_now[0]

            sa, sb = Scheduler(a, clock=clock), Scheduler(b, clock=clock)
            enqueued = 0
            for i in range(20):
                clock_now[0] = start + timedelta(seconds=i)
                passes = await asyncio.gather(sa.run_once(), sb.run_once())
                enqueued += sum(1 for p in passes for r in p.results if r.outcome == "enqueued")
            runs = await conn.fetch("SELECT payload, tags FROM tasks WHERE handler = 'rt.tick'")
            assert len(runs) == enqueued and 18 <= enqueued <= 21
            assert len({tuple(r["tags"]) for r in runs}) == len(runs)  # one run per tick
            assert all(r["payload"] == '{"k": 1}' for r in runs)
            # Changed at runtime: the new expression holds from now on; paused: no ticks at all.
            await a.update_schedule("every-second", cron="0 0 1 1 *", payload={"k": 2})
            (st,) = await a.list_schedules(["every-second"])
            assert (st.cron, dict(st.payload), st.source) == ("0 0 1 1 *", {"k": 2}, "api")
            await a.pause_schedule("every-second", by="test")
            await a.delete_schedule("every-second")
            with pytest.raises(ScheduleNotFound):
                await a.delete_schedule("every-second")
        finally:
            await conn.close()


async def test_runtime_schedules_refuse_what_they_do_not_own(db_url: str) -> None:
    app = new_app(db_url)

    @app.periodic("*/5 * * * *", name="from-code")
    async def from_code(task: TaskContext) -> None: ...

    async with app:
        await Scheduler(app).sync_code_schedules()
        with pytest.raises(
            ValidationError, match=r"^name: schedule 'from-code' already exists \(@app.periodic"
        ):
            await app.create_schedule("from-code", "* * * * *", "x")
        with pytest.raises(ValidationError, match=r"^name: schedule 'from-code' is defined by @app.periodic"):
            await app.update_schedule("from-code", cron="* * * * *")
        with pytest.raises(ValidationError, match=r"^name: schedule 'from-code' is defined by @app.periodic"):
            await app.delete_schedule("from-code")
        for kw, says in (
            ({"cron_expr": "61 * * * *"}, "cron"),
            ({"timezone": "Mars/Olympus"}, "timezone"),
            ({"concurrency_policy": "Sometimes"}, "concurrency_policy"),
            ({"lock_ttl": 0}, "lock_ttl"),
            ({"payload": {"bad": object()}}, "payload"),
        ):
            args: dict[str, Any] = {"cron_expr": "* * * * *", **kw}
            expr = args.pop("cron_expr")
            with pytest.raises(ValidationError) as exc:
                await app.create_schedule("new-one", expr, "h", **args)
            assert exc.value.field == says, exc.value
        with pytest.raises(ScheduleNotFound):
            await app.update_schedule("nope", cron="* * * * *")
        await app.create_schedule("rt", "* * * * *", "h")
        with pytest.raises(ValidationError, match=r"^bogus: cannot be changed"):
            await app.update_schedule("rt", bogus=1)
        assert [s.name for s in await app.list_schedules()] == ["from-code", "rt"]


async def test_schedules_from_the_cli(db_url: str) -> None:
    res = await asyncio.to_thread(
        kt, db_url, "schedules", "create", "nightly", "--cron", "0 3 * * *", "--handler", "reports.build",
        "--timezone", "Europe/Berlin", "--payload", '{"full": true}',
    )  # fmt: skip
    assert "schedule nightly created" in ok(res)
    ok(await asyncio.to_thread(kt, db_url, "schedules", "update", "nightly", "--cron", "0 4 * * *"))
    assert "paused" in ok(await asyncio.to_thread(kt, db_url, "schedules", "pause", "nightly"))
    rows = json.loads(ok(await asyncio.to_thread(kt, db_url, "schedules", "list", "--json")))
    (row,) = rows
    assert (row["cron"], row["timezone"], row["source"], row["paused"], row["paused_by"]) == (
        "0 4 * * *", "Europe/Berlin", "api", True, "cli",
    )  # fmt: skip
    assert row["payload"] == {"full": True} and row["next_at"] is None
    assert "resumed" in ok(await asyncio.to_thread(kt, db_url, "schedules", "resume", "nightly"))
    bad = await asyncio.to_thread(
        kt, db_url, "schedules", "create", "x", "--cron", "0 3 * * *", "--handler", "h", "--payload", "[1]"
    )
    assert bad.returncode == 2 and "--payload: must be a JSON object" in bad.stderr
    bad = await asyncio.to_thread(kt, db_url, "schedules", "update", "nightly", "--cron", "every day")
    assert bad.returncode == 2 and "cron" in bad.stderr
    ok(await asyncio.to_thread(kt, db_url, "schedules", "delete", "nightly"))
    gone = await asyncio.to_thread(kt, db_url, "schedules", "delete", "nightly")
    assert gone.returncode == 1 and "schedule 'nightly' not found" in gone.stderr


async def test_periodics_removed_from_code_are_orphaned_and_pruned(db_url: str) -> None:
    """v1 declares "old" and "kept"; v2 only "kept". While a v1 worker is active nothing is
    orphaned; once only v2 runs, "old" shows orphaned, a dry run lists it, and the next
    scheduler to start deletes it."""
    v1, v2 = new_app(db_url, "v1"), new_app(db_url, "v2")

    async def body(task: TaskContext) -> None: ...

    for name in ("old", "kept"):
        v1.periodic("*/5 * * * *", name=name)(body)
    v2.periodic("*/5 * * * *", name="kept")(body)
    async with v1, v2:
        await Scheduler(v1).sync_code_schedules()
        assert await v2.prune_schedules(dry_run=True) == []  # no worker is active: nothing is known
        async with RunningWorker(v1), RunningWorker(v2):
            assert await v2.prune_schedules(dry_run=True) == []
            assert not any(s.orphaned for s in await v2.list_schedules())
        async with RunningWorker(v2):
            assert await v2.prune_schedules(dry_run=True) == ["old"]
            shown = {s.name: s.orphaned for s in await v2.list_schedules()}
            assert shown == {"old": True, "kept": False}
            table = ok(await asyncio.to_thread(kt, db_url, "schedules", "list"))
            assert "code (orphaned)" in table
            dry = await asyncio.to_thread(kt, db_url, "schedules", "prune", "--dry-run")
            assert ok(dry).split() == ["old"]
            await Scheduler(v2).sync_code_schedules()  # a scheduler starting prunes
            assert [s.name for s in await v2.list_schedules()] == ["kept"]
