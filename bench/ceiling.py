"""The plain-SQL ceiling: the least work a Postgres queue can do per job.

One process, one connection, a loop of transactions: claim up to ``--batch``
pending rows with FOR UPDATE SKIP LOCKED and mark them done in the same
transaction (``--mode txn``: BEGIN, SELECT, UPDATE, COMMIT), or in one
autocommit statement (``--mode stmt``: UPDATE ... WHERE id IN (SELECT ...
FOR UPDATE SKIP LOCKED)). Exits when nothing is left. ``setup`` creates the
table and fills it. Timing is read from ``done_at`` by the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import asyncpg

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS ceiling_jobs (
    id bigserial PRIMARY KEY,
    payload jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'pending',
    done_at timestamptz
);
CREATE INDEX IF NOT EXISTS ceiling_jobs_pending ON ceiling_jobs (id) WHERE status = 'pending';
"""
PICK = "SELECT id FROM ceiling_jobs WHERE status = 'pending' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
MARK = "UPDATE ceiling_jobs SET status = 'done', done_at = now() WHERE id = ANY($1::bigint[])"
ONE_STATEMENT = f"""
UPDATE ceiling_jobs SET status = 'done', done_at = now()
WHERE id IN ({PICK}) RETURNING id
"""


async def setup(dsn: str, jobs: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        await conn.execute("INSERT INTO ceiling_jobs (payload) SELECT '{}' FROM generate_series(1, $1)", jobs)
    finally:
        await conn.close()


async def work(dsn: str, batch: int, mode: str) -> int:
    conn = await asyncpg.connect(dsn)
    done = 0
    try:
        while True:
            if mode == "stmt":
                n = len(await conn.fetch(ONE_STATEMENT, batch))
            else:
                async with conn.transaction():
                    ids = [r[0] for r in await conn.fetch(PICK, batch)]
                    if ids:
                        await conn.execute(MARK, ids)
                n = len(ids)
            if n == 0:
                # SKIP LOCKED can see nothing while the other process holds the last rows.
                if not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM ceiling_jobs WHERE status = 'pending')"
                ):
                    return done
                await asyncio.sleep(0.001)
            done += n
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=("txn", "stmt"), default="txn")
    p.add_argument("--setup", type=int, default=0, help="create the table and add this many jobs, then exit")
    a = p.parse_args()
    if a.setup:
        asyncio.run(setup(a.dsn, a.setup))
        return
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        Path(ready).write_text(str(os.getpid()))
        input()
    try:
        import uvloop
    except ImportError:
        asyncio.run(work(a.dsn, a.batch, a.mode))
    else:
        uvloop.run(work(a.dsn, a.batch, a.mode))


if __name__ == "__main__":
    main()
