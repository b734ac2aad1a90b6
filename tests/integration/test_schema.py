"""The numbered migrations and schema.sql describe the same schema."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pytest

from kubetasks import devenv
from kubetasks.store import migrate, queries
from tests.conftest import create_db, drop_db


def _dump(state: devenv.DevState, db: str) -> str:
    pg_dump = f"{state.pg_bin}/pg_dump"
    args = [
        "--schema-only",
        "--no-owner",
        "--schema=kubetasks",
        "--exclude-table=kubetasks.schema_migrations",
    ]
    res = subprocess.run([pg_dump, *args, state.admin_url(db)], capture_output=True, text=True, check=True)
    # \restrict lines carry a random key per dump (pg_dump >= 15.14); comments are noise.
    keep = (
        line for line in res.stdout.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )
    return "\n".join(keep)


async def test_migrations_produce_schema_sql(dev_state: devenv.DevState) -> None:
    """Applying every migration in order gives exactly the schema in schema.sql."""
    a = await create_db(dev_state, None)
    b = await create_db(dev_state, None)
    try:
        await migrate(dev_state.admin_url(a))
        conn = await asyncpg.connect(dev_state.admin_url(b))
        try:
            async with conn.transaction():
                await conn.execute(queries.schema_sql())
        finally:
            await conn.close()
        from_migrations = _dump(dev_state, a)
        from_schema = _dump(dev_state, b)
        assert "CREATE TABLE kubetasks.tasks" in from_migrations
        assert from_migrations == from_schema
    finally:
        await drop_db(dev_state, a)
        await drop_db(dev_state, b)


async def test_migrate_is_idempotent_and_safe_concurrently(dev_state: devenv.DevState) -> None:
    """Five pods migrating at once apply each migration exactly once."""
    name = await create_db(dev_state, None)
    url = dev_state.admin_url(name)
    try:
        results = await asyncio.gather(*(migrate(url) for _ in range(5)))
        applied = [r for r in results if r]
        assert len(applied) == 1
        assert applied[0] == [f"{v:04d}_{n}" for v, n, _ in queries.migrations()]
        assert await migrate(url) == []
        conn = await asyncpg.connect(url)
        try:
            n = await conn.fetchval("SELECT count(*) FROM kubetasks.schema_migrations")
        finally:
            await conn.close()
        assert n == len(queries.migrations())
    finally:
        await drop_db(dev_state, name)


async def test_every_query_prepares(db_url: str) -> None:
    """Each named query is valid SQL against the migrated schema."""
    conn = await asyncpg.connect(db_url, server_settings={"search_path": "kubetasks"})
    try:
        for q in queries.load().values():
            await conn.prepare(q.sql)
    finally:
        await conn.close()


async def test_names_become_domains_over_existing_tasks(
    dev_state: devenv.DevState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0022 on a database with tasks: the rows stay as they were, the table is not
    rewritten, and the names are still refused when bad (by the domains now)."""
    name = await create_db(dev_state, None)
    url = dev_state.admin_url(name)
    every = queries.migrations()
    try:
        monkeypatch.setattr(queries, "migrations", lambda: [m for m in every if m[0] < 22])
        await migrate(url)
        conn = await asyncpg.connect(url, server_settings={"search_path": "kubetasks"})
        try:
            await conn.execute(
                "INSERT INTO tasks (handler, queue) SELECT 'h' || (g % 7), 'q' || (g % 3)"
                " FROM generate_series(1, 5000) g"
            )
            heap = await conn.fetchval("SELECT pg_relation_filenode('tasks')")
            monkeypatch.setattr(queries, "migrations", lambda: every)
            assert await migrate(url) == [f"{v:04d}_{n}" for v, n, _ in every if v >= 22]
            assert await conn.fetchval("SELECT pg_relation_filenode('tasks')") == heap
            assert await conn.fetchval("SELECT count(*) FROM pending_pairs") == 21
            assert await conn.fetchval("SELECT count(DISTINCT (handler, queue)) FROM tasks") == 21
            with pytest.raises(asyncpg.CheckViolationError, match="handler_name"):
                await conn.execute("INSERT INTO tasks (handler) VALUES ('')")
            with pytest.raises(asyncpg.CheckViolationError, match="queue_name"):
                await conn.execute("UPDATE tasks SET queue = '-q' WHERE id = 1")
        finally:
            await conn.close()
    finally:
        await drop_db(dev_state, name)
