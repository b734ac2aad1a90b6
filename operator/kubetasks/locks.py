"""Named job locks: at most one holder per name, renewed while held, told when lost.

``async with job_lock(backend, "cron:nightly", ttl=30, wait=5) as lock:`` takes the
lock under a random owner token, renews it every ``ttl / 3`` while the body runs
and releases it on exit; ``LockNotAcquired`` is raised when ``wait`` runs out
first. Two backends give the same API (``make_backend`` picks one):

* Redis: a Lua script doing ``SET key owner NX PX ttl`` that also records a
  random id of this acquire call next to it, and answers yes when sent again
  with that id -- so a command the client retried after its reply was lost
  (the client retries once) never reports our own lock as someone else's,
  while a second, separate acquire by the same owner is still refused. Renew
  and release are Lua scripts that act only while the key still holds our
  owner token, so nobody releases or extends a lock another owner holds.
* PostgreSQL (no Redis configured): one ``job_locks`` row per name, taken by an
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expires_at <= now()``, renewed and
  released with the owner in the WHERE.

Guarantees, and the clock each one trusts:

* Mutual exclusion is decided by the backend's clock only: Redis's own expiry
  of the key (``PX``) or PostgreSQL's ``now()``. A pod's wall clock is never
  compared with anything.
* The holder measures its lock on the event loop's monotonic clock from the
  moment the last successful acquire or renewal was *sent*, less a margin for
  the two clocks running at different rates (1 % of the ttl plus 2 ms, as
  Redlock does); that interval can only under-estimate what the backend
  granted. When a renewal finds the lock no longer ours, or none succeeds
  before that interval runs out (backend down, network partition),
  ``lock.lost`` is set and ``on_lost`` is called, so the holder hears before
  the backend lets another owner in. The local clock is used only to give up
  early, never to claim a lock.
* A backend that cannot be reached raises ``LockBackendError``; it is never
  read as "held" or "free". If the reply to an acquire is lost, the lock may
  have been taken for us: it expires after ``ttl`` (the safety net), and an
  error is raised rather than claiming it.
* The exclusion lasts as long as the holder notices ``lost``: a process paused
  longer than its ttl (GC, SIGSTOP) can still run after its lock expired. Work
  that must never overlap should also fence its writes (the README's "Guarantees").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from kubetasks import metrics, validation
from kubetasks.errors import KubetasksError, ValidationError
from kubetasks.store import DB_ERRORS, Store
from kubetasks.store import locks as pg_locks

log = logging.getLogger("kubetasks.locks")
T = TypeVar("T")

NAME_MAX = 255
TTL_MIN, TTL_MAX = 0.1, 86400.0
WAIT_MAX = 86400.0
REDIS_PREFIX = "kubetasks:lock:"
#: The most locks one ``list`` returns.
LIST_MAX = 10_000
#: The local clock may run faster or slower than the backend's: give up this much early.
DRIFT_FACTOR, DRIFT_FLOOR_S = 0.01, 0.002

#: (owner token, seconds until the backend lets the lock expire)
Holder = tuple[str, float]
OnLost = Callable[[str], object]


class LockBackendError(KubetasksError):
    """The lock backend could not be reached or answered with an error: the lock state is unknown."""


class LockNotAcquired(KubetasksError):
    """Another owner held the lock for as long as we were willing to wait."""

    def __init__(self, name: str, holder: Holder | None, waited: float | None = None) -> None:
        self.name = name
        self.holder = holder
        self.waited = waited
        who = f"held by {holder[0]!r} for another {max(0.0, holder[1]):.1f}s" if holder else "held"
        after = "" if waited is None else f" (gave up after waiting {waited:.1f}s)"
        super().__init__(f"job lock {name!r} is {who}{after}")


class LockLost(KubetasksError):
    """Raised by ``JobLock.raise_if_lost``: this owner may no longer hold the lock."""


# -- validation ------------------------------------------------------------


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValidationError("name", f"must be a string, got {type(name).__name__}")
    if not 1 <= len(name) <= NAME_MAX:
        raise ValidationError("name", f"must be 1 to {NAME_MAX} characters, got {len(name)}")
    return name


def validate_ttl(ttl: object) -> float:
    return validation.seconds("ttl", ttl, TTL_MIN, TTL_MAX)


def validate_wait(wait: object) -> float | None:
    return None if wait is None else validation.seconds("wait", wait, 0.0, WAIT_MAX)


def validate_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner:
        raise ValidationError("owner", f"must be a non-empty string, got {owner!r}")
    if len(owner) > 1024:
        raise ValidationError("owner", f"must be at most 1024 characters, got {len(owner)}")
    return owner


def new_owner() -> str:
    """A fresh owner token: who took it (host/pid, for people) plus 96 random bits."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(12)}"


# -- backends --------------------------------------------------------------


class LockBackend(Protocol):
    """Where locks live. Every method raises ``LockBackendError`` when the answer is unknown."""

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take ``name`` for ``owner`` for ``ttl_s`` if it is free or expired."""
        ...

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        """Extend to ``ttl_s`` from now; False when the lock is no longer ``owner``'s."""
        ...

    async def release(self, name: str, owner: str) -> bool:
        """Release if ``owner`` holds it; False (and nothing changed) otherwise."""
        ...

    async def holder(self, name: str) -> Holder | None:
        """The live holder and its seconds left, or None when the lock is free."""
        ...

    async def list(self, prefix: str = "", limit: int = LIST_MAX) -> list[LockInfo]:
        """Live locks whose name starts with ``prefix``, by name, ``limit`` at most."""
        ...

    async def force_release(self, name: str, owner: str | None = None) -> str | None:
        """Delete ``name`` whoever holds it (only while ``owner`` does, when given): the
        owner it took the lock from, or None when it was free (or held by someone else)."""
        ...

    async def holders(self, names: Sequence[str]) -> dict[str, Holder]:
        """``holder`` of many locks in one round trip: the held ones by name (free ones left out)."""
        ...

    async def close(self) -> None:
        """Free the backend's own connections (never the shared store)."""
        ...


@dataclass(frozen=True)
class LockInfo:
    """A live lock as ``locks list`` shows it: times from the backend's own clock
    (Redis TIME, PostgreSQL now()); ``acquired_at`` None when unknown (a lock taken by a
    version that did not record it)."""

    name: str
    owner: str
    acquired_at: datetime | None
    expires_at: datetime | None
    expires_in_s: float
    backend: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("acquired_at", "expires_at"):
            d[k] = None if d[k] is None else d[k].isoformat()
        if math.isinf(self.expires_in_s):
            d["expires_in_s"] = None
        return d


def _which(names: str | Sequence[str]) -> str:
    """The locks an error is about: one by name (as every single-lock call says), or the first of many."""
    if isinstance(names, str) or len(names) == 1:
        return f"job lock {(names if isinstance(names, str) else names[0])!r}"
    return f"job locks {names[0]!r} and {len(names) - 1} more"


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


# KEYS[1] the lock, KEYS[2] the id of the acquire call that took it (expiring with
# it): the same call sent again after its reply was lost finds both and succeeds.
_ACQUIRE_LUA = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    redis.call('set', KEYS[2], ARGV[3], 'PX', ARGV[2])
    if KEYS[3] then
        local t = redis.call('time')
        redis.call('set', KEYS[3], t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'PX', ARGV[2])
    end
    return 1
end
if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('get', KEYS[2]) == ARGV[3] then
    return 1
end
return 0
"""

_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    if KEYS[2] then
        redis.call('pexpire', KEYS[2], ARGV[2])
    end
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

# KEYS: pairs of (lock key, its acquire-time key). For each live lock: key, owner,
# pttl, acquired ('' when unknown); first the server's TIME, so expiry is stated on
# Redis's clock.
_LIST_LUA = """
local out = {}
local t = redis.call('time')
out[1] = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
for i = 1, #KEYS, 2 do
    local owner = redis.call('get', KEYS[i])
    if owner then
        table.insert(out, KEYS[i])
        table.insert(out, owner)
        table.insert(out, redis.call('pttl', KEYS[i]))
        table.insert(out, redis.call('get', KEYS[i + 1]) or '')
    end
end
return out
"""

# KEYS[1] the lock, KEYS[2] its call id, KEYS[3] its acquire time; ARGV[1] the owner
# it must still have ('' for any). Returns the owner removed, or false.
_FORCE_LUA = """
local owner = redis.call('get', KEYS[1])
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then
    return false
end
redis.call('del', KEYS[1], KEYS[2], KEYS[3])
return owner
"""

_HOLDER_LUA = """
local owner = redis.call('get', KEYS[1])
if not owner then
    return false
end
return {owner, redis.call('pttl', KEYS[1])}
"""


def _ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisLockBackend:
    #: The ``backend`` label of ``kubetasks_lock_acquisitions``.
    kind = "redis"
    """Locks as Redis keys ``kubetasks:lock:<name>`` holding the owner token, expiring by ``PX``.

    The client retries a failed command once at once (a pooled connection may
    be stale after a Redis restart) and otherwise reports the error: renewal
    timing is the caller's business, not a hidden backoff's.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_connections: int | None = None,
        prefix: str = REDIS_PREFIX,
    ) -> None:
        self.url = redis_url
        self.prefix = prefix
        self._where = f"Redis at {redacted(redis_url)}"
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1),
            max_connections=max_connections,
        )
        self._acquire = self._client.register_script(_ACQUIRE_LUA)
        self._renew = self._client.register_script(_RENEW_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)
        self._holder = self._client.register_script(_HOLDER_LUA)
        self._list = self._client.register_script(_LIST_LUA)
        self._force = self._client.register_script(_FORCE_LUA)

    def key(self, name: str) -> str:
        return self.prefix + name

    def at_key(self, name: str) -> str:
        """Where the backend time the lock was taken is kept (expiring with it)."""
        return f"{self.prefix.rstrip(':')}#at:{name}"

    def call_key(self, name: str) -> str:
        """Where the id of the acquire call that took ``name`` is kept (outside the lock keys)."""
        return f"{self.prefix.rstrip(':')}#call:{name}"

    def _error(self, verb: str, name: str | Sequence[str], exc: BaseException) -> LockBackendError:
        return LockBackendError(
            f"could not {verb} {_which(name)}: {self._where} failed: {exc.__class__.__name__}: {exc}"
        )

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        validate_name(name)
        ms = _ms(validate_ttl(ttl_s))
        call_id = secrets.token_hex(8)
        try:
            n = await self._acquire(
                keys=[self.key(name), self.call_key(name), self.at_key(name)], args=[owner, ms, call_id]
            )
        except (RedisError, OSError) as exc:
            raise self._error("acquire", name, exc) from exc
        return int(n) == 1

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        validate_name(name)
        ms = _ms(validate_ttl(ttl_s))
        try:
            n = await self._renew(keys=[self.key(name), self.at_key(name)], args=[owner, ms])
        except (RedisError, OSError) as exc:
            raise self._error("renew", name, exc) from exc
        return int(n) == 1

    async def release(self, name: str, owner: str) -> bool:
        validate_name(name)
        try:
            n = await self._release(keys=[self.key(name)], args=[owner])
        except (RedisError, OSError) as exc:
            raise self._error("release", name, exc) from exc
        return int(n) == 1

    async def holder(self, name: str) -> Holder | None:
        validate_name(name)
        try:
            res: Any = await self._holder(keys=[self.key(name)])
        except (RedisError, OSError) as exc:
            raise self._error("read the holder of", name, exc) from exc
        if not res:
            return None
        return _redis_holder(res[0], int(res[1]))

    async def holders(self, names: Sequence[str]) -> dict[str, Holder]:
        for name in names:
            validate_name(name)
        if not names:
            return {}
        try:
            # MULTI/EXEC: each owner and its ttl are read together, as _HOLDER_LUA does.
            async with self._client.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.get(self.key(name))
                    pipe.pttl(self.key(name))
                res: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._error("read the holder of", names, exc) from exc
        out = {}
        for i, name in enumerate(names):
            owner, pttl = res[2 * i], res[2 * i + 1]
            if owner is not None and (h := _redis_holder(owner, int(pttl))) is not None:
                out[name] = h
        return out

    async def list(self, prefix: str = "", limit: int = LIST_MAX) -> list[LockInfo]:
        names: list[str] = []
        try:
            # The lock keys only: call ids and acquire times live under "<prefix>#...".
            async for key in self._client.scan_iter(match=_glob_escape(self.key(prefix)) + "*", count=1000):
                names.append(_text(key)[len(self.prefix) :])
                if len(names) >= limit:
                    break
            infos: list[LockInfo] = []
            names.sort()
            for i in range(0, len(names), 500):
                chunk = names[i : i + 500]
                res: Any = await self._list(keys=[k for n in chunk for k in (self.key(n), self.at_key(n))])
                now = float(_text(res[0]))
                for j in range(1, len(res), 4):
                    name, owner, pttl, at = (
                        _text(res[j])[len(self.prefix) :],
                        _text(res[j + 1]),
                        int(res[j + 2]),
                        res[j + 3],
                    )
                    if pttl == -2:
                        continue  # expired between the scan and the read
                    left = math.inf if pttl == -1 else pttl / 1000.0
                    infos.append(
                        LockInfo(
                            name=name, owner=owner,
                            acquired_at=_utc(float(_text(at))) if _text(at) else None,
                            expires_at=None if math.isinf(left) else _utc(now + left),
                            expires_in_s=left, backend="redis",
                        )
                    )  # fmt: skip
        except (RedisError, OSError) as exc:
            raise self._error("list", prefix or "*", exc) from exc
        return infos

    async def force_release(self, name: str, owner: str | None = None) -> str | None:
        validate_name(name)
        try:
            res: Any = await self._force(
                keys=[self.key(name), self.call_key(name), self.at_key(name)], args=[owner or ""]
            )
        except (RedisError, OSError) as exc:
            raise self._error("force-release", name, exc) from exc
        return _text(res) if res else None

    async def close(self) -> None:
        await self._client.aclose()


def _redis_holder(owner: object, pttl: int) -> Holder | None:
    if pttl == -1:  # no expiry: never written by us, but report it honestly
        return _text(owner), math.inf
    return (_text(owner), pttl / 1000.0) if pttl >= 0 else None


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _utc(epoch: float) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=epoch)


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class PostgresLockBackend:
    """Locks as ``job_locks`` rows; free, expired and renewed are all judged by ``now()``."""

    kind = "postgres"

    def __init__(self, store: Store, *, op_timeout: float = 10.0) -> None:
        self.store = store
        self.op_timeout = op_timeout

    async def _run(self, verb: str, name: str | Sequence[str], call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.op_timeout):
                return await call
        except TimeoutError as exc:
            raise LockBackendError(
                f"could not {verb} {_which(name)}: PostgreSQL did not answer within {self.op_timeout:g}s"
            ) from exc
        except DB_ERRORS as exc:
            raise LockBackendError(
                f"could not {verb} {_which(name)}: PostgreSQL failed: {exc.__class__.__name__}: {exc}"
            ) from exc

    async def acquire(self, name: str, owner: str, ttl_s: float) -> bool:
        validate_name(name)
        ttl = validate_ttl(ttl_s)
        return await self._run("acquire", name, pg_locks.acquire(self.store, name=name, owner=owner, ttl=ttl))

    async def renew(self, name: str, owner: str, ttl_s: float) -> bool:
        validate_name(name)
        ttl = validate_ttl(ttl_s)
        return await self._run("renew", name, pg_locks.renew(self.store, name=name, owner=owner, ttl=ttl))

    async def release(self, name: str, owner: str) -> bool:
        validate_name(name)
        return await self._run("release", name, pg_locks.release(self.store, name=name, owner=owner))

    async def holder(self, name: str) -> Holder | None:
        validate_name(name)
        row = await self._run("read the holder of", name, pg_locks.holder(self.store, name=name))
        return None if row is None else (str(row["owner"]), float(row["expires_in_s"]))

    async def list(self, prefix: str = "", limit: int = LIST_MAX) -> list[LockInfo]:
        rows = await self._run(
            "list", prefix or "*", pg_locks.list_locks(self.store, prefix=prefix, limit=limit)
        )
        return [
            LockInfo(
                name=r["name"], owner=r["owner"], acquired_at=r["acquired_at"], expires_at=r["expires_at"],
                expires_in_s=float(r["expires_in_s"]), backend="postgres",
            )
            for r in rows
        ]  # fmt: skip

    async def force_release(self, name: str, owner: str | None = None) -> str | None:
        validate_name(name)
        return await self._run(
            "force-release", name, pg_locks.force_release(self.store, name=name, owner=owner)
        )

    async def holders(self, names: Sequence[str]) -> dict[str, Holder]:
        for name in names:
            validate_name(name)
        if not names:
            return {}
        rows = await self._run("read the holder of", names, pg_locks.holders(self.store, names=names))
        return {str(r["name"]): (str(r["owner"]), float(r["expires_in_s"])) for r in rows}

    async def close(self) -> None:
        """Nothing to close: the store belongs to the app."""


def make_backend(store: Store, redis_url: str | None) -> LockBackend:
    """Redis when a URL is configured, else the ``job_locks`` table of ``store``."""
    if redis_url:
        return RedisLockBackend(redis_url)
    return PostgresLockBackend(store)


# -- the lock a holder uses ----------------------------------------------------


class JobLock:
    """One named lock held by one owner; ``async with`` takes, keeps and releases it.

    ``acquire()`` / ``release()`` may also be called directly. While held, a
    background task renews the lock (``renew=True``); ``lost`` is set (and
    ``on_lost(reason)`` called once) when the lock may no longer be ours.
    """

    def __init__(
        self,
        backend: LockBackend,
        name: str,
        *,
        ttl: float = 30.0,
        wait: float | None = 0.0,
        renew: bool = True,
        owner: str | None = None,
        on_lost: OnLost | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        self.backend = backend
        self.name = validate_name(name)
        self.ttl = validate_ttl(ttl)
        self.wait = validate_wait(wait)
        self.renew = renew
        self.owner = new_owner() if owner is None else validate_owner(owner)
        self.on_lost = on_lost
        self.poll_interval = validation.seconds("poll_interval", poll_interval, 0.001, 60.0)
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self.renewals = 0
        self.renew_failures = 0
        self._held = False
        self._valid_until = 0.0  # loop.time() until which the lock is surely still ours
        self._keeper: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        """True between a successful acquire and release, unless the lock was or may be lost."""
        return self.time_left() > 0

    def time_left(self) -> float:
        """Seconds the lock is surely still ours (local monotonic bound); 0 when not held."""
        if not self._held or self.lost.is_set():
            return 0.0
        return max(0.0, self._valid_until - asyncio.get_running_loop().time())

    def _granted_until(self, sent: float) -> float:
        return sent + self.ttl - (self.ttl * DRIFT_FACTOR + DRIFT_FLOOR_S)

    def raise_if_lost(self) -> None:
        if self.lost.is_set():
            raise LockLost(f"job lock {self.name!r} was lost: {self.lost_reason}")

    async def acquire(self) -> JobLock:
        """Take the lock, polling until ``wait`` runs out (None: forever), then ``LockNotAcquired``."""
        if self._held:
            raise RuntimeError(f"job lock {self.name!r} is already held by this JobLock")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = None if self.wait is None else started + self.wait
        delay = min(0.005, self.poll_interval)
        while True:
            sent = loop.time()
            if await self._try_acquire():
                if loop.time() < self._granted_until(sent):
                    break
                # The reply came after the whole ttl: whatever was granted has run out.
                with contextlib.suppress(LockBackendError):
                    await self.backend.release(self.name, self.owner)
            now = loop.time()
            if deadline is not None and now >= deadline:
                try:
                    holder = await self.backend.holder(self.name)
                except LockBackendError:
                    holder = None
                raise LockNotAcquired(self.name, holder, now - started)
            pause = delay * random.uniform(0.5, 1.5)
            if deadline is not None:
                pause = min(pause, deadline - now)
            await asyncio.sleep(max(0.0, pause))
            delay = min(delay * 2, self.poll_interval)
        self._valid_until = self._granted_until(sent)
        self._held = True
        self.lost.clear()
        self.lost_reason = None
        self._keeper = asyncio.create_task(self._keep(sent), name=f"kubetasks-lock:{self.name}")
        return self

    async def _try_acquire(self) -> bool:
        """One acquisition attempt, counted in ``kubetasks_lock_acquisitions``."""
        kind = getattr(self.backend, "kind", "other")
        try:
            got = await self.backend.acquire(self.name, self.owner, self.ttl)
        except LockBackendError:
            metrics.LOCK_ACQUISITIONS.labels(kind, "error").inc()
            raise
        metrics.LOCK_ACQUISITIONS.labels(kind, "acquired" if got else "held").inc()
        return got

    async def release(self) -> bool:
        """Stop renewing and release (owner-checked); True if the lock was still ours."""
        if not self._held:
            return False
        self._held = False
        await self._stop_keeper()
        return await self.backend.release(self.name, self.owner)

    async def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None and not keeper.done():
            keeper.cancel()
            try:
                await keeper
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # our own caller is being cancelled, not just the keeper

    def _lose(self, why: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = why
        self.lost.set()
        log.error("job lock %r lost by %s: %s", self.name, self.owner, why)
        if self.on_lost is not None:
            try:
                self.on_lost(why)
            except Exception:
                log.exception("on_lost callback of job lock %r failed", self.name)

    async def _keep(self, last_sent: float) -> None:
        """Renew every ttl/3 from the last successful send; declare the lock lost when it may be."""
        loop = asyncio.get_running_loop()
        interval = self.ttl / 3
        next_at = last_sent + interval
        last_error: BaseException | str | None = None
        while True:
            if not self.renew:
                await asyncio.sleep(max(0.0, self._valid_until - loop.time()))
                self._lose(f"its ttl of {self.ttl:g}s ran out (renewal is off)")
                return
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            left = self._valid_until - loop.time()
            if left <= 0:
                self._lose(f"could not renew it before its ttl ran out (last error: {last_error})")
                return
            sent = loop.time()
            try:
                async with asyncio.timeout(left):
                    ok = await self.backend.renew(self.name, self.owner, self.ttl)
            except Exception as exc:  # TimeoutError, LockBackendError, or a bug: the lock is in doubt
                self.renew_failures += 1
                last_error = exc if not isinstance(exc, TimeoutError) else "no answer in time"
                if loop.time() >= self._valid_until:
                    self._lose(f"could not renew it before its ttl ran out (last error: {last_error})")
                    return
                log.warning(
                    "renewing job lock %r failed (%s); %.2fs left",
                    self.name, exc, self._valid_until - loop.time(),
                )  # fmt: skip
                next_at = min(loop.time() + max(0.02, interval / 4), self._valid_until)
                continue
            if not ok:
                self._lose("the backend no longer holds it for this owner (it expired or was taken)")
                return
            self.renewals += 1
            self._valid_until = self._granted_until(sent)
            next_at = sent + interval

    async def __aenter__(self) -> JobLock:
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The backend's expiry is the safety net: a failed release is logged, not
        # raised over the body's own outcome.
        try:
            await self.release()
        except LockBackendError as err:
            log.warning("job lock %r not released (it expires by itself): %s", self.name, err)


def job_lock(
    backend: LockBackend,
    name: str,
    *,
    ttl: float = 30.0,
    wait: float | None = 0.0,
    renew: bool = True,
    owner: str | None = None,
    on_lost: OnLost | None = None,
) -> JobLock:
    """``async with job_lock(backend, name, ttl=..., wait=...) as lock:``; see ``JobLock``."""
    return JobLock(backend, name, ttl=ttl, wait=wait, renew=renew, owner=owner, on_lost=on_lost)
