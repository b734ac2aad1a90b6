"""Workflows against a real PostgreSQL: spawn, wait, suspension, policies, cancellation,
recovery of a killed parent, the audit trail, and the summary with its critical path.

Figures are printed for the closing note (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest, Fail, TaskContext
from tests.handlers import noop
from tests.integration import helpers
from tests.integration.apps import flowapp
from tests.integration.helpers import ROOT, audit, read_sidelog, start_worker, stop, wait_for
from tests.support import until

UNFINISHED = ("pending", "running", "paused", "suspended")
FLOWAPP = "tests.integration.apps.flowapp:app"


def report(title: str, **figures: object) -> None:
    print(f"\n[workflows] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


class RunningWorker(helpers.RunningWorker):
    """The shared in-process worker, serving the workflow test queues by default."""

    def __init__(self, app: App, **kw: Any) -> None:
        kw.setdefault("queues", ["parents", "kids", "default"])
        super().__init__(app, **kw)


@pytest.fixture
async def flow(app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    """The test app with flowapp's handlers, its side log in tmp_path."""
    monkeypatch.setenv("SIDELOG", str(tmp_path / "side.log"))
    app.add_tasks_from(flowapp.app)
    yield app


async def query(db_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def tree_ids(app: App, root: int) -> list[int]:
    return [r["id"] for r in await app.store.run("workflow_tasks", root)]


async def status_is(app: App, task_id: int, *statuses: str) -> bool:
    return (await app.get_task(task_id)).status in statuses


async def tree_ended(app: App, root: int) -> bool:
    rows = await app.store.run("workflow_tasks", root)
    return all(r["status"] not in UNFINISHED for r in rows)


class TestFanOutFanIn:
    @pytest.mark.parametrize("n", [1, 10, 100])
    async def test_children_results_summed(self, flow: App, tmp_path: Path, n: int) -> None:
        """A parent spawns n children and waits: suspended meanwhile, then their sum; each child runs once."""
        async with RunningWorker(flow, concurrency=10):
            root = await flow.enqueue("flow.fan", {"n": n, "ms": [5, 40]})
            await until(lambda: status_is(flow, root, "succeeded", "failed"), 60, "the fan-in")
        rec = await flow.get_task(root)
        assert rec.status == "succeeded", rec.error
        assert rec.result == {"sum": n * (n - 1) // 2, "n": n}
        assert rec.attempt == 2 and rec.attempts_spent == 1  # suspending hands the attempt back uncharged
        kids = [t for t in await tree_ids(flow, root) if t != root]
        assert len(kids) == n
        assert await flow.children_counts([root]) == {root: {"succeeded": n}}
        starts = Counter(t for kind, t, *_ in read_sidelog(tmp_path / "side.log") if kind == "start")
        assert all(starts[k] == 1 for k in kids), "a child ran twice"
        outcomes = [a["outcome"] for a in await flow.get_attempts(root)]
        assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) <= {"suspended"}
        kinds = [e["kind"] for e in await flow.get_events(root)]
        assert kinds[:2] == ["created", "claimed"] and kinds[-1] == "succeeded"
        if "suspended" in kinds:  # unless every child ended before the parent's wait
            assert kinds.index("suspended") < kinds.index("woken")
        summary = await flow.workflow_summary(root)
        assert summary.tasks == n + 1 and summary.counts == {"succeeded": n + 1}
        result = await audit(flow.settings.database_url, [root, *kids], tmp_path / "side.log")
        assert (result.lost, result.duplicated, result.unexpected) == (set(), set(), set())
        report(
            f"fan-out/fan-in n={n}", runs_of_parent=len(outcomes), children=len(kids), sum=rec.result["sum"]
        )

    async def test_suspended_parent_holds_no_slot(self, flow: App) -> None:
        """With one slot, a parent waiting for ten children lets them run: it is not holding the slot."""
        async with RunningWorker(flow, concurrency=1) as w:
            root = await flow.enqueue("flow.fan", {"n": 10, "s": 0.01})
            await until(lambda: status_is(flow, root, "succeeded", "failed"), 30, "the fan-in on one slot")
            assert w.stats.suspended >= 1
        assert (await flow.get_task(root)).result == {"sum": 45, "n": 10}
        rows = await flow.store.run("workflow_tasks", root)
        assert [r["status"] for r in rows] == ["succeeded"] * 11

    async def test_nested_workflows(self, flow: App) -> None:
        """Workflows nest: a root waits for three fans, each waiting for its own leaves."""
        async with RunningWorker(flow, concurrency=8):
            root = await flow.enqueue("flow.nest", {"fans": 3, "n": 4, "ms": [5, 30]})
            await until(lambda: status_is(flow, root, "succeeded", "failed"), 60, "the nested workflow")
        rec = await flow.get_task(root)
        assert rec.status == "succeeded", rec.error
        assert rec.result == {"sum": 3 * 6, "n": 12}
        summary = await flow.workflow_summary(root)
        assert summary.tasks == 1 + 3 + 12
        assert [len(c.children) for c in summary.root.children] == [4, 4, 4]
        assert summary.retries == 0

    async def test_replayed_spawn_returns_the_same_children(self, flow: App) -> None:
        """Spawning again under the same keys (a replay) creates nothing new; a changed handler is refused."""
        runs: list[list[int]] = []

        @flow.task("twice", queue="parents")
        async def twice(ctx: TaskContext) -> list[int]:
            first = await ctx.spawn_many([EnqueueRequest("flow.leaf", {"n": i}) for i in range(3)])
            ctx._spawn_seq = 0  # what a replay does: number the spawns from the top again
            again = await ctx.spawn_many([EnqueueRequest("flow.leaf", {"n": i}) for i in range(3)])
            keyed = await ctx.spawn("flow.leaf", {"n": 9}, key="nine")
            assert await ctx.spawn("flow.leaf", {"n": 9}, key="nine") == keyed
            runs.append(first + again + [keyed])
            ctx._spawn_seq = 0
            try:
                await ctx.spawn("twice", {})
            except Fail as exc:
                assert "same children in the same order" in exc.message
            else:
                raise AssertionError("a changed handler under the same key was accepted")
            return first

        async with RunningWorker(flow, concurrency=4):
            root = await flow.enqueue("twice", {})
            await until(lambda: status_is(flow, root, "succeeded", "failed"), 20, "the task")
        assert (await flow.get_task(root)).status == "succeeded"
        first, again, keyed = runs[0][:3], runs[0][3:6], runs[0][6]
        assert first == again
        assert len(await tree_ids(flow, root)) == 1 + 3 + 1
        assert (await flow.get_task(keyed)).spawn_key == "nine"
        assert (await flow.get_task(first[0])).parent_id == root


class TestKilledParent:
    async def test_sigkill_while_suspended_and_while_running(
        self, app: App, db_url: str, tmp_path: Path
    ) -> None:
        """The process running the parents is SIGKILLed while they run (first run and replay) and
        while they are suspended; every workflow completes, and no child runs twice."""
        sidelog = tmp_path / "side.log"
        app.strict_handlers = False
        parents = await app.enqueue_many(
            [
                EnqueueRequest(
                    "flow.fan",
                    {"n": 20, "ms": [300, 2000], "pre": 0.6, "post": 0.6},
                    queue="parents",
                    max_attempts=50,  # each kill while it runs spends one
                )
                for _ in range(8)
            ]
        )
        kids_proc = start_worker(
            db_url, pod="kids", sidelog=sidelog, concurrency=16, app=FLOWAPP,
            extra_env={"KUBETASKS_QUEUES": "kids"}, log_path=tmp_path / "kids.log",
        )  # fmt: skip
        serial = 0

        def start_parents() -> subprocess.Popen[bytes]:
            nonlocal serial
            serial += 1
            pod = "parents" if serial % 2 else f"parents-r{serial}"  # same pod, then a new one
            return start_worker(
                db_url, pod=pod, sidelog=sidelog, concurrency=2, app=FLOWAPP,
                extra_env={"KUBETASKS_QUEUES": "parents"}, log_path=tmp_path / f"parents-{serial}.log",
            )  # fmt: skip

        async def parent_states() -> tuple[int, int, int, int]:
            """(running first run, running a replay, suspended, succeeded) among the parents."""
            rows = await query(
                db_url,
                "SELECT t.status, EXISTS (SELECT 1 FROM task_attempts a WHERE a.task_id = t.id "
                "AND a.outcome = 'suspended') AS replay FROM tasks t WHERE t.id = ANY ($1)",
                parents,
            )
            return (
                sum(1 for r in rows if r["status"] == "running" and not r["replay"]),
                sum(1 for r in rows if r["status"] == "running" and r["replay"]),
                sum(1 for r in rows if r["status"] == "suspended"),
                sum(1 for r in rows if r["status"] == "succeeded"),
            )

        proc = start_parents()
        kills: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            # Aim at each kind of moment once, then kill every 1.5 s until all are done;
            # a kill counts every kind of moment it caught.
            for want in ["running", "suspended", "replay", *["any"] * 5]:

                async def moment(want: str = want) -> bool:
                    first, replay, suspended, done = await parent_states()
                    if done == len(parents):
                        return True
                    return {"running": first > 0, "replay": replay > 0, "suspended": suspended > 0,
                            "any": True}[want]  # fmt: skip

                if want == "any":
                    await asyncio.sleep(1.5)
                await wait_for(moment, 30, f"a parent {want}")
                first, replay, suspended, done = await parent_states()
                if done == len(parents):
                    break
                proc.kill()
                proc.wait()
                kills.update(running=first > 0, replay=replay > 0, suspended=suspended > 0, total=1)
                await asyncio.sleep(0.3 if want != "suspended" else 1.0)  # children end meanwhile
                proc = start_parents()

            async def all_ended() -> bool:
                rows = await query(db_url, "SELECT count(*) AS n FROM tasks WHERE id = ANY ($1) "
                                   "AND status IN ('succeeded', 'failed', 'cancelled')", parents)  # fmt: skip
                return int(rows[0]["n"]) == len(parents)

            await wait_for(all_ended, 120, "every workflow to end")
        finally:
            stop(proc)
            stop(kids_proc)
        kids = [
            r["id"] for r in await query(db_url, "SELECT id FROM tasks WHERE parent_id = ANY ($1)", parents)
        ]
        result = await audit(db_url, parents + kids, sidelog)
        starts = Counter(t for kind, t, *_ in read_sidelog(sidelog) if kind == "start")
        ran_twice = [k for k in kids if starts[k] != 1]
        lost_attempts = await query(
            db_url,
            "SELECT count(*) AS n FROM task_attempts WHERE outcome = 'worker_lost' AND task_id = ANY ($1)",
            parents,
        )
        sums = [(await app.get_task(p)).result for p in parents]
        report(
            "SIGKILL of the parents' process",
            workflows=len(parents), children=len(kids), kills=kills["total"],
            kills_while_first_run=kills["running"], kills_while_replay=kills["replay"],
            kills_while_suspended=kills["suspended"],
            parent_runs_lost=lost_attempts[0]["n"], seconds=round(loop.time() - t0, 1),
            children_run_twice=len(ran_twice), lost=len(result.lost), duplicated=len(result.duplicated),
            unexpected=len(result.unexpected),
        )  # fmt: skip
        assert kills["running"] >= 1 and kills["replay"] >= 1 and kills["suspended"] >= 1, kills
        assert len(kids) == 20 * len(parents)
        assert ran_twice == []
        assert sums == [{"sum": 190, "n": 20}] * len(parents)
        assert (result.lost, result.duplicated, result.unexpected) == (set(), set(), set())


class TestPolicies:
    async def test_fail_fast_fails_parent_at_first_failure_and_cancels_the_rest(self, flow: App) -> None:
        """fail_fast: a child fails, the parent wakes at once and fails; its slow siblings are cancelled."""
        async with RunningWorker(flow, concurrency=10):
            t0 = asyncio.get_running_loop().time()
            root = await flow.enqueue("flow.policy", {"n": 5, "fail": [2], "fail_s": 0.2, "s": 30})
            await until(lambda: status_is(flow, root, "failed", "succeeded"), 15, "the parent to fail")
            elapsed = asyncio.get_running_loop().time() - t0
            await until(lambda: tree_ended(flow, root), 10, "the siblings to be cancelled")
        rec = await flow.get_task(root)
        kids = [await flow.get_task(k) for k in (await tree_ids(flow, root))[1:]]
        failed = [k for k in kids if k.status == "failed"]
        assert rec.status == "failed" and rec.attempts_spent == 1
        assert len(failed) == 1 and failed[0].payload["n"] == 2
        assert rec.error == f"child task {failed[0].id} (flow.leaf) failed: leaf 2 failed on purpose"
        assert [k.status for k in kids if k.id != failed[0].id] == ["cancelled"] * 4
        assert all(
            k.error == f"sibling task {failed[0].id} failed (fail_fast)"
            for k in kids
            if k.status == "cancelled"
        )
        assert elapsed < 10
        report("fail_fast", children=5, failed=1, cancelled=4, seconds_to_fail=round(elapsed, 2))

    async def test_collect_waits_for_all_and_returns_failures(self, flow: App) -> None:
        """collect: every child runs to its end; failures come back in place, the parent succeeds."""
        async with RunningWorker(flow, concurrency=10):
            root = await flow.enqueue("flow.policy", {"n": 6, "fail": [1, 4], "s": 0.3, "policy": "collect"})
            await until(lambda: status_is(flow, root, "failed", "succeeded"), 20, "the parent")
        rec = await flow.get_task(root)
        kids = {k.payload["n"]: k for k in [await flow.get_task(i) for i in (await tree_ids(flow, root))[1:]]}
        assert rec.status == "succeeded", rec.error
        assert rec.result == {"ok": 0 + 2 + 3 + 5, "failed": [kids[1].id, kids[4].id]}
        assert Counter(k.status for k in kids.values()) == {"succeeded": 4, "failed": 2}
        report("collect", children=6, failed=2, parent=rec.status)


class TestCancel:
    async def test_cancel_cascades_to_every_descendant(self, flow: App, tmp_path: Path) -> None:
        """Cancelling a root cancels its suspended fans and their running leaves (their handlers stop)."""
        async with RunningWorker(flow, concurrency=10) as w:
            root = await flow.enqueue("flow.nest", {"fans": 2, "n": 3, "s": 60})

            async def leaves_running() -> bool:
                rows = await flow.store.run("workflow_tasks", root)
                return sum(1 for r in rows if r["handler"] == "flow.leaf" and r["status"] == "running") == 6

            await until(leaves_running, 20, "six leaves running")
            assert await flow.cancel(root, "changed my mind")
            await until(lambda: tree_ended(flow, root), 10, "the whole tree to end")
            await until(lambda: _true(w.stats.cancelled == 6), 30, "the six handlers to be cancelled")
        rows = await flow.store.run("workflow_tasks", root)
        assert [r["status"] for r in rows] == ["cancelled"] * 9
        assert rows[0]["error"] == "changed my mind"
        assert all(r["error"] == f"parent task {root} cancelled: changed my mind" for r in rows[1:])
        for r in rows:
            assert "cancelled" in [e["kind"] for e in await flow.get_events(r["id"])]
        leaves = [r["id"] for r in rows if r["handler"] == "flow.leaf"]
        assert not [t for kind, t, *_ in read_sidelog(tmp_path / "side.log") if kind == "end" and t in leaves]
        report("cancel cascade", cancelled=len(rows), handlers_stopped=w.stats.cancelled)

    async def test_cancelled_child_wakes_and_fails_its_parent(self, flow: App) -> None:
        """Cancelling one fan of a nest: its leaves go, the nest fails fast, the other fan is cancelled."""
        async with RunningWorker(flow, concurrency=10):
            root = await flow.enqueue("flow.nest", {"fans": 2, "n": 2, "s": 60})

            async def fans_suspended() -> bool:
                rows = await flow.store.run("workflow_tasks", root)
                return [r["status"] for r in rows if r["handler"] == "flow.fan"] == ["suspended"] * 2

            await until(fans_suspended, 20, "both fans suspended")
            fan_a, fan_b = [r["id"] for r in await flow.store.run("workflow_tasks", root)][1:3]
            assert await flow.cancel(fan_a)
            await until(lambda: tree_ended(flow, root), 15, "the whole tree to end")
        rec = await flow.get_task(root)
        assert rec.status == "failed"
        assert rec.error == f"child task {fan_a} (flow.fan) cancelled: cancelled"
        assert (await flow.get_task(fan_b)).status == "cancelled"


class TestAudit:
    async def test_events_and_attempts_of_a_retried_task(self, flow: App) -> None:
        """created, claimed, progress, retried, claimed, progress, succeeded; attempts with durations."""

        @flow.task("steps", max_attempts=3)
        async def steps(ctx: TaskContext) -> str:
            await ctx.progress(40, "downloaded")
            await asyncio.sleep(0.1)
            if ctx.attempt == 1:
                raise RuntimeError("flaky")
            await ctx.progress(100, "done")
            return "ok"

        async with RunningWorker(flow):
            tid = await flow.enqueue("steps", {})
            await until(lambda: status_is(flow, tid, "succeeded"), 15, "the task")
        events = await flow.get_events(tid)
        assert [e["kind"] for e in events] == [
            "created", "claimed", "progress", "retried", "claimed", "progress", "progress", "succeeded",
        ]  # fmt: skip
        assert [e["attempt"] for e in events[1:]] == [1, 1, 1, 2, 2, 2, 2]
        assert events[2]["detail"] == "40%: downloaded" and events[3]["detail"] == "RuntimeError: flaky"
        assert all(e["pod_id"] == "test-pod" and e["worker_id"] for e in events[1:])
        assert [e["at"] for e in events] == sorted(e["at"] for e in events)
        attempts = await flow.get_attempts(tid)
        assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "retried"), (2, "succeeded")]
        assert all(a["duration_s"] >= 0.1 and a["pod_id"] == "test-pod" for a in attempts)

    async def test_admin_events(self, flow: App) -> None:
        """paused, resumed, cancelled, requeued are recorded; recovered when a worker is lost."""
        flow.register("noop", noop, queue="nowhere")
        tid = await flow.enqueue("noop", {})
        assert await flow.pause_task(tid) and await flow.resume_task(tid)
        assert await flow.cancel(tid, "stop")
        assert await flow.retry(tid) == 1
        kinds = [e["kind"] for e in await flow.get_events(tid)]
        assert kinds == ["created", "paused", "resumed", "cancelled", "requeued"]

        wid = uuid.uuid4()
        await flow.store.run("register_worker", wid, "pod-gone", 1, None, "h", 1, ["nowhere"], 1, 30.0, 15.0)
        await flow.store.run("worker_serves", wid, ["noop"], "{}", "[]", 1000)
        rows = await flow.store.run("claim", wid, "pod-gone", ["nowhere"], 1, [], [], [], [], [], [], [])
        assert [r["id"] for r in rows] == [tid]
        assert await flow.store.run("release_worker", wid, "lost", "worker lost: test") == 1
        events = await flow.get_events(tid)
        assert [e["kind"] for e in events][-2:] == ["claimed", "recovered"]
        assert events[-1]["detail"] == "worker lost: test" and events[-1]["pod_id"] == "pod-gone"

    async def test_fenced_out_write_is_an_event(self, flow: App, db_url: str) -> None:
        """A task taken away under its handler: the fenced progress and outcome become events."""
        go = asyncio.Event()

        @flow.task("stolen", max_attempts=3)
        async def stolen(ctx: TaskContext) -> None:
            await go.wait()
            await ctx.progress(10)
            await asyncio.sleep(0.6)
            await ctx.progress(20)  # raises LeaseLost: the earlier write was fenced out

        # Heartbeats far apart: a heartbeat would see the task taken away and stop the
        # handler before its writes reach the database (tested in test_engine).
        flow._settings = flow.settings.with_(heartbeat_interval=5.0, lease_ttl=15.0)
        async with RunningWorker(flow) as w:
            tid = await flow.enqueue("stolen", {})
            await until(lambda: status_is(flow, tid, "running"), 10, "the task to run")
            await query(db_url, "UPDATE tasks SET attempt = attempt + 1 WHERE id = $1", tid)
            go.set()

            async def two_fenced() -> bool:
                return w.stats.fenced_out >= 2

            await until(two_fenced, 10, "the progress and the outcome to be fenced out")
            await query(db_url, "UPDATE tasks SET status = 'failed', finished_at = now() WHERE id = $1", tid)
        fenced = [e for e in await flow.get_events(tid) if e["kind"] == "fenced_out"]
        assert [e["detail"] for e in fenced] == ["progress", "outcome retried"]
        assert all(e["attempt"] == 1 for e in fenced)

    async def test_progress_visible_in_the_cli(self, flow: App, db_url: str) -> None:
        """Progress is stored, shown by `kubetasks tasks get` with the events; a tight loop is coalesced."""
        calls: Counter[str] = Counter()
        run = flow.store.run

        async def counting(name: str, *args: Any, **kw: Any) -> Any:
            calls[name] += 1
            return await run(name, *args, **kw)

        flow.store.run = counting  # type: ignore[method-assign]
        hold = asyncio.Event()

        @flow.task("busy")
        async def busy(ctx: TaskContext) -> None:
            t0 = asyncio.get_running_loop().time()
            i = 0
            while asyncio.get_running_loop().time() - t0 < 1.2:
                i += 1
                await ctx.progress(min(60, i // 100), f"item {i}")
            await ctx.progress(60, "waiting")
            await hold.wait()

        async with RunningWorker(flow):
            tid = await flow.enqueue("busy", {})

            async def at_60() -> bool:
                return (await flow.get_task(tid)).progress_message == "waiting"

            await until(at_60, 10, "progress 60")
            out = await cli("tasks", "get", str(tid), "--database-url", db_url)
            hold.set()
            await until(lambda: status_is(flow, tid, "succeeded"), 10, "the task")
        assert "progress: 60" in out and "progress_message: waiting" in out
        assert "EVENT" in out and "claimed" in out
        assert calls["set_progress"] <= 6, calls  # about one write per 0.5 s, not one per call
        report("progress", writes=calls["set_progress"])


class TestRetention:
    async def test_children_of_an_unfinished_parent_are_kept_and_events_go_with_their_task(
        self, flow: App, db_url: str
    ) -> None:
        """delete_tasks spares a finished child while its parent may still read it; then both go,
        with their attempts and events."""
        hold = asyncio.Event()

        @flow.task("holder", queue="parents")
        async def holder(ctx: TaskContext) -> int:
            (n,) = await ctx.wait([await ctx.spawn("flow.leaf", {"n": 7})])
            await hold.wait()
            return int(n)

        async with RunningWorker(flow):
            root = await flow.enqueue("holder", {})

            async def replay_holds() -> bool:
                rows = await flow.store.run("workflow_tasks", root)
                return [r["status"] for r in rows] == ["running", "succeeded"]

            await until(replay_holds, 10, "the parent running, its child done")
            assert await flow.delete_tasks(older_than=0) == 0
            hold.set()
            await until(lambda: status_is(flow, root, "succeeded"), 10, "the parent")
        assert await flow.delete_tasks(older_than=0) == 2
        left = await query(
            db_url,
            "SELECT (SELECT count(*) FROM task_events) + (SELECT count(*) FROM task_attempts) AS n",
        )
        assert left[0]["n"] == 0


class TestSummary:
    async def test_critical_path_of_a_known_graph(self, flow: App, db_url: str) -> None:
        """R runs stage 1 = [A 0.3 s, B (a plan running D 0.8 s), C 0.2 s], then stage 2 = [E 0.5 s].

        The chain of dependent durations is R, B, D, E; its length is about 0.8 + 0.5 s plus the
        few milliseconds R and B run themselves.
        """
        graph = {
            "stages": [
                [{"leaf": 0.3}, {"plan": {"stages": [[{"leaf": 0.8}]]}}, {"leaf": 0.2}],
                [{"leaf": 0.5}],
            ]
        }
        async with RunningWorker(flow, concurrency=10):
            root = await flow.enqueue("flow.plan", graph)
            await until(lambda: status_is(flow, root, "succeeded", "failed"), 30, "the plan")
        assert (await flow.get_task(root)).result == 5 - 1  # four leaves
        summary = await flow.workflow_summary(root)
        r = summary.root
        a, b, c, e = r.children
        (d,) = b.children
        assert [n.handler for n in (a, b, c, d, e)] == [
            "flow.leaf",
            "flow.plan",
            "flow.leaf",
            "flow.leaf",
            "flow.leaf",
        ]
        assert summary.critical_path == [r.id, b.id, d.id, e.id]
        assert 1.3 <= summary.critical_path_s < 1.3 + 0.5, summary.critical_path_s
        assert summary.counts == {"succeeded": 6} and summary.retries == 0
        assert summary.total_s >= 0.3 + 0.8 + 0.2 + 0.5
        assert summary.wall_s >= 0.8 + 0.5  # the chain D, E ran one after the other
        assert [n.on_critical_path for n in (r, a, b, c, d, e)] == [True, False, True, False, True, True]
        out = await cli("tasks", "tree", str(root), "--database-url", db_url)
        assert f"#{root} flow.plan" in out and "critical path" in out and f"#{d.id} flow.leaf" in out
        data = json.loads(await cli("tasks", "tree", str(root), "--json", "--database-url", db_url))
        assert data["critical_path"] == summary.critical_path and data["tree"]["id"] == root
        report(
            "critical path", path=summary.critical_path, seconds=round(summary.critical_path_s, 3),
            wall_s=round(summary.wall_s, 3), total_s=round(summary.total_s, 3),
        )  # fmt: skip


async def _true(v: bool) -> bool:
    return v


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetasks", *args,
        cwd=ROOT, env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()
