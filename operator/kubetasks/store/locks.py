"""Typed calls of the queries on ``job_locks`` (the PostgreSQL lock backend): the one place
that knows their parameter order (``sql/queries.sql`` documents it). Times are the database's."""

from __future__ import annotations

from collections.abc import Sequence

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


async def holders(store: Store, *, names: Sequence[str]) -> list[Row]:
    """``holder`` for many locks in one round trip: one row (name, owner, expires_in_s) per live one."""
    rows: list[Row] = await store.run("job_lock_holders", list(names))
    return rows


async def list_locks(store: Store, *, prefix: str, limit: int) -> list[Row]:
    """The live locks whose name starts with ``prefix`` ('' for all), by name, at most ``limit``."""
    rows: list[Row] = await store.run("job_locks_list", prefix, limit)
    return rows


async def force_release(store: Store, *, name: str, owner: str | None) -> str | None:
    """Delete the lock whoever holds it (only while ``owner`` does, when given); the owner it
    was taken from, None when it was free or not ``owner``'s."""
    taken = await store.run("job_lock_force_release", name, owner)
    return None if taken is None else str(taken)
