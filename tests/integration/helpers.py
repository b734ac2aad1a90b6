"""Process and side-log helpers for integration tests that run real workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetasks import App
from kubetasks.worker import Worker
from tests.support import ROOT, connect, until


def start_worker(
    db_url: str,
    *,
    pod: str,
    sidelog: Path,
    concurrency: int = 10,
    app: str = "tests.integration.apps.sidelog:app",
    extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        KUBETASKS_DATABASE_URL=db_url,
        KUBETASKS_POD_ID=pod,
        KUBETASKS_HEARTBEAT_INTERVAL="0.5",
        KUBETASKS_LEASE_TTL="2",
        KUBETASKS_SHUTDOWN_GRACE="10",
        SIDELOG=str(sidelog),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra_env or {})
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetasks", "worker", "--app", app, "--concurrency", str(concurrency)],
            cwd=ROOT,
            env=env,
            stdout=out if out else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
        )
    finally:
        if out:
            out.close()  # the child holds its own copy


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


class RunningWorker:
    """A Worker in this event loop, started on enter and stopped gracefully on exit."""

    def __init__(self, app: App, **kw: Any) -> None:
        self.worker = Worker(app, **kw)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Worker:
        self.task = asyncio.create_task(self.worker.run(self.stop))
        await asyncio.wait_for(self.worker.ready.wait(), 10)
        return self.worker

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


#: The one wait (tests/support.py), by the name the integration tests call it.
wait_for = until


@dataclass
class Audit:
    lost: set[int]
    duplicated: set[int]
    unexpected: set[int]
    runs: Counter[int]


def read_sidelog(path: Path) -> list[tuple[str, int, int, str, str, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, tid, attempt, worker, pod, pid = line.split()
        out.append((kind, int(tid), int(attempt), worker, pod, int(pid)))
    return out


async def audit(db_url: str, ids: list[int], sidelog: Path) -> Audit:
    """Lost: never succeeded. Duplicated: succeeded twice, or two attempts of one
    task both finished their side effect and were accepted. Unexpected: the
    accepted success is not an attempt that ran to its end on that worker.
    """
    conn = await connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT id, status, attempt, worker_id::text AS w FROM tasks WHERE id = ANY($1)", ids
        )
        att = await conn.fetch(
            "SELECT task_id, count(*) AS n FROM task_attempts_all WHERE outcome = 'succeeded' "
            "AND task_id = ANY($1) GROUP BY task_id",
            ids,
        )
    finally:
        await conn.close()
    status = {r["id"]: r for r in rows}
    lost = {i for i in ids if i not in status or status[i]["status"] != "succeeded"}
    succ_audit = Counter({r["task_id"]: r["n"] for r in att})
    ends = {(t, a, w) for kind, t, a, w, _p, _pid in read_sidelog(sidelog) if kind == "end"}
    runs: Counter[int] = Counter(t for kind, t, *_ in read_sidelog(sidelog) if kind == "end")
    duplicated = {i for i, n in succ_audit.items() if n > 1}
    unexpected = set()
    for i, r in status.items():
        if r["status"] == "succeeded" and (i, r["attempt"], r["w"]) not in ends:
            unexpected.add(i)
    return Audit(lost, duplicated, unexpected, runs)
