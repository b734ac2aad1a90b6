"""Cron maths and schedule definitions: pure, no clock, no database (see ``kubetasks.cron``).

croniter wrapped so every instant goes in and comes out as an aware UTC
datetime, and the instant "now" is always an argument. Expressions are
evaluated in the schedule's time zone, so daylight saving follows croniter:
a time skipped by the spring change fires at the first instant after the gap
(02:30 Berlin -> 03:00 CEST, once); a time repeated by the autumn change fires
at both of its instants (a daily 02:30 Berlin job runs at 00:30 and 01:30 UTC
on that day). A schedule is valid when its next time can be computed.
``ScheduleSpec`` is one row of ``schedules`` as a CronJobLock or
``@app.periodic`` declares it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from kubetasks import locks, validation
from kubetasks.context import TaskContext
from kubetasks.errors import ValidationError

POLICIES = ("Forbid", "Allow")
SOURCES = ("code", "crd", "api")
SOURCE_NAMES = {
    "code": "@app.periodic in the app's code",
    "crd": "a CronJobLock",
    "api": "App.create_schedule / kubetasks schedules create",
}
SCHEDULE_NAME_MAX = 253
EXPR_MAX = 255
TZ_MAX = 64
LOCK_TTL_MIN, LOCK_TTL_MAX = 1, 86400
DEADLINE_MAX = 10 * 365 * 86400
#: Missed ticks recorded one row each per pass, at most; more are counted, not listed.
MISSED_ROWS_MAX = 1000
#: Older missed ticks are counted up to this many per pass (a lower bound beyond).
MISSED_COUNT_MAX = 10_000
#: A fixed instant to validate expressions from, so validation is pure.
_VALIDATE_FROM = datetime(2000, 1, 1, tzinfo=UTC)
_EPS = timedelta(microseconds=1)
_TICK_TAG = re.compile(r"^tick:(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?)Z$")


# -- pure maths --------------------------------------------------------------


def zone(tz: object) -> ZoneInfo:
    """The ZoneInfo of an IANA name; ``ValidationError`` on ``timezone`` otherwise."""
    if not isinstance(tz, str) or not tz:
        raise ValidationError("timezone", f"must be an IANA time zone name such as Europe/Berlin, got {tz!r}")
    if len(tz) > TZ_MAX:
        raise ValidationError("timezone", f"must be at most {TZ_MAX} characters, got {len(tz)}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValidationError("timezone", f"unknown time zone {tz!r}") from None


def _aware(field_name: str, t: datetime) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{field_name} must be timezone-aware, got {t!r}")
    return t.astimezone(UTC)


def _iter(expr: str, tz: ZoneInfo, start: datetime) -> croniter:
    return croniter(expr, start.astimezone(tz))


def validate(expr: object, tz: object = "UTC") -> tuple[str, str]:
    """Check a cron expression and time zone by computing a next time; returns them.

    Raises ``ValidationError`` naming ``schedule`` (unparsable, out of range,
    never fires) or ``timezone`` (unknown).
    """
    zi = zone(tz)
    if not isinstance(expr, str) or not expr.strip():
        raise ValidationError("schedule", f"must be a cron expression such as '*/5 * * * *', got {expr!r}")
    if len(expr) > EXPR_MAX:
        raise ValidationError("schedule", f"must be at most {EXPR_MAX} characters, got {len(expr)}")
    try:
        it = _iter(expr, zi, _VALIDATE_FROM)
    except (CroniterError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValidationError("schedule", f"{expr!r} is not a valid cron expression: {exc}") from None
    try:
        it.get_next(datetime)
    except (CroniterError, ValueError, OverflowError):
        raise ValidationError("schedule", f"{expr!r} never fires") from None
    assert isinstance(tz, str)
    return expr, tz


def next_tick(expr: str, tz: str, after: datetime) -> datetime:
    """The first tick strictly after ``after``, in UTC."""
    t = _iter(expr, zone(tz), _aware("after", after)).get_next(datetime)
    return t.astimezone(UTC)


def prev_tick(expr: str, tz: str, at: datetime) -> datetime:
    """The last tick at or before ``at``, in UTC."""
    t = _iter(expr, zone(tz), _aware("at", at) + _EPS).get_prev(datetime)
    return t.astimezone(UTC)


def ticks_between(
    expr: str, tz: str, after: datetime, until: datetime, limit: int = 10_000
) -> list[datetime]:
    """Ticks in ``(after, until]``, oldest first, at most ``limit`` (the oldest ones)."""
    zi = zone(tz)
    after, until = _aware("after", after), _aware("until", until)
    it = _iter(expr, zi, after)
    out: list[datetime] = []
    while len(out) < limit:
        t = it.get_next(datetime).astimezone(UTC)
        if t > until:
            break
        out.append(t)
    return out


@dataclass(frozen=True)
class Due:
    """What a pass owes one schedule: the tick to run (if any) and the ticks missed.

    ``missed`` is oldest first and holds at most ``limit`` ticks (the newest
    ones); ``missed_more`` counts the older missed ticks not listed.
    """

    run: datetime | None
    missed: tuple[datetime, ...] = ()
    missed_more: int = 0

    @property
    def newest(self) -> datetime | None:
        """The newest tick this pass handles (run or missed): the schedule's new cursor."""
        if self.run is not None:
            return self.run
        return self.missed[-1] if self.missed else None

    @property
    def missed_count(self) -> int:
        return len(self.missed) + self.missed_more

    def __bool__(self) -> bool:
        return self.run is not None or bool(self.missed)


def due_ticks(
    expr: str,
    tz: str,
    last: datetime,
    now: datetime,
    starting_deadline: float | None,
    *,
    limit: int = MISSED_ROWS_MAX,
    count_limit: int = MISSED_COUNT_MAX,
) -> Due:
    """The ticks in ``(last, now]``: the newest runs unless older than the deadline; the rest are missed.

    ``starting_deadline`` is in seconds (None: no deadline, the newest due tick
    always runs). A tick ``t`` is too late when ``now - t > starting_deadline``.
    At most one tick runs, however many are due. Past the ``limit`` newest
    missed ticks, the older ones are counted up to ``count_limit`` (so that a
    long outage of a fast schedule costs milliseconds, not seconds of CPU):
    ``missed_more`` is exact below that and a lower bound at it.
    """
    zi = zone(tz)
    last, now = _aware("last", last), _aware("now", now)
    if now <= last:
        return Due(None)
    # Walk back from now: the newest ticks are the ones that matter, and an
    # outage of any length costs at most limit + 2 steps.
    it = _iter(expr, zi, now + _EPS)
    newest_first: list[datetime] = []
    while len(newest_first) < limit + 2:
        t = it.get_prev(datetime).astimezone(UTC)
        if t <= last:
            break
        newest_first.append(t)
    if not newest_first:
        return Due(None)
    more = 0
    if len(newest_first) == limit + 2:
        # Too many to list: count the rest going forward from the cursor.
        oldest_listed = newest_first[-1]
        more = len(ticks_between(expr, tz, last, oldest_listed - _EPS, limit=count_limit))
    head = newest_first[0]
    runs = starting_deadline is None or (now - head).total_seconds() <= starting_deadline
    run = head if runs else None
    missed = newest_first[1:] if runs else newest_first
    if len(missed) > limit:
        more += len(missed) - limit
        missed = missed[:limit]
    return Due(run, tuple(reversed(missed)), more)


def tick_tag(tick_at: datetime) -> str:
    t = _aware("tick_at", tick_at)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if t.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return "tick:" + t.strftime(fmt)


def tick_of(ctx: TaskContext | Sequence[str]) -> datetime | None:
    """The tick a cron run was enqueued for (from its ``tick:`` tag), or None."""
    tags = ctx.tags if isinstance(ctx, TaskContext) else ctx
    for tag in tags:
        m = _TICK_TAG.match(tag)
        if m:
            return datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC)
    return None


def lock_name(schedule: str) -> str:
    """The job lock a Forbid run holds: ``cron:<name>`` (hashed when too long for a lock name)."""
    full = f"cron:{schedule}"
    if len(full) <= locks.NAME_MAX:
        return full
    digest = hashlib.sha256(schedule.encode()).hexdigest()[:16]
    return f"{full[: locks.NAME_MAX - 17]}~{digest}"


def run_tags(schedule: str, tick_at: datetime) -> list[str]:
    tags = [tick_tag(tick_at)]
    # A long or slash-bearing name gets no name tag: the tick row still links the task.
    with contextlib.suppress(ValidationError):
        tags.insert(0, validation.name("tags", f"cron:{schedule}"))
    return tags


# -- definitions ---------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    """One row of ``schedules`` as written: what a CronJobLock or ``@app.periodic`` declares."""

    name: str
    cron: str
    handler: str
    timezone: str = "UTC"
    queue: str = "default"
    payload: Mapping[str, Any] = field(default_factory=dict)
    concurrency_policy: str = "Forbid"
    lock_ttl: int = validation.DEFAULT_LOCK_TTL_S
    starting_deadline: int | None = None
    suspend: bool = False
    source: str = "crd"
    cr_uid: str | None = None

    def validated(self) -> ScheduleSpec:
        validate_name(self.name)
        validate(self.cron, self.timezone)
        validation.name("handler", self.handler)
        validation.name("queue", self.queue)
        validate_policy(self.concurrency_policy)
        validate_lock_ttl(self.lock_ttl)
        validate_deadline(self.starting_deadline)
        if not isinstance(self.suspend, bool):
            raise ValidationError("suspend", f"must be true or false, got {self.suspend!r}")
        if self.source not in SOURCES:
            raise ValidationError("source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not isinstance(self.payload, Mapping):
            raise ValidationError("payload", f"must be a JSON object, got {type(self.payload).__name__}")
        validation.to_json("payload", dict(self.payload), validation.DEFAULT_MAX_PAYLOAD_BYTES)
        return self


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValidationError("name", f"must be a non-empty string, got {name!r}")
    if len(name) > SCHEDULE_NAME_MAX:
        raise ValidationError("name", f"must be at most {SCHEDULE_NAME_MAX} characters, got {len(name)}")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise ValidationError("name", f"{name!r} must not contain spaces or control characters")
    return name


def validate_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise ValidationError("concurrency_policy", f"must be Forbid or Allow, got {policy!r}")
    assert isinstance(policy, str)
    return policy


def validate_lock_ttl(ttl: object) -> int:
    return validation.integer("lock_ttl", ttl, LOCK_TTL_MIN, LOCK_TTL_MAX)


def validate_deadline(deadline: object) -> int | None:
    if deadline is None:
        return None
    return validation.integer("starting_deadline", deadline, 0, DEADLINE_MAX)
