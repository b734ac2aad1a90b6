"""Schema migrations: numbered files applied in order, once, under a lock.

Two pods running ``kubetasks migrate`` at the same moment is the normal case
during a rollout, so the whole run holds a transaction-scoped advisory lock:
the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import asyncpg

from kubetasks.store import queries

LOCK_KEY = "kubetasks.migrate"
SCHEMA = "kubetasks"


async def migrate(dsn: str, *, pooled: bool = False) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when current). One
    transaction, so a transaction-pooled URL (``pooled``: no statement cache) works too."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0 if pooled else 100)
    try:
        applied_now: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", LOCK_KEY)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {SCHEMA}.schema_migrations")}
            for version, name, sql in queries.migrations():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    name,
                )
                applied_now.append(f"{version:04d}_{name}")
        return applied_now
    finally:
        await conn.close()


async def pending(conn: asyncpg.Connection) -> list[int]:
    """Versions not yet applied (for readiness checks)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.schema_migrations")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {SCHEMA}.schema_migrations")}
    return [v for v, _, _ in queries.migrations() if v not in done]
