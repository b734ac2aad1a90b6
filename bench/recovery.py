"""Recovery times of running tasks after a worker dies (issue 8 item 6, the leases issue).

This module owns the ``recovery`` measurement. A worker process ("victim",
concurrency N) runs N long tasks (``sleep`` of bench/apps/kt_app.py, 120 s,
3 attempts); it is SIGKILLed, and we time from the kill until all N run again
as attempt 2 (``started_at`` of the new attempt, database time, against the
wall clock of the kill: same host, same clock).

* ``same_pod``: a new process with the victim's pod id registers, which
  supersedes the dead worker and releases its tasks at once (a restarted
  container). The new process is started before the kill and waits, imported,
  behind launch.py's barrier, released right after the kill: the figure is
  re-register + claim; Python's start-up (measured too, ``process_start_s``)
  comes on top in a real restart.
* ``silent_death``: nobody restarts; a second live worker (another pod id,
  heartbeating for a while already) reaps the victim when its lease runs out
  and claims the tasks. Compared with the lease TTL (short here, via
  KUBETASKS_LEASE_TTL and KUBETASKS_HEARTBEAT_INTERVAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from tests.support import until

from bench import systems
from bench.harness import Databases, Workers, running

SLEEP_S = 120.0


async def one(dbs: Databases, mode: str, n: int, ttl: float, heartbeat: float) -> dict[str, Any]:
    """One recovery: ``mode`` is ``same_pod`` or ``silent_death``."""
    from kubetasks import App, EnqueueRequest

    system = systems.Kubetasks()
    out: dict[str, Any] = {"mode": mode, "tasks": n, "lease_ttl_s": ttl, "heartbeat_interval_s": heartbeat}
    settings = {
        "KUBETASKS_LEASE_TTL": str(ttl),
        "KUBETASKS_HEARTBEAT_INTERVAL": str(heartbeat),
        "KUBETASKS_SHUTDOWN_GRACE": "1",
    }
    async with dbs.fresh("rec") as (_name, url):
        await system.setup(url)
        app = App(database_url=url, strict_handlers=False)
        try:
            ids = await app.enqueue_many([EnqueueRequest("sleep", {"s": SLEEP_S}) for _ in range(n)])
        finally:
            await app.close()
        conn = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})

        async def count(sql: str) -> int:
            return int(await conn.fetchval(sql, ids))

        def env(pod: str) -> dict[str, str]:
            return {**system.worker_env(url, 0), "KUBETASKS_POD_ID": pod, **settings}

        second_pod = "victim" if mode == "same_pod" else "survivor"
        victim = Workers([system.worker_argv(n)], [env("victim")], f"recovery-{mode}-victim")
        other = Workers([system.worker_argv(n)], [env(second_pod)], f"recovery-{mode}-{second_pod}")
        try:
            async with running(victim):
                victim.go()
                await until(
                    lambda: _eq(
                        count("SELECT count(*) FROM tasks WHERE status = 'running' AND id = ANY($1)"), n
                    ),
                    30,
                    f"the victim to run all {n}",
                    interval=0.02,
                )
                t = time.monotonic()
                async with running(other):  # started, imported, waiting at the barrier
                    out["process_start_s"] = round(time.monotonic() - t, 3)
                    if mode == "silent_death":
                        other.go()
                        await until(
                            lambda: _eq(
                                conn.fetchval(
                                    "SELECT count(*) FROM workers WHERE pod_id = 'survivor' "
                                    "AND status = 'active'"
                                ),
                                1,
                            ),
                            30,
                            "the survivor to register",
                            interval=0.02,
                        )
                        await asyncio.sleep(1.5 * heartbeat)  # it has heartbeaten: a peer, not a newcomer
                    vrow = await conn.fetchrow(
                        "SELECT worker_id FROM workers WHERE pod_id = 'victim' AND status = 'active'"
                    )
                    assert vrow is not None, "the victim is not registered"
                    pid = victim.procs[0].pid
                    t_kill = time.time()
                    t_kill_mono = time.monotonic()
                    os.killpg(pid, signal.SIGKILL)
                    if mode == "same_pod":
                        other.go()
                    while victim.procs[0].poll() is None:  # noqa: ASYNC110 - reaping our own child
                        await asyncio.sleep(0.005)
                    await until(
                        lambda: _eq(
                            count(
                                "SELECT count(*) FROM tasks WHERE status = 'running' AND attempt = 2 "
                                "AND id = ANY($1)"
                            ),
                            n,
                        ),
                        max(60.0, 4 * ttl),
                        f"all {n} to run again",
                        interval=0.02,
                    )
                    out["observed_s"] = round(time.monotonic() - t_kill_mono, 3)
                    r = await conn.fetchrow(
                        "SELECT min(started_at) AS first, max(started_at) AS last FROM tasks "
                        "WHERE attempt = 2 AND id = ANY($1)",
                        ids,
                    )
                    w = await conn.fetchrow(
                        "SELECT status, stop_reason, heartbeat_at, lease_expires_at, stopped_at FROM workers "
                        "WHERE worker_id = $1",
                        vrow["worker_id"],
                    )
                    lost = await count(
                        "SELECT count(*) FROM task_attempts "
                        "WHERE outcome = 'worker_lost' AND task_id = ANY($1)"
                    )
        finally:
            await conn.close()
    assert r is not None and w is not None
    out["seconds"] = round(r["last"].timestamp() - t_kill, 3)
    out["first_restart_s"] = round(r["first"].timestamp() - t_kill, 3)
    out["victim_status"] = w["status"]
    out["victim_stop_reason"] = w["stop_reason"]
    out["victim_last_heartbeat_before_kill_s"] = round(t_kill - w["heartbeat_at"].timestamp(), 3)
    out["victim_declared_lost_after_s"] = (
        round(w["stopped_at"].timestamp() - t_kill, 3) if w["stopped_at"] else None
    )
    out["worker_lost_attempts"] = lost
    if mode == "silent_death":
        out["lease_expired_after_kill_s"] = round(w["lease_expires_at"].timestamp() - t_kill, 3)
        out["after_lease_expiry_s"] = round(r["last"].timestamp() - w["lease_expires_at"].timestamp(), 3)
        out["seconds_vs_ttl"] = round(out["seconds"] / ttl, 3)
    else:
        out["seconds_incl_process_start"] = round(out["seconds"] + out["process_start_s"], 3)
    return out


async def _eq(value: Any, want: int) -> bool:
    return int(await value) == want


async def measure(
    dbs: Databases, n: int, ttl: float, heartbeat: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """The ``recovery`` section of the results: both modes, each in a fresh database."""
    out: dict[str, Any] = {"tasks": n, "lease_ttl_s": ttl, "heartbeat_interval_s": heartbeat}
    for mode in ("same_pod", "silent_death"):
        try:
            r = await one(dbs, mode, n, ttl, heartbeat)
        except Exception as exc:
            r = {"mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        out[mode] = r
        if "error" in r:
            log(f"[red]recovery {mode} failed:[/red] {r['error'][:500]}")
        elif mode == "same_pod":
            log(
                f"recovery same pod: all {n} running again {r['seconds']:.2f} s after the SIGKILL "
                f"(+ {r['process_start_s']:.2f} s process start-up in a real restart)"
            )
        else:
            log(
                f"recovery silent death: all {n} running again {r['seconds']:.2f} s after the SIGKILL "
                f"(lease TTL {ttl:g} s, heartbeat {heartbeat:g} s; {r['after_lease_expiry_s']:.2f} s after "
                "the lease expired)"
            )
    with contextlib.suppress(KeyError, TypeError):
        out["recovery_same_pod_s"] = out["same_pod"]["seconds"]
    with contextlib.suppress(KeyError, TypeError):
        out["recovery_silent_death_s"] = out["silent_death"]["seconds"]
    return out
