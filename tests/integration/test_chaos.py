"""Chaos: real worker processes killed, stopped, cut off and restarted.

Each test ends in the same checker (helpers.audit): lost (enqueued, never
succeeded), duplicated (a success accepted twice) and unexpected (an accepted
success that is not an attempt which ran to its end on that worker) must all
be empty. Figures are printed for the closing note (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest, devenv
from kubetasks.store import migrate
from tests.integration.helpers import audit, read_sidelog, start_worker, stop, wait_for

pytestmark = pytest.mark.chaos


async def fetchval(db_url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def count_status(db_url: str, status: str) -> int:
    return int(await fetchval(db_url, "SELECT count(*) FROM tasks WHERE status = $1", status))  # type: ignore[call-overload]


def report(title: str, **figures: object) -> None:
    print(f"\n[chaos] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def assert_clean(result: object) -> None:
    assert result.lost == set(), f"lost: {sorted(result.lost)[:20]}"  # type: ignore[attr-defined]
    assert result.duplicated == set(), f"duplicated: {sorted(result.duplicated)[:20]}"  # type: ignore[attr-defined]
    assert result.unexpected == set(), f"unexpected: {sorted(result.unexpected)[:20]}"  # type: ignore[attr-defined]


async def test_sigkill_every_three_seconds(app: App, db_url: str, tmp_path: Path) -> None:
    """2,000 tasks of 10-200 ms on 6 processes, one SIGKILLed every 3 s and restarted."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    ids = await app.enqueue_many(
        [EnqueueRequest("side.work", {"n": i, "ms": [10, 200]}, max_attempts=20) for i in range(2000)]
    )
    procs: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
    serial = 0

    def spawn(slot: int, pod: str) -> None:
        procs[slot] = (
            pod,
            start_worker(db_url, pod=pod, sidelog=sidelog, concurrency=5, log_path=tmp_path / f"{pod}.log"),
        )

    for i in range(6):
        spawn(i, f"pod-{i}")
    kills = same_pod = new_pod = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        while await count_status(db_url, "succeeded") < 2000:
            assert loop.time() - t0 < 240, "not drained within 240 s"
            await asyncio.sleep(3)
            if await count_status(db_url, "succeeded") >= 2000:
                break
            slot = random.randrange(6)
            pod, proc = procs[slot]
            proc.kill()
            proc.wait()
            kills += 1
            if random.random() < 0.5:
                same_pod += 1
                spawn(slot, pod)
            else:
                new_pod += 1
                serial += 1
                spawn(slot, f"pod-{slot}-r{serial}")
    finally:
        for _pod, proc in procs.values():
            stop(proc)
    result = await audit(db_url, ids, sidelog)
    reran = sum(1 for n in result.runs.values() if n > 1)
    lost_attempts = int(
        await fetchval(db_url, "SELECT count(*) FROM task_attempts WHERE outcome='worker_lost'")
    )  # type: ignore[call-overload]
    report(
        "sigkill every 3s",
        tasks=2000,
        kills=kills,
        restarted_same_pod=same_pod,
        restarted_new_pod=new_pod,
        seconds=round(loop.time() - t0, 1),
        worker_lost_attempts=lost_attempts,
        handlers_rerun=reran,
        lost=len(result.lost),
        duplicated=len(result.duplicated),
        unexpected=len(result.unexpected),
    )
    assert kills >= 2
    assert_clean(result)


async def test_zombie_worker_is_fenced(app: App, db_url: str, tmp_path: Path) -> None:
    """A worker stopped past its lease finds its tasks finished elsewhere; its late writes change nothing."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    ids = await app.enqueue_many([EnqueueRequest("side.sleep", {"s": 1.5}) for _ in range(10)])
    zombie = start_worker(db_url, pod="zombie", sidelog=sidelog, concurrency=10, log_path=tmp_path / "z.log")
    other = None
    try:

        async def zombie_holds_all() -> bool:
            return await count_status(db_url, "running") == 10

        await wait_for(zombie_holds_all, 20, "the zombie to hold all ten")
        zombie.send_signal(signal.SIGSTOP)
        other = start_worker(
            db_url, pod="healthy", sidelog=sidelog, concurrency=10, log_path=tmp_path / "h.log"
        )

        async def all_done() -> bool:
            return await count_status(db_url, "succeeded") == 10

        await wait_for(all_done, 30, "the healthy worker to finish the recovered tasks")
        before = await audit(db_url, ids, sidelog)
        zombie.send_signal(signal.SIGCONT)

        async def zombie_fenced() -> bool:
            return "lease lost" in (tmp_path / "z.log").read_text()

        await wait_for(zombie_fenced, 15, "the zombie to fence itself")
        await asyncio.sleep(2.0)  # its handlers' sleeps end now: their writes must bounce
    finally:
        zombie.send_signal(signal.SIGCONT)
        stop(zombie)
        if other:
            stop(other)
    after = await audit(db_url, ids, sidelog)
    zlog = (tmp_path / "z.log").read_text()
    report(
        "zombie",
        tasks=10,
        recovered_and_finished=10 - len(before.lost),
        zombie_dropped_lines=zlog.count("dropped"),
        lost=len(after.lost),
        duplicated=len(after.duplicated),
        unexpected=len(after.unexpected),
    )
    assert before.lost == set()
    assert_clean(after)
    pods = {rec[4] for rec in read_sidelog(sidelog) if rec[0] == "end"}
    assert "healthy" in pods
    for tid in ids:
        rec = await app.get_task(tid)
        assert rec.pod_id == "healthy" and rec.status == "succeeded"


async def test_connections_killed_mid_claim_and_mid_completion(app: App, db_url: str, tmp_path: Path) -> None:
    """pg_terminate_backend on every worker connection, again and again, while 1,000 tasks drain."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    # Tasks long enough that the drain spans many rounds of kills (a fast drain once ended after two).
    ids = await app.enqueue_many([EnqueueRequest("side.work", {"n": i, "ms": [10, 60]}) for i in range(1000)])
    dbname = db_url.rsplit("/", 1)[1]
    procs = [
        start_worker(db_url, pod=f"pod-{i}", sidelog=sidelog, concurrency=10, log_path=tmp_path / f"w{i}.log")
        for i in range(3)
    ]
    killed = 0
    conn = await asyncpg.connect(db_url)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while await count_status(db_url, "succeeded") < 1000:
            assert loop.time() - t0 < 120, "not drained within 120 s"
            n = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = 'kubetasks' AND pid <> pg_backend_pid()",
                dbname,
            )
            killed += int(n)
            await asyncio.sleep(random.uniform(0.05, 0.3))
    finally:
        await conn.close()
        codes = [stop(p) for p in procs]
    result = await audit(db_url, ids, sidelog)
    report(
        "connections killed",
        tasks=1000,
        connections_killed=killed,
        lost=len(result.lost),
        duplicated=len(result.duplicated),
        unexpected=len(result.unexpected),
    )
    assert killed > 20
    assert codes == [0, 0, 0]
    assert_clean(result)


async def test_postgres_restarted_under_load(tmp_path: Path) -> None:
    """Workers ride out an immediate PostgreSQL restart and finish every task exactly once."""
    rd = tmp_path / "own-run"
    state = devenv.up(rd)  # servers of our own: the shared ones must not restart under other tests
    try:
        conn = await asyncpg.connect(state.admin_url())
        await conn.execute("CREATE DATABASE chaos")
        await conn.close()
        url = state.admin_url("chaos")
        await migrate(url)
        app = App(database_url=url, strict_handlers=False)
        sidelog = tmp_path / "side.log"
        ids = await app.enqueue_many(
            [EnqueueRequest("side.work", {"n": i, "ms": [5, 50]}) for i in range(1500)]
        )
        await app.close()
        procs = [
            start_worker(
                url, pod=f"pod-{i}", sidelog=sidelog, concurrency=10, log_path=tmp_path / f"w{i}.log"
            )
            for i in range(3)
        ]
        try:

            async def some_done() -> bool:
                return await count_status(url, "succeeded") > 200

            await wait_for(some_done, 60, "work under way")
            await asyncio.to_thread(devenv.restart_postgres, state)
            restarted_at = await count_status(url, "succeeded")

            async def drained() -> bool:
                return await count_status(url, "succeeded") == 1500

            await wait_for(drained, 120, "all 1,500 after the restart")
        finally:
            codes = [stop(p) for p in procs]
        result = await audit(url, ids, sidelog)
        report(
            "postgres restarted",
            tasks=1500,
            succeeded_before_restart=restarted_at,
            lost=len(result.lost),
            duplicated=len(result.duplicated),
            unexpected=len(result.unexpected),
        )
        assert codes == [0, 0, 0]
        assert_clean(result)
    finally:
        devenv.down(rd)


def faketime_lib() -> str:
    found = [
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        )
        if os.path.exists(p)
    ]
    if not found:
        devenv.apt_install("faketime")
        return faketime_lib()
    return found[0]


async def test_worker_with_clock_an_hour_off(app: App, db_url: str, tmp_path: Path) -> None:
    """A worker whose wall clock is an hour ahead claims, leases and recovers exactly like the others."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    lib = faketime_lib()
    skew = {
        "LD_PRELOAD": lib,
        "FAKETIME": "+1h",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
    probe = subprocess.run(
        ["date", "+%s"], env={**os.environ, **skew}, capture_output=True, text=True, check=True
    )
    real = int(subprocess.run(["date", "+%s"], capture_output=True, text=True, check=True).stdout)
    assert int(probe.stdout) - real >= 3500, "faketime did not shift the clock"
    skewed = start_worker(
        db_url,
        pod="skewed",
        sidelog=sidelog,
        concurrency=10,
        extra_env=skew,
        log_path=tmp_path / "skewed.log",
    )
    normal = start_worker(db_url, pod="normal", sidelog=sidelog, concurrency=10, log_path=tmp_path / "n.log")
    try:
        # Tasks go in once both serve: whichever started first would otherwise drain all 300 alone.
        async def both_registered() -> bool:
            return await fetchval(db_url, "SELECT count(*) FROM workers WHERE status = 'active'") == 2

        await wait_for(both_registered, 60, "both workers registered")
        ids = await app.enqueue_many(
            [EnqueueRequest("side.work", {"n": i, "ms": [1, 10]}) for i in range(300)]
        )

        async def drained() -> bool:
            return await count_status(db_url, "succeeded") == 300

        await wait_for(drained, 60, "300 successes")
        # The skewed worker keeps its lease (it is not reaped early) and nobody is declared dead.
        await asyncio.sleep(3)  # > lease TTL of 2 s: a skewed lease would have been reaped by now
        dead = await fetchval(db_url, "SELECT count(*) FROM workers WHERE status = 'dead'")
        live = await fetchval(db_url, "SELECT count(*) FROM workers WHERE status = 'active'")
    finally:
        codes = [stop(skewed), stop(normal)]
    result = await audit(db_url, ids, sidelog)
    by_pod = {
        p: sum(1 for r in read_sidelog(sidelog) if r[0] == "end" and r[4] == p) for p in ("skewed", "normal")
    }
    report(
        "clock an hour off",
        tasks=300,
        ran_on=by_pod,
        dead_workers=dead,
        lost=len(result.lost),
        duplicated=len(result.duplicated),
        unexpected=len(result.unexpected),
    )
    assert (dead, live) == (0, 2)
    assert by_pod["skewed"] > 0
    assert codes == [0, 0]
    assert_clean(result)


async def test_sigterm_during_long_tasks_releases_without_failing(
    app: App, db_url: str, tmp_path: Path
) -> None:
    """SIGTERM with tasks longer than the grace: finished ones stay, the rest go back and finish elsewhere."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    short = await app.enqueue_many([EnqueueRequest("side.sleep", {"s": 0.3}) for _ in range(5)])
    long = await app.enqueue_many(
        [EnqueueRequest("side.sleep", {"s": 4.0}, max_attempts=1) for _ in range(5)]
    )
    first = start_worker(
        db_url,
        pod="first",
        sidelog=sidelog,
        concurrency=10,
        extra_env={"KUBETASKS_SHUTDOWN_GRACE": "1"},
        log_path=tmp_path / "f.log",
    )
    second = None
    try:

        async def all_running() -> bool:
            return await count_status(db_url, "running") == 10

        await wait_for(all_running, 20, "ten running")
        assert stop(first, signal.SIGTERM) == 0
        assert await count_status(db_url, "failed") == 0
        released = await fetchval(db_url, "SELECT count(*) FROM task_attempts WHERE outcome = 'released'")
        second = start_worker(
            db_url, pod="second", sidelog=sidelog, concurrency=10, log_path=tmp_path / "s.log"
        )

        async def drained() -> bool:
            return await count_status(db_url, "succeeded") == 10

        await wait_for(drained, 30, "all ten to succeed")
    finally:
        if second:
            stop(second)
    result = await audit(db_url, short + long, sidelog)
    report(
        "sigterm during long tasks",
        tasks=10,
        released=released,
        failed=0,
        lost=len(result.lost),
        duplicated=len(result.duplicated),
        unexpected=len(result.unexpected),
    )
    assert released == 5
    for tid in long:
        rec = await app.get_task(tid)
        assert rec.attempts_spent == 1, "a graceful release must not spend the only attempt"
        assert rec.attempt == 2, "the run after a release takes a new attempt number"
    assert_clean(result)


@pytest.mark.parametrize("restart", ["same_pod", "silent"])
async def test_recovery_time_of_fifty_running_tasks(
    app: App, db_url: str, tmp_path: Path, restart: str
) -> None:
    """SIGKILL a worker holding 50 running tasks; time until all 50 run again elsewhere."""
    app.strict_handlers = False
    sidelog = tmp_path / "side.log"
    ttl, hb = 5.0, 1.0
    env = {"KUBETASKS_LEASE_TTL": str(ttl), "KUBETASKS_HEARTBEAT_INTERVAL": str(hb)}
    ids = await app.enqueue_many(
        [EnqueueRequest("side.sleep", {"s": 30.0}, max_attempts=3) for _ in range(50)]
    )
    victim = start_worker(
        db_url, pod="victim", sidelog=sidelog, concurrency=50, extra_env=env, log_path=tmp_path / "v.log"
    )
    survivor = None
    try:

        async def holds_fifty() -> bool:
            return await count_status(db_url, "running") == 50

        await wait_for(holds_fifty, 20, "the victim to hold fifty")
        if restart == "silent":
            survivor = start_worker(
                db_url,
                pod="survivor",
                sidelog=sidelog,
                concurrency=50,
                extra_env=env,
                log_path=tmp_path / "s.log",
            )
            await asyncio.sleep(1.5)  # the survivor is up and heartbeating
        loop = asyncio.get_running_loop()
        victim.kill()
        victim.wait()
        t_kill = loop.time()
        if restart == "same_pod":
            survivor = start_worker(
                db_url,
                pod="victim",
                sidelog=sidelog,
                concurrency=50,
                extra_env=env,
                log_path=tmp_path / "v2.log",
            )

        async def all_restarted() -> bool:
            n = await fetchval(
                db_url,
                "SELECT count(*) FROM tasks WHERE status = 'running' AND attempt = 2 AND id = ANY($1)",
                ids,
            )
            return n == 50

        await wait_for(all_restarted, 60, "all fifty to run again")
        took = loop.time() - t_kill
    finally:
        victim.kill()
        if survivor:
            stop(survivor, signal.SIGKILL)
    report(f"recovery ({restart})", tasks=50, seconds=round(took, 2), lease_ttl=ttl, heartbeat=hb)
    if restart == "same_pod":
        # includes starting a Python process (~0.5 s here): the supersede itself is one statement
        assert took <= 3.0
    else:
        assert took <= ttl + 2.0


def test_faketime_available() -> None:
    """The clock-skew test needs libfaketime; installing it is part of the harness."""
    assert os.path.exists(faketime_lib()) and shutil.which("date")
