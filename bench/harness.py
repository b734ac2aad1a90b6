"""Plumbing shared by the measurements: databases, worker processes, CPU and machine facts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from tests import support

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
DB_PREFIX = "kbench_"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- databases -----------------------------------------------------------


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


class Databases:
    """Creates fresh databases on one server and drops them again."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._seq = 0

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_url)

    async def create(self, tag: str) -> tuple[str, str]:
        self._seq += 1
        name = f"{DB_PREFIX}{tag}_{os.getpid()}_{self._seq}"
        await support.create_database(self.admin_url, name, replace=True)
        return name, with_database(self.admin_url, name)

    async def drop(self, name: str) -> None:
        await support.drop_database(self.admin_url, name)

    @contextlib.asynccontextmanager
    async def fresh(self, tag: str) -> AsyncIterator[tuple[str, str]]:
        name, url = await self.create(tag)
        try:
            yield name, url
        finally:
            with contextlib.suppress(Exception):
                await self.drop(name)

    async def drop_stale(self) -> list[str]:
        """Drop bench databases left by runs whose process is gone."""
        conn = await self._admin()
        dropped = []
        try:
            names = [
                r[0]
                for r in await conn.fetch(
                    "SELECT datname FROM pg_database WHERE datname LIKE $1", DB_PREFIX + "%"
                )
            ]
            for name in names:
                m = re.search(r"_(\d+)_\d+$", name)
                if m and os.path.exists(f"/proc/{m.group(1)}"):  # noqa: ASYNC240 - that run still goes on
                    continue
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                dropped.append(name)
        finally:
            await conn.close()
        return dropped

    async def xacts(self, name: str) -> int:
        """Committed plus rolled-back transactions of a database, read from another database."""
        conn = await self._admin()
        try:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            v = await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", name
            )
            return int(v or 0)
        finally:
            await conn.close()

    async def wait_backends(self, name: str, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` sessions are connected to database ``name``."""

        async def enough() -> bool:
            return len(await self.backend_pids(name)) >= n

        await support.until(enough, timeout, f"{n} sessions on {name}", 0.1)

    async def backend_pids(self, name: str) -> list[int]:
        conn = await self._admin()
        try:
            return [
                int(r[0])
                for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
            ]
        finally:
            await conn.close()

    async def vacuum_analyze(self, url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()


# -- processes -----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process, 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + vals[4]
    total = sum(vals[:8])
    return float(total - idle), float(total)


@dataclass
class Workers:
    """W worker processes started behind a barrier (see launch.py)."""

    argvs: list[list[str]]
    envs: list[dict[str, str]]
    label: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kbench-")))
    cpu_at_go: list[float] = field(default_factory=list)

    async def start(self, timeout: float = 30.0) -> None:
        readies = []
        for i, (argv, env) in enumerate(zip(self.argvs, self.envs, strict=True)):
            ready = self.tmp / f"ready-{i}"
            log = self.tmp / f"{self.label}-{i}.log"
            readies.append(ready)
            self.logs.append(log)
            full_env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_READY_FILE": str(ready), **env}
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
                        argv,
                        cwd=ROOT,
                        env=full_env,
                        stdin=subprocess.PIPE,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        end = time.monotonic() + timeout
        while not all(r.exists() for r in readies):
            for p, log in zip(self.procs, self.logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"{self.label}: a worker exited at start-up:\n{self.tail(log)}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.label}: workers not ready after {timeout:.0f}s")
            await asyncio.sleep(0.02)

    def go(self) -> None:
        self.cpu_at_go = [cpu_seconds(p.pid) for p in self.procs]
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()

    def cpu_since_go(self) -> float:
        return sum(cpu_seconds(p.pid) - c for p, c in zip(self.procs, self.cpu_at_go, strict=True))

    def check_alive(self) -> None:
        for p, log in zip(self.procs, self.logs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"{self.label}: a worker exited (code {p.returncode}):\n{self.tail(log)}")

    async def wait_exit(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always leaves no process behind."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        if not await self.wait_exit(grace):
            for p in self.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
            await self.wait_exit(5.0)
        for p in self.procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()

    @staticmethod
    def tail(log: Path, lines: int = 25) -> str:
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def errors_in_logs(self) -> list[str]:
        found = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if "Traceback" in line or " ERROR " in line or "CRITICAL" in line:
                        found.append(f"{log.name}: {line.strip()[:200]}")
        return found[:10]


@contextlib.asynccontextmanager
async def running(workers: Workers) -> AsyncIterator[Workers]:
    """Start the workers; always stop them. Their logs are kept only when something failed."""
    ok = False
    try:
        await workers.start()
        yield workers
        ok = True
    finally:
        await workers.stop()
        if ok:
            shutil.rmtree(workers.tmp, ignore_errors=True)


def launcher(module: str, *args: str) -> list[str]:
    return [PY, str(BENCH / "launch.py"), module, *args]


# -- facts about the machine --------------------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("MemTotal", "MemAvailable"):
            out[k] = int(v.split()[0]) // 1024
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_digest() -> str:
    """sha256 of kubetasks' sources as they are on disk (the tree may hold uncommitted work)."""
    import hashlib

    h = hashlib.sha256()
    src = ROOT / "operator" / "kubetasks"
    for path in sorted(p for p in src.rglob("*") if p.suffix in (".py", ".sql") and p.is_file()):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def machine_info(admin_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(admin_url)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        pg_full = await conn.fetchval("SELECT version()")
        names = (
            "synchronous_commit",
            "fsync",
            "wal_level",
            "shared_buffers",
            "max_connections",
            "work_mem",
            "checkpoint_timeout",
            "max_wal_size",
            "autovacuum",
            "jit",
        )
        settings = {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()
    mem = _meminfo()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": mem.get("MemTotal"),
        "memory_available_mb": mem.get("MemAvailable"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
        "postgresql_version": pg_version,
        "postgresql": pg_full,
        "postgresql_settings": settings,
        "postgresql_url": urlsplit(admin_url)._replace(path="").geturl(),
        "packages": {
            p: _version(p)
            for p in (
                "kubetasks",
                "pgqueuer",
                "procrastinate",
                "asyncpg",
                "psycopg",
                "psycopg-binary",
                "uvloop",
                "rich",
            )
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "kubetasks_source_sha256": source_digest(),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]
