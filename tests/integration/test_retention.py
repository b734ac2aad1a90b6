"""Retention of finished tasks (issue 17 item 2), against a real PostgreSQL.

Per final status (0 keeps for ever), workflow trees whole and never while
something in them is unfinished, Task objects' rows never, small batches that
walk past what they keep, one batch at a time across the cluster (tried by
holding the lock from another session), one pass per interval, the metric,
the CLI, and bad settings refused naming the variable.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

from kubetasks import App, ConfigError, Settings, ValidationError, metrics, retention
from tests.integration.helpers import ROOT, wait_for
from tests.support import connect

DAY = 86400.0


def new_app(db_url: str, **kw: Any) -> App:
    return App(database_url=db_url, pod_id="ret-pod", strict_handlers=False, **kw)


async def make(conn: asyncpg.Connection, status: str, age_days: float, parent: int | None = None) -> int:
    """A task in ``status`` that finished ``age_days`` ago (unfinished statuses: created then)."""
    finished = status in ("succeeded", "failed", "cancelled")
    return int(
        await conn.fetchval(
            "INSERT INTO tasks (handler, status, finished_at, created_at, parent_id, attempt, worker_id) "
            "VALUES ('h', $1, CASE WHEN $2 THEN now() - make_interval(secs => $3) END, "
            "now() - make_interval(secs => $3), $4, $5, $6) RETURNING id",
            status, finished, age_days * DAY, parent,
            1 if status == "running" else 0,
            None if status != "running" else "00000000-0000-0000-0000-000000000001",
        )
    )  # fmt: skip


async def ids(conn: asyncpg.Connection) -> set[int]:
    return {int(r["id"]) for r in await conn.fetch("SELECT id FROM tasks")}


def deleted_metric(status: str) -> float:
    return metrics.RETENTION_DELETED.labels(status)._value.get()


async def test_each_status_after_its_own_time_and_history_with_it(db_url: str) -> None:
    app = new_app(db_url, retention_succeeded=DAY, retention_failed=10 * DAY, retention_cancelled=0)
    async with app:
        conn = await connect(db_url)
        try:
            old_ok = await make(conn, "succeeded", 2)
            new_ok = await make(conn, "succeeded", 0.5)
            mid_failed = await make(conn, "failed", 5)
            old_failed = await make(conn, "failed", 11)
            old_cancelled = await make(conn, "cancelled", 400)  # 0: kept for ever
            pending = await make(conn, "pending", 400)
            await conn.execute(
                "INSERT INTO task_attempts (task_id, attempt, outcome) VALUES ($1, 1, 'failed')", old_failed
            )
            await conn.execute("INSERT INTO task_events (task_id, kind) VALUES ($1, 'failed')", old_failed)
            before = deleted_metric("succeeded"), deleted_metric("failed")
            res = await app.run_retention()
            assert res.ran and res.deleted == {"succeeded": 1, "failed": 1, "cancelled": 0}
            assert await ids(conn) == {new_ok, mid_failed, old_cancelled, pending}
            assert old_ok not in await ids(conn)
            assert (
                await conn.fetchval("SELECT count(*) FROM task_attempts WHERE task_id = $1", old_failed) == 0
            )
            assert await conn.fetchval("SELECT count(*) FROM task_events WHERE task_id = $1", old_failed) == 0
            assert (deleted_metric("succeeded"), deleted_metric("failed")) == (before[0] + 1, before[1] + 1)
            # An override for this pass: cancelled after a day.
            res = await app.run_retention(cancelled=DAY)
            assert res.deleted["cancelled"] == 1 and old_cancelled not in await ids(conn)
        finally:
            await conn.close()


async def test_workflow_trees_go_whole_or_not_at_all(db_url: str) -> None:
    app = new_app(db_url, retention_succeeded=DAY, retention_failed=DAY, retention_cancelled=DAY)
    async with app:
        conn = await connect(db_url)
        try:
            # An expired tree, all finished: root, children and a grandchild go together.
            done_root = await make(conn, "succeeded", 3)
            kid = await make(conn, "failed", 3.5, done_root)
            await make(conn, "succeeded", 0.1, kid)  # its own age does not matter: the root's does
            # An expired root whose child still runs: nothing of that tree goes.
            busy_root = await make(conn, "failed", 5)
            busy_kid = await make(conn, "running", 5, busy_root)
            busy_grandkid = await make(conn, "succeeded", 5, busy_kid)
            # A child long finished under a root that finished recently: kept with its root.
            young_root = await make(conn, "succeeded", 0.2)
            old_kid = await make(conn, "succeeded", 9, young_root)
            # A Task object's row: its object decides.
            cr = await make(conn, "succeeded", 9)
            await conn.execute(
                "UPDATE tasks SET cr_uid = 'uid-1', cr_namespace = 'ns', cr_name = 'x' WHERE id = $1", cr
            )
            res = await app.run_retention()
            assert res.deleted == {"succeeded": 2, "failed": 1, "cancelled": 0}
            assert await ids(conn) == {busy_root, busy_kid, busy_grandkid, young_root, old_kid, cr}
        finally:
            await conn.close()


async def test_small_batches_walk_past_kept_trees(db_url: str) -> None:
    """Batches of 2 roots: the oldest three trees must stay (a child runs), and the pass still
    reaches the seven behind them (a batch that picked the same kept roots again would never)."""
    app = new_app(db_url, retention_succeeded=DAY, retention_batch=2)
    async with app:
        conn = await connect(db_url)
        try:
            kept = []
            for i in range(3):
                root = await make(conn, "succeeded", 30 + i)
                kept += [root, await make(conn, "running", 30, root)]
            free = [await make(conn, "succeeded", 2 + i * 0.01) for i in range(7)]
            res = await app.run_retention()
            assert res.deleted["succeeded"] == 7 and res.done
            assert res.batches == 6  # 10 roots, 2 a batch, the last one short
            assert await ids(conn) == set(kept)
            assert not set(free) & await ids(conn)
        finally:
            await conn.close()


async def test_one_batch_at_a_time_and_one_pass_per_interval(db_url: str) -> None:
    """While another session holds the retention lock (a batch elsewhere), a pass deletes
    nothing; a pass right after another is turned down until the interval has passed."""
    app = new_app(db_url, retention_succeeded=DAY)
    async with app:
        conn = await connect(db_url)
        other = await connect(db_url)
        try:
            victims = {await make(conn, "succeeded", 3) for _ in range(3)}
            tx = other.transaction()
            await tx.start()
            await other.execute("SELECT pg_advisory_xact_lock(hashtext('kubetasks.retention'))")
            policy = retention.Policy.from_settings(app.settings)
            res = await retention.run_pass(app.store, policy)
            assert res.ran and not res.done and res.total == 0
            assert victims <= await ids(conn)
            await tx.rollback()
            # The pass above claimed the interval: a pass with a gap of a minute is turned down.
            res = await retention.run_pass(app.store, policy, min_gap=60)
            assert not res.ran and victims <= await ids(conn)
            await conn.execute(
                "UPDATE housekeeping SET ran_at = now() - interval '2 minutes' WHERE name = 'retention'"
            )
            res = await retention.run_pass(app.store, policy, min_gap=60)
            assert res.ran and res.total == 3 and not victims & await ids(conn)
        finally:
            await other.close()
            await conn.close()


async def test_two_pods_services_delete_each_row_once(db_url: str) -> None:
    """Two pods' retention services at once: every expired row goes, the counts add up."""
    a = new_app(db_url, retention_succeeded=DAY, retention_interval=1, retention_batch=5)
    b = new_app(db_url, retention_succeeded=DAY, retention_interval=1, retention_batch=5)
    async with a, b:
        conn = await connect(db_url)
        try:
            for _ in range(60):
                await make(conn, "succeeded", 2)
            keep = await make(conn, "succeeded", 0.1)
            before = deleted_metric("succeeded")
            stop = asyncio.Event()
            services = [
                asyncio.create_task(retention.Retention(lambda x=x: x.store, x.settings).run(stop))
                for x in (a, b)
            ]
            try:

                async def only_keep_left() -> bool:
                    return bool(await conn.fetchval("SELECT count(*) FROM tasks") == 1)

                await wait_for(only_keep_left, 30, "the two services to delete every expired row")
            finally:
                stop.set()
                await asyncio.gather(*services)
            assert await ids(conn) == {keep}
            assert deleted_metric("succeeded") - before == 60
        finally:
            await conn.close()


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("KUBETASKS_RETENTION_FAILED", "30", "KUBETASKS_RETENTION_FAILED: must be between 60"),
        ("KUBETASKS_RETENTION_SUCCEEDED", "-1", "KUBETASKS_RETENTION_SUCCEEDED: must be between 60"),
        ("KUBETASKS_RETENTION_BATCH", "0", "KUBETASKS_RETENTION_BATCH: must be between 1 and 10000"),
        ("KUBETASKS_RETENTION_INTERVAL", "0", "KUBETASKS_RETENTION_INTERVAL: must be between 1"),
    ],
)
def test_bad_settings_are_refused(var: str, value: str, says: str) -> None:
    env = {"KUBETASKS_DATABASE_URL": "postgresql://u@h/d", var: value}
    with pytest.raises(ConfigError) as exc:
        Settings.load(env=env)
    assert str(exc.value).startswith(says), str(exc.value)
    off = Settings.load(
        env={"KUBETASKS_DATABASE_URL": "postgresql://u@h/d", "KUBETASKS_RETENTION_SUCCEEDED": "0"}
    )
    assert off.retention_succeeded == 0


async def test_bad_override_and_off(db_url: str) -> None:
    app = new_app(db_url, retention_succeeded=0, retention_failed=0, retention_cancelled=0)
    async with app:
        with pytest.raises(ValidationError, match=r"^failed: must be between 60"):
            await app.run_retention(failed=5)
        conn = await connect(db_url)
        try:
            t = await make(conn, "succeeded", 4000)
            assert not (await app.run_retention()).ran  # all off
            assert t in await ids(conn)
        finally:
            await conn.close()


def test_cli_runs_a_pass(db_url: str) -> None:
    async def setup() -> int:
        conn = await connect(db_url)
        try:
            return await make(conn, "succeeded", 2)
        finally:
            await conn.close()

    asyncio.run(setup())
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "kubetasks", "retention", "--succeeded", "86400"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "1 succeeded, 0 failed, 0 cancelled deleted in 1 batch(es)" in res.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kubetasks", "retention", "--failed", "5"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "KUBETASKS_RETENTION_FAILED: must be between 60" in bad.stderr, bad.stderr
