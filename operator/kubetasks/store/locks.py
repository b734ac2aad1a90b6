"""Typed calls of the queries on ``job_locks`` (the PostgreSQL lock backend): the one place
that knows their parameter order (``sql/queries.sql`` documents it). Times are the database's."""

from __future__ import annotations

from kubetasks.store.pg import Store
from kubetasks.store.tasks import Row


async def acquire(store: Store, *, name: str, owner: str, ttl: float) -> bool:
    """Take the lock when it is free or expired; False when another owner's is live."""
    return await store.run("job_lock_acquire", name, owner, ttl) is not None


async def renew(store: Store, *, name: str, owner: str, ttl: float) -> bool:
    return bool(await store.run("job_lock_renew", name, owner, ttl))


async def release(store: Store, *, name: str, owner: str) -> bool:
    return bool(await store.run("job_lock_release", name, owner))


async def holder(store: Store, *, name: str) -> Row | None:
    """The live holder and the seconds left on its lock; None: free."""
    row: Row | None = await store.run("job_lock_holder", name)
    return row
