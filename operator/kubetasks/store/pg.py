"""The asyncpg pool and the one way to run a named query.

Every connection gets ``search_path = kubetasks`` and a jsonb codec that takes
text we already serialised (validation serialises once, to measure and check
the payload, so encoding again here would double the cost) and returns Python
objects. asyncpg prepares and caches each statement per connection, so a named
query costs one round trip after its first use.

Behind a transaction-pooling proxy (PgBouncer's ``pool_mode = transaction``,
``KUBETASKS_DATABASE_POOLING=transaction``) a client's consecutive transactions
run on different server sessions: a statement prepared by name in one is
missing in the next, and anything set on the session lands on a stranger's.
``pooled=True`` connections therefore keep no statement cache (asyncpg then
prepares each statement unnamed, within the same round trips) and send no
session settings the proxy would refuse; the schema must come from the role's
own ``search_path``, which :meth:`Store.open` checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from kubetasks.errors import ConfigError
from kubetasks.store import queries

log = logging.getLogger("kubetasks.store")
SCHEMA = "kubetasks"
SERVER_SETTINGS = {"search_path": SCHEMA, "application_name": "kubetasks"}


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=str, decoder=json.loads, format="text")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool: nothing, usually.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; CLOSE ALL; ...`` on
    every release: a round trip and a transaction per query, which doubled
    both per task and made an idle worker cost more than its heartbeats.
    Pooled connections keep no session state of ours (LISTEN and the status
    writer's advisory lock live on dedicated connections), so only an
    unfinished transaction needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


#: What a transaction-pooling proxy passes on (PgBouncer 1.18 refuses other startup
#: parameters unless told to ignore them, and would not keep them per client anyway).
POOLED_SERVER_SETTINGS = {"application_name": "kubetasks"}


def connect_options(*, pooled: bool) -> dict[str, Any]:
    """asyncpg keyword arguments for a connection to a direct or a transaction-pooled URL."""
    if pooled:
        return {"server_settings": POOLED_SERVER_SETTINGS, "statement_cache_size": 0}
    return {"server_settings": SERVER_SETTINGS}


async def connect_listener(dsn: str, *, pooled: bool = False) -> asyncpg.Connection:
    """A dedicated connection (LISTEN, the operator's lease), never returned to a pool."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **connect_options(pooled=pooled))
    await _init_connection(conn)
    return conn


#: The server probes a quiet lease connection, so the slot lock of a process
#: whose host vanished (no FIN ever arrives) is freed within about 40 s.
LEASE_KEEPALIVES = {"tcp_keepalives_idle": "20", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "4"}


async def connect_lease(dsn: str, *, pooled: bool = False) -> asyncpg.Connection:
    """The lease connection: heartbeats, and the session-level advisory lock that
    says this process is alive (see ``leases``). A transaction-pooling proxy would
    hand that lock to whichever client is next, so through one (``pooled``) the
    lease holds no lock and liveness is the lease's expiry alone."""
    conn: asyncpg.Connection
    if pooled:
        conn = await asyncpg.connect(dsn, **connect_options(pooled=True))
    else:
        conn = await asyncpg.connect(dsn, server_settings={**SERVER_SETTINGS, **LEASE_KEEPALIVES})
    await _init_connection(conn)
    return conn


#: Any failure of a database call (the server's errors, the connection's, the client's, a
#: timeout): what a caller that must keep going catches. CONNECTION_ERRORS below is the
#: subset that says the connection failed, not the statement. InternalClientError: asyncpg
#: can leave a pooled connection mid-protocol when the server kills it; the pool discards
#: that connection, and callers retry as for any other.
DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    OSError,
    TimeoutError,
)

#: What sends a replica query to the primary instead: the replica unreachable, or a
#: query cancelled by a conflict with recovery (40001) on a busy standby.
REPLICA_ERRORS = (*CONNECTION_ERRORS, asyncpg.SerializationError)
#: Seconds a replica that could not be reached is left alone (each query would wait for it).
REPLICA_BACKOFF_S = 10.0
REPLICA_CONNECT_TIMEOUT_S = 5.0

T = TypeVar("T")


async def retry_connection_errors(op: Callable[[], Awaitable[T]], *, what: str, within: float = 60.0) -> T:
    """Run ``op``, again and again while the database is unreachable or drops the
    connection, for up to ``within`` seconds: a pod starting while PostgreSQL
    restarts (or while a connection is cut) should wait, not crash-loop."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    delay = 0.1
    while True:
        try:
            return await op()
        except CONNECTION_ERRORS as exc:
            if loop.time() + delay > end:
                raise
            log.warning("%s: database unreachable (%r); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Store:
    """A pool plus the named queries of ``sql/queries.sql``."""

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 10, pooled: bool = False, replica: str = ""
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.pooled = pooled
        #: A streaming standby for the queries marked ``:replica`` (empty: none).
        self.replica = replica
        self._replica_pool: asyncpg.Pool | None = None
        self._replica_down_until = 0.0
        self.replica_fallbacks = 0
        self.queries = queries.load()
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> Store:
        if self._pool is None:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                init=_init_connection,
                reset=_reset_connection,
                **connect_options(pooled=self.pooled),
            )
            if self.pooled:
                try:
                    await self._check_search_path(pool)
                except BaseException:
                    pool.terminate()
                    raise
            self._pool = pool
        return self

    @staticmethod
    async def _check_search_path(pool: asyncpg.Pool) -> None:
        """Through a transaction-pooling proxy the schema cannot be set per connection: every
        server session must find it on its own, or queries fail later, one by one."""
        if await pool.fetchval("SELECT current_schema()") != SCHEMA:
            raise ConfigError(
                "KUBETASKS_DATABASE_URL",
                f"is transaction-pooled (KUBETASKS_DATABASE_POOLING=transaction) and its sessions do "
                f"not put the {SCHEMA} schema first on their search_path (the proxy drops the one "
                f"kubetasks sends): run `ALTER ROLE <user> IN DATABASE <db> SET search_path = "
                f"{SCHEMA}, public` once, or set connect_query in pgbouncer.ini",
            )

    async def close(self) -> None:
        if self._replica_pool is not None:
            rp, self._replica_pool = self._replica_pool, None
            await rp.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def terminate(self) -> None:
        """Drop every connection at once (a fenced process must not linger)."""
        if self._replica_pool is not None:
            rp, self._replica_pool = self._replica_pool, None
            rp.terminate()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open: call `await store.open()` first")
        return self._pool

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def run(self, name: str, *args: Any, conn: asyncpg.Connection | None = None) -> Any:
        """Run query ``name`` with positional ``args``; the result follows its :kind."""
        q = self.queries[name]
        if q.replica and conn is None and self.replica and time.monotonic() >= self._replica_down_until:
            try:
                return await self._execute(q, await self._replica(), args)
            except REPLICA_ERRORS as exc:
                # A replica down, lagging into a recovery conflict or not yet reachable must
                # not take stats and listings down with it: the primary answers instead.
                self.replica_fallbacks += 1
                if not isinstance(exc, asyncpg.SerializationError):
                    self._replica_down_until = time.monotonic() + REPLICA_BACKOFF_S
                log.warning("read replica failed for %s (%r); asked the primary", name, exc)
        target: Any = conn if conn is not None else self.pool
        return await self._execute(q, target, args)

    async def _replica(self) -> asyncpg.Pool:
        if self._replica_pool is None:
            # No connection at start: a replica that is down must not stop the process.
            self._replica_pool = await asyncpg.create_pool(
                self.replica, min_size=0, max_size=max(1, self.max_size // 2), init=_init_connection,
                reset=_reset_connection, timeout=REPLICA_CONNECT_TIMEOUT_S, **connect_options(pooled=False),
            )  # fmt: skip
        return self._replica_pool

    @staticmethod
    async def _execute(q: queries.Query, target: Any, args: tuple[Any, ...]) -> Any:
        if q.kind == "one":
            return await target.fetchrow(q.sql, *args)
        if q.kind == "many":
            return await target.fetch(q.sql, *args)
        if q.kind == "val":
            return await target.fetchval(q.sql, *args)
        return await target.execute(q.sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn
