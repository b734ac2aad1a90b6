"""A PgBouncer of a test's own, in front of a PostgreSQL on 127.0.0.1.

Debian's ``pgbouncer`` package (installed by ``devenv.ensure_pgbouncer_bin``
when missing, like PostgreSQL itself), started on a free loopback port with
its config, log and pid file in a directory of its own. PgBouncer refuses to
run as root: as root it runs as the ``postgres`` user, with its directory
under /var/tmp.

    bouncer = PgBouncer.start(pg_port, pool_mode="transaction", pool_size=4)
    url = bouncer.url("db")
    bouncer.show("pools")      # the admin console's SHOW POOLS, as rows of dicts
    bouncer.stop()

Clients are not authenticated (``auth_type = any``: every server connection
logs in as the database's user); the proxy listens on loopback only.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetasks import devenv

BASE = Path("/var/tmp/kubetasks-pgbouncer")
ADMIN_USER = "pgbouncer"


@dataclass
class PgBouncer:
    port: int
    directory: Path
    os_user: str | None

    @classmethod
    def start(cls, pg_port: int, *, pool_mode: str = "transaction", pool_size: int = 4) -> PgBouncer:
        binary = devenv.ensure_pgbouncer_bin()
        os_user = "postgres" if os.geteuid() == 0 else None
        directory = (
            BASE / uuid.uuid4().hex[:10]
            if os_user
            else Path(devenv.run_dir()) / f"pgb-{uuid.uuid4().hex[:10]}"
        )
        directory.mkdir(parents=True)
        port = devenv.free_port()
        (directory / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host=127.0.0.1 port={pg_port} user={devenv.PG_USER}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {port}",
                    "unix_socket_dir =",
                    "auth_type = any",
                    f"admin_users = {ADMIN_USER}",
                    f"pool_mode = {pool_mode}",
                    f"default_pool_size = {pool_size}",
                    "max_client_conn = 1000",
                    "stats_period = 1",  # SHOW STATS lags by up to this
                    f"logfile = {directory}/pgbouncer.log",
                    f"pidfile = {directory}/pgbouncer.pid",
                    "",
                ]
            )
        )
        if os_user:
            shutil.chown(directory, os_user)
            for f in directory.iterdir():
                shutil.chown(f, os_user)
        cmd = [binary, "-d", str(directory / "pgbouncer.ini")]
        res = subprocess.run(
            ["runuser", "-u", os_user, "--", *cmd] if os_user else cmd, capture_output=True, text=True
        )
        bouncer = cls(port=port, directory=directory, os_user=os_user)
        if res.returncode:
            raise RuntimeError(f"pgbouncer did not start: {res.stderr.strip()}\n{bouncer.log_tail()}")
        devenv._wait_tcp(port, "PgBouncer")
        return bouncer

    def url(self, database: str) -> str:
        return f"postgresql://{devenv.PG_USER}@127.0.0.1:{self.port}/{database}"

    def log_tail(self) -> str:
        log = self.directory / "pgbouncer.log"
        return log.read_text()[-3000:] if log.exists() else ""

    def show(self, what: str) -> list[dict[str, str]]:
        """SHOW <what> on the admin console, read with psql (the console speaks only the
        simple query protocol)."""
        psql = Path(devenv.find_pg_bin() or "/usr/bin") / "psql"
        url = f"postgresql://{ADMIN_USER}@127.0.0.1:{self.port}/pgbouncer"
        res = subprocess.run([str(psql), url, "-X", "--csv", "-c", f"SHOW {what}"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return list(csv.DictReader(io.StringIO(res.stdout)))

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.directory / "pgbouncer.pid").read_text().split()[0])
        return None

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.02)
        shutil.rmtree(self.directory, ignore_errors=True)
