"""PostgreSQL servers of a test's own: a primary, streaming standbys, crashes and promotion.

Built from the installed Debian packages (initdb, pg_basebackup, pg_ctl of the
newest major under /usr/lib/postgresql, installed by `kubetasks dev` when
missing). Each server has its own data directory and loopback port, so a test
may kill, stop or promote it without touching the shared server of `make dev`.

    cluster = PgCluster.start(sync_standby=True)      # primary + synchronous standby
    url = cluster.url("db", target_session_attrs="read-write")   # multi-host URL
    cluster.primary.kill()                             # SIGKILL, like a crash
    cluster.promote()                                  # the standby becomes primary
    cluster.stop()

PostgreSQL refuses to run as root: as root the servers run as the `postgres`
user, with their data under /var/tmp (a pytest tmp_path is not traversable by
that user).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kubetasks import devenv

BASE = Path("/var/tmp/kubetasks-pgcluster")
USER = devenv.PG_USER


def _os_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--home-dir", "/var/lib/postgresql", "postgres"], check=True)
    return "postgres"


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a postmaster's backends and auxiliary processes)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the ppid follows the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


@dataclass
class PgServer:
    """One PostgreSQL server (a primary or a standby) on 127.0.0.1:port."""

    name: str
    bindir: Path
    data: Path
    port: int
    os_user: str | None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(_as_user(list(cmd), self.os_user), capture_output=True, text=True)
        if check and res.returncode:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{cmd[0]} failed for {self.name}: {res.stderr.strip()}\n{tail}")
        return res

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args, check=check)

    def start(self) -> None:
        opts = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data),
            "max_connections": "400",
            "shared_buffers": "128MB",
            "fsync": "off",  # a killed process loses nothing the OS holds; only power loss would
            "log_min_messages": "warning",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "256MB",
            "hot_standby": "on",
            "track_commit_timestamp": "on",  # lets a checker order commits of different sessions
            **self.options,
        }
        line = f"-p {self.port} " + " ".join(f"-c {k}={v}" for k, v in opts.items())
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.log), "-o", line)

    def running(self) -> bool:
        return self.pg_ctl("status", check=False).returncode == 0

    def postmaster_pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().split()[0])
        return None

    def _signal_all(self, sig: int) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        for p in [pid, *_children(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once: a crash, nothing flushed or sent after."""
        pid = self.postmaster_pid()
        self._signal_all(signal.SIGKILL)
        if pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.02)
        (self.data / "postmaster.pid").unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP the whole server (a frozen VM, an I/O stall): connections stay open, nothing answers."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def stop(self, mode: str = "fast") -> None:
        self.resume()  # a paused server would never stop
        if self.running():
            self.pg_ctl("stop", "-w", "-t", "60", "-m", mode, check=False)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop immediately (like a crash), stay down ``down_for`` seconds, start again on the same port."""
        self.pg_ctl("stop", "-w", "-m", "immediate", check=False)
        time.sleep(down_for)
        self.start()

    def promote(self) -> None:
        self.pg_ctl("promote", "-w", "-t", "60")

    def psql(self, sql: str, database: str = "postgres") -> str:
        res = self._run(str(self.bindir / "psql"), self.url(database), "-XAtqc", sql)
        return res.stdout.strip()


@dataclass
class PgCluster:
    """A primary and zero or more streaming standbys, all on loopback, in one directory."""

    root: Path
    primary: PgServer
    standbys: list[PgServer] = field(default_factory=list)
    #: every server ever started, in the order of url(): a client's URL outlives a failover
    members: list[PgServer] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        *,
        standbys: int = 0,
        sync_standby: bool = False,
        replication_port: int | None = None,
        options: dict[str, str] | None = None,
    ) -> PgCluster:
        """A running primary and ``standbys`` streaming standbys.

        ``sync_standby``: the first standby is synchronous (a commit returns
        once that standby has flushed it). ``replication_port``: the standbys
        connect to the primary through this port instead of the primary's own
        (a fault proxy on the replication link); the caller creates that proxy.
        """
        bindir = devenv.ensure_pg_bin()
        os_user = _os_user()
        root = BASE / uuid.uuid4().hex[:12]
        root.mkdir(parents=True)
        if os_user:
            for p in (BASE, root):
                shutil.chown(p, user=os_user)
        primary = PgServer(
            "primary", bindir, root / "primary", devenv.free_port(), os_user, dict(options or {})
        )
        primary.data.mkdir()
        if os_user:
            shutil.chown(primary.data, user=os_user)
        primary._run(
            str(bindir / "initdb"), "-D", str(primary.data), "-U", USER, "--auth=trust",
            "--encoding=UTF8", "--no-instructions", "--no-sync",
        )  # fmt: skip
        cluster = cls(root, primary, [], [primary])
        try:
            primary.start()
            for i in range(standbys):
                cluster.add_standby(f"standby{i + 1}", via_port=replication_port)
            if sync_standby and standbys:
                cluster.make_synchronous(cluster.standbys[0])
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def make_synchronous(self, standby: PgServer) -> None:
        """From now on a commit on the primary returns once ``standby`` has flushed it.

        Set on the running primary (ALTER SYSTEM, after the standby's base backup was
        taken), so the standby's copy of the configuration does not carry it: once
        promoted, it must not wait for a synchronous standby of its own.
        """
        self.primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{standby.name}'")
        self.primary.psql("SELECT pg_reload_conf()")
        self.wait_streaming(sync=True)

    def add_standby(self, name: str, *, via_port: int | None = None) -> PgServer:
        p = self.primary
        sb = PgServer(name, p.bindir, self.root / name, devenv.free_port(), p.os_user, dict(p.options))
        src_port = via_port or p.port
        p._run(
            str(p.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(p.port), "-U", USER,
            "-D", str(sb.data), "-X", "stream", "--no-sync", "-c", "fast",
        )  # fmt: skip
        conninfo = f"host=127.0.0.1 port={src_port} user={USER} application_name={name}"
        with open(sb.data / "postgresql.auto.conf", "a") as f:
            f.write(f"primary_conninfo = '{conninfo}'\n")
        (sb.data / "standby.signal").touch()
        if p.os_user:
            for path in (sb.data / "postgresql.auto.conf", sb.data / "standby.signal"):
                shutil.chown(path, user=p.os_user)
        sb.start()
        self.standbys.append(sb)
        self.members.append(sb)
        return sb

    def wait_streaming(self, *, sync: bool = False, timeout: float = 30) -> None:
        want = "sync" if sync else "%"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.primary.psql(
                "SELECT count(*) FROM pg_stat_replication "
                f"WHERE state = 'streaming' AND sync_state LIKE '{want}'"
            )
            if int(n or 0) >= (1 if sync else len(self.standbys)):
                return
            time.sleep(0.1)
        raise RuntimeError(f"standbys not streaming after {timeout}s: see {self.root}")

    def url(self, database: str = "postgres", *, target_session_attrs: str | None = "read-write") -> str:
        """A multi-host URL naming every server, primary first (libpq syntax, which asyncpg reads)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.members)
        query = f"?target_session_attrs={target_session_attrs}" if target_session_attrs else ""
        return f"postgresql://{USER}@{hosts}/{database}{query}"

    def promote(self, standby: PgServer | None = None) -> PgServer:
        """Promote ``standby`` (the first by default) and make it ``primary``.

        The old primary stays in ``members`` and so in url(): a client must skip it.
        """
        sb = standby or self.standbys[0]
        sb.promote()
        self.standbys.remove(sb)
        self.primary = sb
        return sb

    def stop(self) -> None:
        for s in self.members:
            with contextlib.suppress(Exception):
                s.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
