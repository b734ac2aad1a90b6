"""`kubetasks run` serves /healthz, /readyz and /metrics: a real process, real scrapes.

One process runs the metrics app with KUBETASKS_METRICS_PORT set; a second
worker is SIGKILLed holding tasks so that the first one's reaper recovers them.
The database then goes away (connections refused on this test's own database,
the shared server untouched) and comes back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from kubetasks import devenv
from kubetasks.app import App
from tests.integration.apps import metricsapp
from tests.integration.helpers import ROOT, start_worker, stop, wait_for

APP = "tests.integration.apps.metricsapp:app"


def start_run(
    db_url: str, port: int, log_path: Path, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        KUBETASKS_DATABASE_URL=db_url,
        KUBETASKS_POD_ID="metrics-pod",
        KUBETASKS_QUEUES="mq,other",
        KUBETASKS_HEARTBEAT_INTERVAL="0.5",
        KUBETASKS_LEASE_TTL="2",
        KUBETASKS_SHUTDOWN_GRACE="5",
        KUBETASKS_METRICS_PORT=str(port),
        KUBETASKS_OPERATOR="0",
        SIDELOG=str(log_path.with_suffix(".side")),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra or {})
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetasks", "run", "--app", APP],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def get(http: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    try:
        async with http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status, await r.text()
    except aiohttp.ClientError as exc:
        return -1, repr(exc)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def excerpt(text: str) -> Iterator[str]:
    wanted = (
        "kubetasks_tasks_claimed_total",
        "kubetasks_tasks_succeeded_total",
        "kubetasks_tasks_failed_total",
        "kubetasks_tasks_retried_total",
        "kubetasks_tasks_timed_out_total",
        "kubetasks_tasks_recovered_total",
        "kubetasks_queue_pending_tasks",
        "kubetasks_queue_oldest_pending_age_seconds",
        "kubetasks_lease_renewals_total",
        "kubetasks_claim_duration_seconds_count",
        'kubetasks_task_run_duration_seconds_count{handler="m.ok"}',
    )
    for line in text.splitlines():
        if line.startswith(wanted) and not line.endswith(" 0.0"):
            yield line


async def test_run_serves_probes_and_metrics(db_url: str, tmp_path: Path) -> None:
    port = devenv.free_port()
    log_path = tmp_path / "run.log"
    proc = start_run(db_url, port, log_path)
    victim: subprocess.Popen[bytes] | None = None
    db_name = db_url.rsplit("/", 1)[1]
    admin_url = db_url.rsplit("/", 1)[0] + "/postgres"
    app = App(database_url=db_url)
    app.add_tasks_from(metricsapp.app)  # the same handlers and options, to enqueue with
    await app.open()
    try:
        async with aiohttp.ClientSession() as http:

            async def status(path: str, want: int) -> bool:
                assert proc.poll() is None, f"kubetasks run exited with {proc.returncode}"
                return (await get(http, port, path))[0] == want

            await wait_for(lambda: status("/readyz", 200), 20, "/readyz 200 after start")
            code, body = await get(http, port, "/healthz")
            assert code == 200 and json.loads(body)["checks"]["worker"] == {"ok": True}, body

            # A worker that dies holding tasks: our process's reaper recovers them.
            victim = start_worker(
                db_url, pod="victim-pod", sidelog=tmp_path / "victim.side", app=APP,
                concurrency=3, extra_env={"KUBETASKS_QUEUES": "vq"},
            )  # fmt: skip
            held = [await app.enqueue("m.ok", {"s": 60}, queue="vq") for _ in range(3)]

            async def all_running() -> bool:
                n = await app.store.pool.fetchval(
                    "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'running'", held
                )
                return bool(n == 3)

            await wait_for(all_running, 20, "the victim to run its tasks")
            stop(victim, signal.SIGKILL)

            ok = [await app.enqueue("m.ok", {"n": i}) for i in range(20)]
            failing = [await app.enqueue("m.fail") for _ in range(3)]
            flaky = [await app.enqueue("m.flaky") for _ in range(2)]
            slow = [await app.enqueue("m.slow")]
            delayed = [await app.enqueue("m.ok", delay=3600) for _ in range(4)]
            finished = ok + failing + flaky + slow

            async def counted() -> bool:
                code, text = await get(http, port, "/metrics")
                if code != 200:
                    return False
                m = samples(text)
                return (
                    value(m, "kubetasks_tasks_succeeded_total", handler="m.ok", queue="mq") == 20
                    and value(m, "kubetasks_tasks_failed_total", handler="m.fail", queue="mq") == 3
                    and value(m, "kubetasks_tasks_succeeded_total", handler="m.flaky", queue="other") == 2
                    and value(m, "kubetasks_tasks_failed_total", handler="m.slow", queue="other") == 1
                    and value(m, "kubetasks_tasks_recovered_total") >= 3
                    and value(m, "kubetasks_queue_pending_tasks", queue="vq") == 3
                )

            await wait_for(counted, 20, "the counters to reach the expected values")
            rows = await app.store.pool.fetch("SELECT status, count(*) AS n FROM tasks WHERE id = ANY($1) "
                                              "GROUP BY status", finished)  # fmt: skip
            assert {r["status"]: r["n"] for r in rows} == {"succeeded": 22, "failed": 4}

            code, text = await get(http, port, "/metrics")
            assert code == 200
            m = samples(text)
            assert value(m, "kubetasks_tasks_claimed_total", handler="m.ok", queue="mq") == 20
            assert value(m, "kubetasks_tasks_claimed_total", handler="m.flaky", queue="other") == 4
            assert value(m, "kubetasks_tasks_retried_total", handler="m.flaky", queue="other") == 2
            assert value(m, "kubetasks_tasks_timed_out_total", handler="m.slow", queue="other") == 1
            assert value(m, "kubetasks_queue_pending_tasks", queue="mq") == len(delayed)
            assert value(m, "kubetasks_queue_due_tasks", queue="mq") == 0
            assert value(m, "kubetasks_queue_due_tasks", queue="vq") == 3
            assert value(m, "kubetasks_queue_oldest_pending_age_seconds", queue="vq") > 0
            assert value(m, "kubetasks_queue_pending_tasks", queue="other") == 0  # served, empty: 0
            # One claim statement reads all of the worker's queues (mq, other): labelled "*".
            assert value(m, "kubetasks_claim_duration_seconds_count", queue="*") > 0
            assert value(m, "kubetasks_task_run_duration_seconds_count", handler="m.ok") == 20
            assert value(m, "kubetasks_lease_renewals_total") > 0
            assert value(m, "kubetasks_lease_live") == 1
            assert value(m, "kubetasks_queue_stats_up") == 1
            assert ("kubetasks_fenced_out_writes_total", ()) in m
            for family in (
                "kubetasks_lock_acquisitions",
                "kubetasks_cron_ticks",
                "kubetasks_process_cpu_seconds",
            ):
                assert f"# TYPE {family}_total counter" in text, family
            print("\n--- /metrics excerpt ---\n" + "\n".join(excerpt(text)))

            # The database goes away: readiness fails naming it, liveness holds.
            await _allow_connections(admin_url, db_name, allow=False)
            try:
                await wait_for(lambda: status("/readyz", 503), 10, "/readyz 503 without the database")
                code, body = await get(http, port, "/readyz")
                verdict: dict[str, Any] = json.loads(body)
                assert code == 503 and "database" in verdict["failed"], verdict
                print("--- /readyz without the database ---\n" + body)
                assert (await get(http, port, "/healthz"))[0] == 200

                async def stats_down() -> bool:  # the queue figures are cached ~2 s
                    code, text = await get(http, port, "/metrics")
                    return code == 200 and value(samples(text), "kubetasks_queue_stats_up") == 0

                await wait_for(stats_down, 5, "/metrics to report the queue figures unavailable")
            finally:
                await _allow_connections(admin_url, db_name, allow=True)
            await wait_for(lambda: status("/readyz", 200), 15, "/readyz 200 once the database is back")
            assert (await get(http, port, "/healthz"))[0] == 200
    except BaseException:
        print(log_path.read_text()[-6000:])
        raise
    finally:
        await app.close()
        if victim is not None:
            stop(victim, signal.SIGKILL)
        assert stop(proc, timeout=15) == 0


async def _allow_connections(admin_url: str, db: str, *, allow: bool) -> None:
    """Refuse (and cut) every connection to this test's own database, or allow them again."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"ALTER DATABASE {db} WITH ALLOW_CONNECTIONS {str(allow).lower()}")
        if not allow:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db
            )
    finally:
        await conn.close()


async def test_port_per_process_with_an_address_file(db_url: str, tmp_path: Path) -> None:
    """KUBETASKS_METRICS_ADDR_FILE with port 0: two processes on one host (hostNetwork pods on one
    node) each bind a free port on the address given and write where; a stale file from a previous
    process is never served; the file goes when the process stops."""
    files = [tmp_path / "a" / "kubetasks-metrics", tmp_path / "b" / "kubetasks-metrics"]
    for f in files:
        f.parent.mkdir()
    stale = f"http://127.0.0.1:{devenv.free_port()}"
    files[0].write_text(stale + "\n")  # a restarted container keeps its /tmp
    procs = [
        start_run(
            db_url,
            0,
            tmp_path / f"run-{i}.log",
            {
                "KUBETASKS_POD_ID": f"pod-{i}",
                "KUBETASKS_METRICS_ADDR": "127.0.0.1",
                "KUBETASKS_METRICS_ADDR_FILE": str(f),
            },
        )
        for i, f in enumerate(files)
    ]
    try:

        async def written() -> bool:
            for p in procs:
                assert p.poll() is None, f"kubetasks run exited with {p.returncode}"
            try:
                return all(f.read_text().strip() != stale for f in files)
            except FileNotFoundError:  # not written yet, or the stale one just removed at start
                return False

        await wait_for(written, 30, "both processes to write their address")
        urls = [f.read_text().strip() for f in files]
        assert urls[0] != urls[1] and all(u.startswith("http://127.0.0.1:") for u in urls), urls
        async with aiohttp.ClientSession() as http:
            for u in urls:
                port = int(u.rsplit(":", 1)[1])

                async def ready(port: int = port) -> bool:
                    return (await get(http, port, "/readyz"))[0] == 200

                await wait_for(ready, 20, f"/readyz 200 on {u}")
                code, text = await get(http, port, "/metrics")
                assert code == 200 and "kubetasks_" in text
    finally:
        for p in procs:
            stop(p)
    assert [f.exists() for f in files] == [False, False], "the address file outlived its process"
