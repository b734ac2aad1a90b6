"""One fault scenario: a fresh database, worker processes behind fault proxies, an enqueuer, the checker.

    async with Scenario(name, tmp_path, target, toxi) as sc:
        ids = await sc.enqueue(500, ms=(20, 200))
        w = sc.start_worker("pod-0")
        ...inject faults: sc.kill(w), w.proxy.freeze(), target.primary.pause()...
        sc.faults_stopped()
    # leaving the block drains (60 s at most after the faults stopped), stops
    # the workers, judges the history and asserts the five figures are 0

Every worker process connects through its own Toxiproxy proxy (unless the
scenario says otherwise), so a scenario can cut one worker off or all of them.
The enqueuer and the checker connect directly. Results of every scenario run
are kept in ``RESULTS`` for the table `make faults` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kubetasks import App, EnqueueRequest
from kubetasks.store import migrate
from tests.faults import history
from tests.faults.toxiproxy import Proxy, Toxiproxy

ROOT = Path(__file__).resolve().parents[2]
TTL = 2.0
HEARTBEAT = 0.5
DRAIN_AFTER_FAULTS = 60.0
# FAULTS_STRICT=1 (`make faults`): a known defect fails its scenario like any other failure.
STRICT = os.environ.get("FAULTS_STRICT", "") not in ("", "0")
RESULTS: list[dict[str, Any]] = []


@dataclass
class Target:
    """Where a scenario's database lives: URLs for the admin side and the port proxies forward to."""

    admin_url: str  # a database URL with "{db}" for the database name
    upstream_port: int | None  # workers go through a proxy to this port; None: they use client_url
    client_url: str | None = None  # with "{db}": what workers (without proxy) and enqueuers use

    def url(self, db: str) -> str:
        return self.admin_url.format(db=db)

    def client(self, db: str) -> str:
        return (self.client_url or self.admin_url).format(db=db)


@dataclass
class WorkerProc:
    pod: str
    proc: subprocess.Popen[bytes]
    proxy: Proxy | None
    log: Path
    version: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Trickle:
    acked: list[int] = field(default_factory=list)
    errors: int = 0
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class Scenario:
    def __init__(
        self,
        name: str,
        tmp: Path,
        target: Target,
        toxi: Toxiproxy,
        *,
        ttl: float = TTL,
        heartbeat: float = HEARTBEAT,
        known: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.name = name
        # known defects of this scenario (by its name before any "[variant]"): figure -> reason
        self.known = (known or {}).get(name.split("[", maxsplit=1)[0], {})
        self.tmp = tmp
        self.target = target
        self.toxi = toxi
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.db = f"fx_{uuid.uuid4().hex[:10]}"
        self.history = tmp / "history.log"
        self.workers: list[WorkerProc] = []
        self.died: set[int] = set()
        self.terminated: set[int] = set()
        self.exemptions: list[history.Exemption] = []
        self.acked: set[int] = set()
        self.trickles: list[Trickle] = []
        self.limits: dict[str, int] = {}  # an extra figure and the most it may be
        self.derived: list[Callable[[history.Figures], None]] = []
        self.figures: history.Figures | None = None
        self.faults_end: float | None = None
        self._serial = 0
        self._deadlocks_before = 0
        self.app: App | None = None
        self.sampler = history.Sampler(target.client(self.db), ttl)
        self.t0 = time.monotonic()

    # -- set-up and tear-down ------------------------------------------------

    async def __aenter__(self) -> Scenario:
        admin = await asyncpg.connect(self.target.url("postgres"))
        try:
            await admin.execute(f"CREATE DATABASE {self.db}")
        finally:
            await admin.close()
        await migrate(self.target.url(self.db))
        conn = await asyncpg.connect(self.target.url(self.db))
        try:
            await history.install(conn)
            self._deadlocks_before = int(
                await conn.fetchval(
                    "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
                )
                or 0
            )
        finally:
            await conn.close()
        self.app = App(
            database_url=self.target.client(self.db),
            strict_handlers=False,
            heartbeat_interval=self.heartbeat,
            lease_ttl=self.ttl,
        )
        await self.app.open()
        self.sampler.start()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                await self._finish()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        for t in self.trickles:
            t.stop.set()
        for t in self.trickles:
            if t.task is not None:
                with contextlib.suppress(Exception):
                    await t.task
        for w in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGCONT)
            if w.alive():
                w.proc.kill()
            w.proc.wait()
        await self.sampler.stop()
        if self.app is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.app.close(), 10)
        for w in self.workers:
            if w.proxy is not None:
                with contextlib.suppress(Exception):
                    w.proxy.heal()
                    self.toxi.request("DELETE", f"/proxies/{w.proxy.name}")

    # -- workers -------------------------------------------------------------

    def worker_env(self, pod: str, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
        env.update(
            KUBETASKS_DATABASE_URL=url,
            KUBETASKS_POD_ID=pod,
            KUBETASKS_HEARTBEAT_INTERVAL=str(self.heartbeat),
            KUBETASKS_LEASE_TTL=str(self.ttl),
            KUBETASKS_SHUTDOWN_GRACE="10",
            FAULTS_HISTORY=str(self.history),
            # this checkout's package first, whichever one the venv has installed
            PYTHONPATH=f"{ROOT / 'operator'}:{ROOT}",
        )
        env.update(extra or {})
        return env

    def proxy_for(self, pod: str) -> Proxy:
        assert self.target.upstream_port is not None
        self._serial += 1
        return self.toxi.create(f"{self.db}-{pod}-{self._serial}", self.target.upstream_port)

    def start_worker(
        self,
        pod: str,
        *,
        version: int = 1,
        concurrency: int = 5,
        proxy: bool = True,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> WorkerProc:
        px = self.proxy_for(pod) if proxy and self.target.upstream_port is not None else None
        if px is not None:
            url = f"postgresql://kubetasks@127.0.0.1:{px.port}/{self.db}"
        else:
            url = self.target.client(self.db)
        log = self.tmp / f"{pod}.{len(self.workers)}.log"
        cmd = command or [
            sys.executable, "-m", "kubetasks", "worker",
            "--app", f"tests.faults.apps:app_v{version}", "--concurrency", str(concurrency),
        ]  # fmt: skip
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.worker_env(pod, url, {"KUBETASKS_CONCURRENCY": str(concurrency), **(env or {})}),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        w = WorkerProc(pod, proc, px, log, version)
        self.workers.append(w)
        return w

    def kill(self, w: WorkerProc) -> None:
        self.died.add(w.pid)
        w.proc.kill()
        w.proc.wait()

    def stop_signal(self, w: WorkerProc) -> None:
        w.proc.send_signal(signal.SIGSTOP)

    def cont_signal(self, w: WorkerProc) -> None:
        w.proc.send_signal(signal.SIGCONT)

    async def term(self, w: WorkerProc, timeout: float = 30) -> int:
        """SIGTERM: a graceful stop (a rolling upgrade, a scale-down)."""
        self.terminated.add(w.pid)
        w.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while w.proc.poll() is None:
            if loop.time() > end:
                raise AssertionError(f"{w.pod} did not stop within {timeout}s of SIGTERM (log: {w.log})")
            await asyncio.sleep(0.05)
        return w.proc.returncode

    async def excuse(self, w: WorkerProc, why: str) -> None:
        """The attempts this process's workers (registered until now) lose count by design."""
        self.exemptions.append(history.Exemption(w.pid, await self.db_now(), why))

    # -- the database ------------------------------------------------------------

    async def conn(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.target.client(self.db), timeout=5)

    async def db_now(self) -> dt.datetime:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = await self.conn()
                try:
                    return await c.fetchval("SELECT now()")  # type: ignore[no-any-return]
                finally:
                    await c.close()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        c = await self.conn()
        try:
            return await c.fetchval(sql, *args)
        finally:
            await c.close()

    async def count(self, where: str, *args: Any) -> int:
        return int(await self.fetchval(f"SELECT count(*) FROM kubetasks.tasks WHERE {where}", *args))

    async def wait_until(self, what: str, cond: Any, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if await cond():
                    return
            if loop.time() > end:
                raise AssertionError(f"[{self.name}] timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.1)

    async def all_busy(self, ws: list[WorkerProc], timeout: float = 60) -> None:
        """Wait until every one of these processes holds a live lease and runs a task: a fault
        injected before a slow process even started would hit nothing."""
        pids = sorted({w.pid for w in ws})

        async def cond() -> bool:
            n = await self.fetchval(
                "SELECT count(DISTINCT w.pid) FROM kubetasks.workers w JOIN kubetasks.tasks t "
                "ON t.worker_id = w.worker_id AND t.status = 'running' "
                "WHERE w.status = 'active' AND w.pid = ANY($1::int[])",
                pids,
            )
            return int(n) == len(pids)

        await self.wait_until(f"{len(pids)} worker processes to run tasks", cond, timeout)

    async def silence(self, ws: list[WorkerProc]) -> float:
        """Seconds since any worker of these processes last reached the database (a heartbeat or a
        registration): proof that a fault cut them off, whatever the engine does about it."""
        return float(
            await self.fetchval(
                "SELECT extract(epoch FROM now() - max(heartbeat_at))::float8 FROM kubetasks.workers "
                "WHERE pid = ANY($1::int[])",
                [w.pid for w in ws],
            )
        )

    # -- enqueueing ----------------------------------------------------------------

    async def enqueue(
        self, n: int, *, ms: tuple[int, int] = (20, 200), handler: str = "fx.work", max_attempts: int = 20
    ) -> list[int]:
        assert self.app is not None
        ids = await self.app.enqueue_many(
            [
                EnqueueRequest(handler, {"n": i, "ms": list(ms)}, max_attempts=max_attempts, timeout=120)
                for i in range(n)
            ]
        )
        self.acked.update(ids)
        return ids

    def trickle(
        self, every: float = 0.05, *, ms: tuple[int, int] = (20, 200), handler: str = "fx.work"
    ) -> Trickle:
        """Enqueue one task every ``every`` seconds until the faults stop; acknowledged ids count."""
        t = Trickle()
        assert self.app is not None
        app = self.app

        async def loop() -> None:
            n = 0
            while not t.stop.is_set():
                n += 1
                try:
                    async with asyncio.timeout(5):
                        tid = await app.enqueue(
                            handler, {"n": n, "ms": list(ms)}, max_attempts=20, timeout=120
                        )
                    t.acked.append(tid)
                    self.acked.add(tid)
                except Exception:  # not acknowledged: the client saw the failure
                    t.errors += 1
                    await asyncio.sleep(0.1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(t.stop.wait(), every)

        t.task = asyncio.create_task(loop(), name="faults-trickle")
        self.trickles.append(t)
        return t

    # -- the end -------------------------------------------------------------------------

    def faults_stopped(self) -> None:
        self.faults_end = time.monotonic()
        for t in self.trickles:
            t.stop.set()

    async def _finish(self) -> None:
        if self.faults_end is None:
            self.faults_stopped()
        for t in self.trickles:
            if t.task is not None:
                await t.task
        assert self.faults_end is not None
        deadline = self.faults_end + DRAIN_AFTER_FAULTS
        acked = sorted(self.acked)
        while time.monotonic() < deadline:
            try:
                left = await self.fetchval(
                    "SELECT count(*) FROM unnest($1::bigint[]) a(id) LEFT JOIN kubetasks.tasks t USING (id) "
                    "WHERE t.status IS NULL OR t.status NOT IN ('succeeded', 'failed', 'cancelled')",
                    acked,
                )
                if left == 0:
                    break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        drained_in = time.monotonic() - self.faults_end
        await asyncio.sleep(min(self.ttl, 1.0) + 0.5)  # one more sampling window for stale running rows
        await self.sampler.stop()
        # A process that ended on its own (not killed, not stopped by the scenario) crashed.
        crashed = {
            f"{w.pod}/{w.pid}": w.proc.returncode
            for w in self.workers
            if not w.alive() and w.pid not in self.died and w.pid not in self.terminated
        }
        exit_codes = {}
        for w in self.workers:
            if w.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGCONT)
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            if w.pid in self.died:
                continue
            try:
                exit_codes[f"{w.pod}/{w.pid}"] = w.proc.wait(30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                exit_codes[f"{w.pod}/{w.pid}"] = "hung at SIGTERM"
        conn = await self.conn()
        try:
            await self._dump(conn)
            f = await history.judge(
                conn,
                acked=self.acked,
                history=self.history,
                sampler=self.sampler,
                ttl=self.ttl,
                died_pids=self.died,
                exemptions=self.exemptions,
                deadlocks_before=self._deadlocks_before,
            )
        finally:
            await conn.close()
        f.extra["drained_s"] = round(drained_in, 1)
        f.extra["seconds"] = round(time.monotonic() - self.t0, 1)
        f.extra["enqueue_errors"] = sum(t.errors for t in self.trickles)
        for fn in self.derived:
            fn(f)
        self.figures = f
        hung = {k: v for k, v in exit_codes.items() if v == "hung at SIGTERM"}
        failing = f.failing()
        for k, most in self.limits.items():
            if f.extra[k] > most:
                failing[k] = f"{k}={f.extra[k]} (at most {most}): {f.details.get(k)}"
        if hung:
            failing["hung"] = f"hung at SIGTERM: {hung}"
        if crashed:
            failing["crashed"] = f"worker processes exited on their own: {crashed}"
        unclean = {
            k: v for k, v in exit_codes.items() if v not in (0, "hung at SIGTERM") and k not in crashed
        }
        if unclean:
            failing["unclean_exit"] = f"exit codes after SIGTERM: {unclean}"
        unknown = sorted(set(failing) - set(self.known))
        known = sorted(set(failing) & set(self.known))
        status = "failed" if unknown else "known defect" if known else "passed"
        RESULTS.append(
            {
                "scenario": self.name,
                **f.five(),
                "phantom": f.phantom,
                "zombie_accepted": f.zombie_accepted,
                "status": status,
                "problems": list(failing.values()),
                "extra": dict(f.extra),
            }
        )
        print(f"\n[faults] {self.name}: {f.five()} phantom={f.phantom} zombie={f.zombie_accepted} {f.extra}")
        for p in failing.values():
            print(f"[faults] {self.name}: {p}")
        where = f" (logs: {self.tmp})"
        if unknown or (known and STRICT):
            raise AssertionError(f"[{self.name}] " + "; ".join(failing.values()) + where)
        if known:
            reasons = "; ".join(f"{k}: {self.known[k]}" for k in known)
            pytest.xfail(f"[{self.name}] known defect -- {reasons} -- " + "; ".join(failing.values()) + where)

    async def _dump(self, conn: asyncpg.Connection) -> None:
        """The database's side of the history, as files beside the worker logs, to read after a failure."""
        for name, sql in (
            ("workers", "SELECT * FROM kubetasks.workers ORDER BY started_at"),
            ("task_attempts", "SELECT * FROM kubetasks.task_attempts ORDER BY id"),
            ("lease_outages", "SELECT * FROM kubetasks.lease_outages ORDER BY id"),
            (
                "transitions",
                "SELECT *, pg_xact_commit_timestamp(xmin) AS committed FROM faultcheck.transitions",
            ),
            (
                "worker_stops",
                "SELECT *, pg_xact_commit_timestamp(xmin) AS committed FROM faultcheck.worker_stops",
            ),
        ):
            rows = await conn.fetch(sql)
            with open(self.tmp / f"db-{name}.tsv", "w") as out:
                if rows:
                    out.write("\t".join(rows[0].keys()) + "\n")
                for r in rows:
                    out.write("\t".join("" if v is None else str(v) for v in r.values()) + "\n")

    def limit(self, name: str, most: int = 0) -> None:
        """Assert, beside the five, that the extra figure ``name`` is at most ``most``."""
        self.limits[name] = most

    def derive(self, fn: Callable[[history.Figures], None]) -> None:
        """``fn`` computes scenario-specific extras from the judged history, before the asserts."""
        self.derived.append(fn)
