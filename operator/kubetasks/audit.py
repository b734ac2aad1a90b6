"""Events and attempts across tasks, filtered and paged (issue 17 item 8).

``App.get_events(task_id)`` tells one task's whole story; this module answers
the questions that span tasks: what happened on pod X in the last hour, which
attempts of this workflow failed, every ``fenced_out`` write of a worker.

* ``events``: the recorded transitions (``task_events``: retried, failed,
  fenced_out, released, recovered, cancelled, requeued, progress, paused,
  pause_requested, pause_moot, resumed, suspended, woken...), newest first, by event id. Claims and
  successes are not events (the hot path writes them once, in the task row);
  ``attempts`` lists them.
* ``attempts``: every ended attempt (``task_attempts_all``: the failures,
  retries, timeouts, losses, releases, cancellations and pauses recorded per attempt,
  plus each success read from its task row), newest task first.

Filters: ``task`` (one task) or ``root`` (a workflow's tree), ``worker``,
``pod``, ``kind`` / ``outcome``, ``since`` (inclusive) and ``until``
(exclusive). As in ``listing``, a call without ``task``/``root`` walks at most
``scan`` ids below its cursor and may return a short page with a
``next_cursor`` that continues further back; with them it reads that task's
(or tree's) own rows through their index.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetasks import validation
from kubetasks.errors import ValidationError
from kubetasks.filters import MAX_ID_SET, MAX_VALUES, TaskFilter, decode_cursor, encode_cursor
from kubetasks.store import Store, operations, tasks

EVENT_KINDS = (
    "created", "claimed", "progress", "retried", "fenced_out", "recovered", "released", "paused",
    "resumed", "suspended", "woken", "cancelled", "requeued", "succeeded", "failed", "checkpoint",
    "pause_requested", "pause_moot",
)  # fmt: skip
OUTCOMES = (
    "succeeded", "failed", "retried", "timeout", "worker_lost", "released", "cancelled", "suspended",
    "paused",
)  # fmt: skip
DEFAULT_SCAN = 20_000
MAX_SCAN = 200_000
MAX_LIMIT = 500


@dataclass(frozen=True)
class Page:
    """Up to ``limit`` rows, newest first; ``next_cursor`` None: nothing older is left."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def _choices(key: str, value: str | Sequence[str] | None, allowed: Sequence[str]) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items or len(items) > MAX_VALUES:
        raise ValidationError(key, f"give 1 to {MAX_VALUES} values")
    for v in items:
        if v not in allowed:
            raise ValidationError(key, f"unknown {key} {v!r}; one of {', '.join(allowed)}")
    return items


def _common(
    worker: str | None, pod: str | None, since: datetime | None, until: datetime | None
) -> tuple[uuid.UUID | None, str | None, datetime | None, datetime | None]:
    f = TaskFilter.of(worker=worker, pod=pod)  # the same rules as the task filter
    for key, t in (("since", since), ("until", until)):
        if t is not None and (not isinstance(t, datetime) or t.tzinfo is None):
            raise ValidationError(key, "must be a timezone-aware datetime")
    if since is not None and until is not None and since >= until:
        raise ValidationError("since", "must be earlier than until")
    return (None if f.worker is None else uuid.UUID(f.worker)), f.pod, since, until


async def _scope(store: Store, task: int | None, root: int | None) -> list[int] | None:
    if task is None and root is None:
        return None
    if task is not None and root is not None:
        raise ValidationError("task", "give task or root, not both")
    if task is not None:
        return [validation.integer("task", task, 1, 2**63 - 1)]
    ids = await TaskFilter.of(root=root).task_ids(store)
    return ids or []


def _check_page(limit: int, scan: int) -> None:
    validation.integer("limit", limit, 1, MAX_LIMIT)
    validation.integer("scan", scan, 1, MAX_SCAN)


def _event(r: Any) -> dict[str, Any]:
    d = dict(r)
    d["worker_id"] = None if d["worker_id"] is None else str(d["worker_id"])
    return d


async def events(
    store: Store,
    *,
    task: int | None = None,
    root: int | None = None,
    worker: str | None = None,
    pod: str | None = None,
    kind: str | Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 100,
    scan: int = DEFAULT_SCAN,
) -> Page:
    """Recorded events, newest first: dicts of id, task_id, at, kind, attempt, worker_id, pod_id, detail."""
    _check_page(limit, scan)
    kinds = _choices("kind", kind, EVENT_KINDS)
    w, p, since, until = _common(worker, pod, since, until)
    below = decode_cursor("events", cursor, 1)[0] if cursor is not None else None
    scope = await _scope(store, task, root)
    if scope is not None:
        if not scope:
            return Page([], None)
        rows = await operations.events_of_tasks(
            store, task_ids=scope, kinds=kinds, worker=w, pod=p, since=since, until=until,
            below=below if below is not None else 2**63 - 1, limit=limit,
        )  # fmt: skip
        items = [_event(r) for r in rows]
        nxt = encode_cursor("events", items[-1]["id"]) if len(items) == limit else None
        return Page(items, nxt)
    if below is None:
        below = await operations.events_max_id(store) + 1
    floor = max(below - scan, 1)
    rows = await operations.events_page(
        store, kinds=kinds, worker=w, pod=p, since=since, until=until, below=below, floor=floor, limit=limit
    )
    items = [_event(r) for r in rows]
    if len(items) == limit:
        return Page(items, encode_cursor("events", items[-1]["id"]))
    return Page(items, encode_cursor("events", floor) if floor > 1 else None)


async def attempts(
    store: Store,
    *,
    task: int | None = None,
    root: int | None = None,
    worker: str | None = None,
    pod: str | None = None,
    outcome: str | Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 100,
    scan: int = DEFAULT_SCAN,
) -> Page:
    """Ended attempts, newest task first: dicts of task_id, attempt, worker_id, pod_id, started_at,
    finished_at, outcome, error (first 300 characters), duration_s. ``since``/``until`` bound finished_at."""
    _check_page(limit, scan)
    outcomes = _choices("outcome", outcome, OUTCOMES)
    w, p, since, until = _common(worker, pod, since, until)
    at: tuple[int, ...] | None = decode_cursor("attempts", cursor, 2) if cursor is not None else None
    scope = await _scope(store, task, root)
    if scope is not None:
        if not scope:
            return Page([], None)
        if len(scope) > MAX_ID_SET:  # pragma: no cover - task_ids refuses first
            raise ValidationError("root", f"stands for more than {MAX_ID_SET} tasks")
        tid, att = at if at is not None else (2**63 - 1, 0)
        rows = await operations.attempts_of_tasks(
            store, task_ids=scope, outcomes=outcomes, worker=w, pod=p, since=since, until=until,
            below_task=tid, below_attempt=att, limit=limit,
        )  # fmt: skip
        items = [_event(r) for r in rows]
        nxt = (
            encode_cursor("attempts", items[-1]["task_id"], items[-1]["attempt"])
            if len(items) == limit
            else None
        )
        return Page(items, nxt)
    if at is None:
        at = (await operations.tasks_max_id(store) + 1, 0)
    tid, att = at
    floor = max(tid - scan, 1)
    rows = await operations.attempts_page(
        store, outcomes=outcomes, worker=w, pod=p, since=since, until=until, below_task=tid,
        below_attempt=att, floor=floor, limit=limit,
    )  # fmt: skip
    items = [_event(r) for r in rows]
    if len(items) == limit:
        return Page(items, encode_cursor("attempts", items[-1]["task_id"], items[-1]["attempt"]))
    return Page(items, encode_cursor("attempts", floor, 0) if floor > 1 else None)


# -- checkpoints and counts -------------------------------------------------------------------

CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MESSAGE_MAX = 1000
METADATA_MAX_BYTES = 8192
GROUPINGS = ("handler", "queue", "tag", "status")


def checkpoint_detail(code: object, message: object = None, metadata: object = None) -> str:
    """The event detail of a checkpoint, validated: ``code`` lowercase snake_case (at most 63
    characters), ``message`` display text (at most 1000), ``metadata`` a JSON object (8 KiB)."""
    if not isinstance(code, str) or not CODE_RE.match(code):
        raise ValidationError("code", f"must be lowercase snake_case, 1 to 63 characters, got {code!r}")
    if message is not None and (not isinstance(message, str) or len(message) > MESSAGE_MAX):
        raise ValidationError("message", f"must be text of at most {MESSAGE_MAX} characters")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValidationError("metadata", f"must be a JSON object (a dict), got {type(metadata).__name__}")
    detail = validation.to_json(
        "metadata", {"code": code, "message": message, "metadata": metadata or {}}, METADATA_MAX_BYTES
    )
    return detail


async def record_checkpoint(store: Store, task_id: int, attempt: int, worker_id: str, detail: str) -> bool:
    """Write a checkpoint of this run; False when the task was taken away from it."""
    return await tasks.record_checkpoint(
        store, task_id=task_id, attempt=attempt, worker_id=uuid.UUID(worker_id), detail=detail
    )


async def count_by(store: Store, by: str, flt: TaskFilter) -> dict[str, dict[str, int]]:
    """Tasks matching ``flt`` counted per ``by`` (handler, queue, tag, status) and status."""
    if by not in GROUPINGS:
        raise ValidationError("by", f"must be one of {', '.join(GROUPINGS)}, got {by!r}")
    ids = await flt.task_ids(store)
    out: dict[str, dict[str, int]] = {}
    for r in await operations.tasks_count_by(store, flt.sql_args(ids), by=by):
        out.setdefault(r["key"], {})[r["status"]] = int(r["n"])
    return out
