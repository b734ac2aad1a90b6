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


CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    OSError,
    TimeoutError,
)

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

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10, pooled: bool = False) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.pooled = pooled
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
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def terminate(self) -> None:
        """Drop every connection at once (a fenced process must not linger)."""
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
        target: Any = conn if conn is not None else self.pool
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
