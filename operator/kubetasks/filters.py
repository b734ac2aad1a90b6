"""Which tasks an operation means: ``TaskFilter``, and the opaque cursors of paged listings.

One filter serves the listing (``listing``), the bulk actions (``bulk``), the
CLI and the HTTP API, so "the tasks of queue X that failed yesterday" means the
same rows everywhere. Criteria combine with AND; a criterion given several
values (statuses, queues, handlers) matches any of them; tags match when a task
carries all of them. ``parent`` (its direct children) and ``root`` (a workflow:
the root and every descendant) are resolved to a set of task ids before the
statement runs, and refused, naming the field, beyond ``MAX_ID_SET`` tasks.

Everything is validated here, before a statement is sent: an unknown
criterion, a status that does not exist or a naive datetime raises
``ValidationError`` naming the field. ``TaskFilter.from_params`` reads the
same criteria from strings (URL query parameters, CLI options).

Cursors are opaque strings (``encode_cursor``/``decode_cursor``): callers pass
back what they were given, and anything else is refused naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from kubetasks import validation
from kubetasks.errors import ValidationError
from kubetasks.statuses import STATUSES
from kubetasks.store import Store, operations

#: The most tasks a ``parent`` or ``root`` criterion may stand for.
MAX_ID_SET = 100_000
#: How many values one criterion may list.
MAX_VALUES = 100
POD_MAX = 253


@dataclass(frozen=True)
class TaskFilter:
    """Criteria on tasks, all optional, combined with AND (None: any).

    ``status``, ``queue``, ``handler``: any of the values; ``tag``: all of
    them; ``created_after`` (inclusive) and ``created_before`` (exclusive):
    timezone-aware datetimes; ``parent``: the direct children of that task;
    ``root``: that task and all its descendants; ``worker``: the worker id
    (a UUID) that last ran it; ``pod``: the pod that last ran it;
    ``run_after`` (inclusive) and ``run_before`` (exclusive): when it is due
    (``run_at``: a delayed task's start, a retry's), timezone-aware datetimes --
    ``status="pending", run_after=now`` are the delayed tasks.
    Build one with ``TaskFilter.of(...)`` (validates) or ``from_params``.
    """

    status: tuple[str, ...] | None = None
    queue: tuple[str, ...] | None = None
    handler: tuple[str, ...] | None = None
    tag: tuple[str, ...] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    parent: int | None = None
    root: int | None = None
    worker: str | None = None
    pod: str | None = None
    run_after: datetime | None = None
    run_before: datetime | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, **criteria: Any) -> TaskFilter:
        """A validated filter: strings or sequences of strings for the list criteria."""
        known = cls.names()
        for key in criteria:
            if key not in known:
                raise ValidationError(key, f"unknown filter; the filters are: {', '.join(known)}")
        status = _strings("status", criteria.get("status"))
        for st in status or ():
            if st not in STATUSES:
                raise ValidationError("status", f"unknown status {st!r}; one of {', '.join(STATUSES)}")
        queue = _strings("queue", criteria.get("queue"))
        for q in queue or ():
            validation.name("queue", q)
        handler = _strings("handler", criteria.get("handler"))
        for h in handler or ():
            validation.name("handler", h)
        tag = _strings("tag", criteria.get("tag"))
        for t in tag or ():
            validation.name("tag", t)
        after = _aware("created_after", criteria.get("created_after"))
        before = _aware("created_before", criteria.get("created_before"))
        if after is not None and before is not None and after >= before:
            raise ValidationError("created_after", "must be earlier than created_before")
        run_after = _aware("run_after", criteria.get("run_after"))
        run_before = _aware("run_before", criteria.get("run_before"))
        if run_after is not None and run_before is not None and run_after >= run_before:
            raise ValidationError("run_after", "must be earlier than run_before")
        parent = _task_id("parent", criteria.get("parent"))
        root = _task_id("root", criteria.get("root"))
        worker = criteria.get("worker")
        if worker is not None:
            try:
                worker = str(uuid.UUID(str(worker)))
            except ValueError:
                raise ValidationError("worker", f"must be a worker id (a UUID), got {worker!r}") from None
        pod = criteria.get("pod")
        if pod is not None and (not isinstance(pod, str) or not 1 <= len(pod) <= POD_MAX):
            raise ValidationError("pod", f"must be a pod name of 1 to {POD_MAX} characters, got {pod!r}")
        return cls(
            status=status, queue=queue, handler=handler, tag=tag, created_after=after, created_before=before,
            parent=parent, root=root, worker=worker, pod=pod, run_after=run_after, run_before=run_before,
        )  # fmt: skip

    @classmethod
    def from_params(cls, params: Mapping[str, str | Sequence[str]]) -> TaskFilter:
        """From strings: each list criterion repeated or comma-separated, datetimes in ISO 8601
        with an offset, ids as decimal integers."""
        out: dict[str, Any] = {}
        for key, raw in params.items():
            values = [raw] if isinstance(raw, str) else list(raw)
            if key not in cls.names():
                raise ValidationError(key, f"unknown filter; the filters are: {', '.join(cls.names())}")
            if key in ("status", "queue", "handler", "tag"):
                out[key] = [v.strip() for item in values for v in item.split(",") if v.strip()]
                continue
            if len(values) != 1:
                raise ValidationError(key, "give it once")
            text = values[0].strip()
            if key in ("created_after", "created_before", "run_after", "run_before"):
                try:
                    out[key] = datetime.fromisoformat(text)
                except ValueError:
                    raise ValidationError(
                        key, f"must be an ISO 8601 date and time with an offset, got {text!r}"
                    ) from None
            elif key in ("parent", "root"):
                if not text.isdigit():
                    raise ValidationError(key, f"must be a task id (a positive integer), got {text!r}")
                out[key] = int(text)
            else:
                out[key] = text
        return cls.of(**out)

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.names())

    def with_status(self, statuses: Sequence[str]) -> TaskFilter:
        return TaskFilter(**{**self.as_kwargs(), "status": tuple(statuses)})

    def as_kwargs(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.names()}

    def to_dict(self) -> dict[str, Any]:
        """The criteria that are set, JSON-ready (datetimes in ISO 8601)."""
        out: dict[str, Any] = {}
        for key, value in self.as_kwargs().items():
            if value is None:
                continue
            out[key] = (
                value.isoformat()
                if isinstance(value, datetime)
                else list(value)
                if isinstance(value, tuple)
                else value
            )
        return out

    async def task_ids(self, store: Store) -> list[int] | None:
        """The id set ``parent`` and ``root`` stand for (both given: the tasks in both);
        None when neither is given."""
        sets: list[set[int]] = []
        for key, value in (("parent", self.parent), ("root", self.root)):
            if value is None:
                continue
            if key == "parent":
                rows = await operations.task_children_ids(store, parent_id=value, limit=MAX_ID_SET + 1)
            else:
                rows = await operations.task_tree_ids(store, root_id=value, limit=MAX_ID_SET + 1)
            if len(rows) > MAX_ID_SET:
                raise ValidationError(
                    key, f"stands for more than {MAX_ID_SET} tasks; narrow it with other criteria"
                )
            sets.append({int(r["id"]) for r in rows})
        if not sets:
            return None
        return sorted(set.intersection(*sets))

    def sql_args(self, ids: list[int] | None) -> operations.TaskFilterParams:
        """The filter as the SQL takes it (``ids``: the set ``task_ids`` resolved)."""
        return operations.TaskFilterParams(
            statuses=_list(self.status), queues=_list(self.queue), handlers=_list(self.handler),
            tags=_list(self.tag), created_after=self.created_after, created_before=self.created_before,
            ids=ids, worker=None if self.worker is None else uuid.UUID(self.worker), pod=self.pod,
            run_after=self.run_after, run_before=self.run_before,
        )  # fmt: skip


def _list(v: tuple[str, ...] | None) -> list[str] | None:
    return None if v is None else list(v)


def _strings(key: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    items: Iterable[object] = [value] if isinstance(value, str) else value  # type: ignore[assignment]
    try:
        out = tuple(items)
    except TypeError:
        raise ValidationError(key, f"must be a string or a list of strings, got {value!r}") from None
    strings: list[str] = []
    for v in out:
        if not isinstance(v, str):
            raise ValidationError(key, f"must be a string or a list of strings, got {v!r}")
        strings.append(v)
    if not strings:
        raise ValidationError(key, "lists no value (omit it to match any)")
    if len(strings) > MAX_VALUES:
        raise ValidationError(key, f"at most {MAX_VALUES} values, got {len(strings)}")
    return tuple(dict.fromkeys(strings))


def _aware(key: str, value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(key, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ValidationError(key, "must be timezone-aware (naive datetimes are ambiguous)")
    return value


def _task_id(key: str, value: object) -> int | None:
    if value is None:
        return None
    return validation.integer(key, value, 1, 2**63 - 1)


# -- cursors ---------------------------------------------------------------------------------


def encode_cursor(kind: str, *parts: int) -> str:
    """An opaque cursor for a listing of ``kind``."""
    text = kind + ":" + ":".join(str(p) for p in parts)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str, n: int) -> tuple[int, ...]:
    """The ``n`` integers of a cursor of ``kind``; anything else raises ``ValidationError("cursor")``."""
    bad = ValidationError("cursor", "is not a cursor this listing returned (pass back next_cursor as given)")
    if not isinstance(cursor, str) or not 1 <= len(cursor) <= 200:
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    head, _, rest = text.partition(":")
    parts = rest.split(":")
    if head != kind or len(parts) != n or not all(p.isdigit() and len(p) <= 19 for p in parts):
        raise bad
    values = tuple(int(p) for p in parts)
    if any(v > 2**63 - 1 for v in values):
        raise bad
    return values
