"""The history checker itself: each figure counts the violation it names, and only that.

A history with one violation of each kind is written by hand, straight into a
real database (the statements a broken engine would have sent) and a history
file; `judge` must find each one. Without this, a figure that stayed at 0 in
every scenario could be a figure that cannot count.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from kubetasks.store import migrate
from tests.faults import history
from tests.pgcluster import PgCluster

pytestmark = pytest.mark.faults


async def test_every_figure_counts_its_violation(fault_pg: PgCluster, tmp_path: Path) -> None:
    db = f"fx_checker_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(fault_pg.primary.url("postgres"))
    await admin.execute(f"CREATE DATABASE {db}")
    await admin.close()
    url = fault_pg.primary.url(db)
    await migrate(url)
    c = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})
    try:
        await history.install(c)
        live, dead, killed, cut = (uuid.uuid4() for _ in range(4))
        for w, pid in ((live, 100), (dead, 200), (killed, 300), (cut, 400)):
            await c.execute(
                "INSERT INTO workers (worker_id, pod_id, epoch, queues, concurrency, lease_expires_at, pid) "
                "VALUES ($1, $2, 1, '{default}', 5, now() + interval '1 hour', $3)",
                w,
                f"pod-{pid}",
                pid,
            )
        ids = [
            await c.fetchval("INSERT INTO tasks (handler) VALUES ('fx.work') RETURNING id") for _ in range(9)
        ]
        lost, dup, twice_claim, twice_run, stale, phantom, zombie, spent, fine = ids

        async def claim(t: int, w: uuid.UUID) -> None:
            await c.execute(
                "UPDATE tasks SET status = 'running', attempt = attempt + 1, worker_id = $2 WHERE id = $1",
                t,
                w,
            )

        async def succeed(t: int) -> None:
            await c.execute("UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = $1", t)

        lines: list[str] = []

        def ran(t: int, attempt: int, w: uuid.UUID, *, end: bool = True) -> None:
            lines.append(f"start {t} {attempt} {w} pod 1 0.0")
            if end:
                lines.append(f"end {t} {attempt} {w} pod 1 0.0")

        # lost: acknowledged, never final
        # dup: succeeded, put back to running (attempt 2), succeeded again
        await claim(dup, live)
        ran(dup, 1, live)
        await succeed(dup)
        await c.execute(
            "UPDATE tasks SET status = 'running', attempt = 2, finished_at = NULL WHERE id = $1", dup
        )
        ran(dup, 2, live)
        await succeed(dup)
        # twice_claim: claimed, handed back with its attempt, claimed again at attempt 1
        await claim(twice_claim, live)
        await c.execute("UPDATE tasks SET status = 'pending', attempt = 0 WHERE id = $1", twice_claim)
        await claim(twice_claim, live)
        ran(twice_claim, 1, live)
        await succeed(twice_claim)
        # twice_run: claimed once, but two processes ran attempt 1
        await claim(twice_run, live)
        ran(twice_run, 1, live, end=False)
        ran(twice_run, 1, live)
        await succeed(twice_run)
        # phantom: accepted success of a run that never ended
        await claim(phantom, live)
        ran(phantom, 1, live, end=False)
        await succeed(phantom)
        # spent: an attempt counted against a live worker (counts) and a killed one (excused)
        await claim(spent, live)
        ran(spent, 1, live)
        await succeed(spent)
        await c.execute(
            "INSERT INTO task_attempts (task_id, attempt, worker_id, outcome, error) VALUES "
            "($1, 1, $2, 'worker_lost', 'lease expired'), ($1, 1, $3, 'worker_lost', 'lease expired'), "
            "($1, 1, $4, 'worker_lost', 'cut off')",
            spent,
            live,
            killed,
            cut,
        )
        # stale and zombie: tasks running under a worker that is declared dead afterwards
        await claim(stale, dead)
        await claim(zombie, dead)
        ran(zombie, 1, dead)
        await c.execute(
            "UPDATE workers SET status = 'dead', stopped_at = now(), stop_reason = 'lease expired' "
            "WHERE worker_id = $1",
            dead,
        )
        await asyncio.sleep(0.05)
        await succeed(zombie)  # a write of the dead worker, accepted after its death committed
        # fine: a clean run
        await claim(fine, live)
        ran(fine, 1, live)
        await succeed(fine)

        hist = tmp_path / "history.log"
        hist.write_text("\n".join(lines) + "\n")
        sampler = history.Sampler(url, ttl=0.3)
        await asyncio.sleep(0.5)  # the dead worker's death is now older than the TTL
        f = await history.judge(
            c,
            acked=set(ids),
            history=hist,
            sampler=sampler,
            ttl=0.3,
            died_pids={300},
            exemptions=[history.Exemption(400, await c.fetchval("SELECT now()"), "cut off on purpose")],
            deadlocks_before=0,
        )
    finally:
        await c.close()
        admin = await asyncpg.connect(fault_pg.primary.url("postgres"))
        await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin.close()

    assert f.details["lost"]["unfinished"] == [(lost, "pending", 0), (stale, "running", 1)]
    assert f.lost == 2
    assert f.duplicates == 1 and list(f.details["duplicates"]) == [dup]
    assert f.started_twice == 2
    assert f.details["started_twice"]["claims_of_one_attempt"] == [(twice_claim, 1)]
    assert list(f.details["started_twice"]["runs"]) == [(twice_run, 1)]
    assert f.stale_running == 1 and f.details["stale_running"][0][0] == (stale, 1)
    assert f.attempts_spent == 1 and f.extra["attempts_excused"] == 2
    assert f.phantom == 1 and f.details["phantom"] == [phantom]
    assert f.zombie_accepted == 1 and f.details["zombie_accepted"] == [(zombie, 1)]
    assert f.extra["live_declared_dead"] == 1  # the "dead" worker's pid was never killed
