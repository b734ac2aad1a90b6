"""Throwaway local servers for the demo, the tests and the benchmarks.

`kubetasks dev up` starts a PostgreSQL and a Redis on free loopback ports and
writes their URLs to ``<run dir>/dev.json``; `kubetasks dev down` stops them
and removes their data. The run directory is ``.run/`` in the current
directory (git-ignored) unless ``KUBETASKS_RUN_DIR`` says otherwise.

Why it installs things: the promise of the README is that `make demo` and
`make test` work on a fresh Debian machine. When ``initdb`` or
``redis-server`` cannot be found and we are root, the Debian packages are
installed; otherwise the error says exactly what is missing. Debian keeps
PostgreSQL's server programs off PATH in ``/usr/lib/postgresql/<major>/bin``,
so that is searched too.

PostgreSQL refuses to run as root. As root, the server runs as the
``postgres`` system user and its data lives under ``/var/tmp`` (a fresh clone
in a ``mktemp -d`` directory is not traversable by that user); the path is
recorded in ``dev.json``, so nothing else needs to know.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubetasks import config

STATE_FILE = "dev.json"
PG_USER = "kubetasks"
PG_DB = "kubetasks"


class DevEnvError(RuntimeError):
    """A local server could not be installed or started; the message says why."""


@dataclass
class DevState:
    run_dir: str
    pg_bin: str
    pg_data: str
    pg_port: int
    pg_os_user: str | None
    redis_port: int
    redis_pid_file: str
    redis_dir: str

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.pg_port}/{PG_DB}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.pg_port}/{database}"


def run_dir() -> Path:
    return config.dev_run_dir()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise DevEnvError(
            f"{', '.join(packages)} not found and not running as root: "
            f"install them (apt-get install {' '.join(packages)}) and try again"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = run_dir() / "apt.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"kubetasks dev: installing {' '.join(packages)} (log: {log})", flush=True)
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        _apt(cmd, env, log)


#: apt-get's words when another apt or dpkg holds the lock (another install on the machine).
_APT_LOCKED = ("Could not get lock", "Unable to acquire the dpkg frontend lock", "Unable to lock")


def _apt(cmd: list[str], env: dict[str, str], log: Path, *, tries: int = 30) -> None:
    """Run one apt-get command, again while another apt or dpkg holds the lock."""
    for _ in range(tries):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        with log.open("a") as out:
            out.write(res.stdout + res.stderr)
        if res.returncode == 0:
            return
        if not any(w in res.stdout + res.stderr for w in _APT_LOCKED):
            break
        time.sleep(5)
    raise DevEnvError(f"`{' '.join(cmd)}` failed; see {log}")


def find_pg_bin() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres, newest major first."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve()))
    for c in candidates:
        bindir = Path(c).parent
        if (bindir / "pg_ctl").exists() and (bindir / "postgres").exists():
            return bindir
    return None


def ensure_pg_bin() -> Path:
    bindir = find_pg_bin()
    if bindir is None:
        apt_install("postgresql")
        bindir = find_pg_bin()
    if bindir is None:
        raise DevEnvError("PostgreSQL server programs (initdb, pg_ctl) not found after installing")
    return bindir


def ensure_redis_bin() -> str:
    found = shutil.which("redis-server")
    if found is None:
        apt_install("redis-server")
        found = shutil.which("redis-server")
    if found is None:
        raise DevEnvError("redis-server not found after installing")
    return found


def ensure_pgbouncer_bin() -> str:
    """Debian's pgbouncer (the tests run kubetasks through it in transaction pooling)."""
    found = shutil.which("pgbouncer") or next(iter(glob.glob("/usr/sbin/pgbouncer")), None)
    if found is None:
        apt_install("pgbouncer")
        found = shutil.which("pgbouncer") or next(iter(glob.glob("/usr/sbin/pgbouncer")), None)
    if found is None:
        raise DevEnvError("pgbouncer not found after installing")
    return found


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _pg_os_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--home-dir", "/var/lib/postgresql", "postgres"],
            check=True,
        )
    return "postgres"


def _pg_data_dir(rd: Path, os_user: str | None) -> Path:
    if os_user is None:
        return rd / "pg"
    digest = hashlib.sha1(str(rd).encode()).hexdigest()[:12]
    return Path("/var/tmp/kubetasks-dev") / digest / "pg"


def load_state(rd: Path | None = None) -> DevState | None:
    path = (rd or run_dir()) / STATE_FILE
    if not path.exists():
        return None
    return DevState(**json.loads(path.read_text()))


def _save_state(state: DevState) -> None:
    path = Path(state.run_dir) / STATE_FILE
    path.write_text(json.dumps(asdict(state), indent=2))


def _pg_running(state: DevState) -> bool:
    return _pg_ctl(state, "status", check=False).returncode == 0


def _pg_ctl(state: DevState, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = _as_user([str(Path(state.pg_bin) / "pg_ctl"), "-D", state.pg_data, *args], state.pg_os_user)
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _redis_running(state: DevState) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", state.redis_port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_tcp(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise DevEnvError(f"{what} did not accept connections on 127.0.0.1:{port} within {timeout:.0f}s")


def start_postgres(state: DevState) -> None:
    logfile = Path(state.pg_data).parent / "postgres.log"
    opts = " ".join(
        [
            f"-p {state.pg_port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={state.pg_data}",
            "-c max_connections=400",
            "-c shared_buffers=256MB",
            "-c max_wal_size=2GB",
            "-c track_activity_query_size=4096",
            "-c log_min_messages=warning",
        ]
    )
    res = _pg_ctl(state, "start", "-w", "-t", "60", "-l", str(logfile), "-o", opts, check=False)
    if res.returncode != 0:
        tail = logfile.read_text()[-2000:] if logfile.exists() else ""
        raise DevEnvError(f"PostgreSQL failed to start: {res.stderr.strip()}\n{tail}")
    _wait_tcp(state.pg_port, "PostgreSQL")


def stop_postgres(state: DevState, mode: str = "fast") -> None:
    if _pg_running(state):
        _pg_ctl(state, "stop", "-w", "-m", mode, check=False)


def restart_postgres(state: DevState) -> None:
    """Stop (immediate, like a crash) and start again on the same port."""
    stop_postgres(state, mode="immediate")
    start_postgres(state)


def _init_postgres(rd: Path) -> tuple[Path, Path, str | None]:
    bindir = ensure_pg_bin()
    os_user = _pg_os_user()
    data = _pg_data_dir(rd, os_user)
    if not (data / "PG_VERSION").exists():
        if data.exists():
            shutil.rmtree(data)
        data.mkdir(parents=True)
        if os_user:
            for p in (data, data.parent):
                shutil.chown(p, user=os_user)
        cmd = [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        ]
        res = subprocess.run(_as_user(cmd, os_user), capture_output=True, text=True)
        if res.returncode:
            raise DevEnvError(f"initdb failed: {res.stderr.strip()}")
    return bindir, data, os_user


def up(rd: Path | None = None) -> DevState:
    """Start (or find running) PostgreSQL and Redis; return where they are.

    ``rd`` picks another run directory, for a test that needs servers of its own
    (one it may restart or kill without disturbing the others).
    """
    rd = (rd or run_dir()).resolve()
    rd.mkdir(parents=True, exist_ok=True)
    state = load_state(rd)
    if state is not None and _pg_running(state) and _redis_running(state):
        return state
    if state is None or not Path(state.pg_data, "PG_VERSION").exists():
        bindir, data, os_user = _init_postgres(rd)
        state = DevState(
            run_dir=str(rd),
            pg_bin=str(bindir),
            pg_data=str(data),
            pg_port=free_port(),
            pg_os_user=os_user,
            redis_port=free_port(),
            redis_pid_file=str(rd / "redis" / "redis.pid"),
            redis_dir=str(rd / "redis"),
        )
    _save_state(state)
    if not _pg_running(state):
        start_postgres(state)
        _ensure_database(state)
    if not _redis_running(state):
        start_redis(state)
    return state


def _ensure_database(state: DevState) -> None:
    psql = str(Path(state.pg_bin) / "psql")
    if not Path(psql).exists():
        psql = shutil.which("psql") or "psql"
    q = f"SELECT 1 FROM pg_database WHERE datname = '{PG_DB}'"
    res = subprocess.run([psql, state.admin_url(), "-tAc", q], capture_output=True, text=True, check=False)
    if res.stdout.strip() != "1":
        subprocess.run(
            [psql, state.admin_url(), "-qc", f"CREATE DATABASE {PG_DB}"],
            capture_output=True,
            text=True,
            check=True,
        )


def start_redis(state: DevState) -> None:
    binary = ensure_redis_bin()
    Path(state.redis_dir).mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        "--port",
        str(state.redis_port),
        "--bind",
        "127.0.0.1",
        "--daemonize",
        "yes",
        "--pidfile",
        state.redis_pid_file,
        "--dir",
        state.redis_dir,
        "--logfile",
        str(Path(state.redis_dir) / "redis.log"),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise DevEnvError(f"redis-server failed to start: {res.stderr.strip() or res.stdout}")
    _wait_tcp(state.redis_port, "Redis")


def stop_redis(state: DevState) -> None:
    pid_file = Path(state.redis_pid_file)
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _redis_running(state) and time.monotonic() < deadline:
            time.sleep(0.05)


def down(rd: Path | None = None) -> None:
    state = load_state(rd)
    if state is None:
        return
    stop_postgres(state)
    stop_redis(state)
    shutil.rmtree(Path(state.pg_data).parent, ignore_errors=True)
    shutil.rmtree(state.redis_dir, ignore_errors=True)
    (Path(state.run_dir) / STATE_FILE).unlink(missing_ok=True)


def env_lines(state: DevState) -> list[str]:
    return [
        f"export KUBETASKS_DATABASE_URL={state.database_url}",
        f"export KUBETASKS_REDIS_URL={state.redis_url}",
    ]


def summary(state: DevState) -> dict[str, Any]:
    return {"database_url": state.database_url, "redis_url": state.redis_url, **asdict(state)}
