"""The engine's vocabulary: task statuses, the records the API returns, a task request and
the validated values one INSERT writes (``Prepared``), and a handler's definition.

Everything here is data: no connection, no registry, no handler code. The
modules above (``enqueue``, ``registry``, ``context``, ``worker``, ``cron``,
``app``) share these types instead of importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetasks import validation
from kubetasks.errors import ValidationError
from kubetasks.store.tasks import TaskColumns

MISSING: Any = object()


@dataclass(frozen=True)
class Input:
    """One payload key a handler expects: required, a default, a validator.

    A validator returns False or raises ValueError/TypeError to refuse a value.
    """

    required: bool = False
    default: Any = MISSING
    validator: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class TaskDef:
    """A registered handler and its per-type options (None: use the App default)."""

    name: str
    #: The handler (``kubetasks.registry.Handler``): takes a TaskContext or a SyncTaskContext.
    func: Callable[..., Any]
    is_async: bool
    queue: str | None = None
    priority: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    retry_delay: float | None = None
    backoff: float | None = None
    max_retry_delay: float | None = None
    concurrency: int | None = None
    cluster_concurrency: int | None = None
    inputs: Mapping[str, Input] = field(default_factory=dict)

    def apply_inputs(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(payload)
        for key, spec in self.inputs.items():
            if key not in out:
                if spec.default is not MISSING:
                    out[key] = spec.default() if callable(spec.default) else spec.default
                elif spec.required:
                    raise ValidationError(f"payload.{key}", f"is required by handler {self.name!r}")
                continue
            if spec.validator is not None:
                try:
                    ok = spec.validator(out[key])
                except (ValueError, TypeError) as exc:
                    raise ValidationError(f"payload.{key}", str(exc)) from None
                if ok is False:
                    raise ValidationError(
                        f"payload.{key}",
                        f"value {out[key]!r} refused by the validator of {self.name!r}",
                    )
        return out


def as_input(spec: Input | Mapping[str, Any]) -> Input:
    if isinstance(spec, Input):
        return spec
    unknown = set(spec) - {"required", "default", "validator"}
    if unknown:
        raise ValidationError("inputs", f"unknown input option(s): {', '.join(sorted(unknown))}")
    return Input(
        required=bool(spec.get("required", False)),
        default=spec.get("default", MISSING),
        validator=spec.get("validator"),
    )


@dataclass(frozen=True)
class HandlerOptions:
    """A handler's options as its latest registration stored them in the database (``handlers``),
    for enqueuing it from a pod whose app does not have it. None: the App default."""

    queue: str | None = None
    priority: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    retry_delay: float | None = None
    backoff: float | None = None
    max_retry_delay: float | None = None

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> HandlerOptions:
        return cls(
            queue=r["queue"],
            priority=r["priority"],
            timeout=r["timeout_s"],
            max_attempts=r["max_attempts"],
            retry_delay=r["retry_delay_s"],
            backoff=r["retry_backoff"],
            max_retry_delay=r["max_retry_delay_s"],
        )


@dataclass(frozen=True)
class PeriodicDef:
    """A schedule declared with ``@app.periodic``; the scheduler upserts it into ``schedules``.

    The schedule and its handler share one name; ``func`` is the user's function
    (under Forbid the registered handler wraps it in the job lock, see ``cron``).
    """

    name: str
    cron: str
    handler: str
    func: Callable[..., Any]
    timezone: str = "UTC"
    queue: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    concurrency_policy: str = "Forbid"
    lock_ttl: int = validation.DEFAULT_LOCK_TTL_S
    starting_deadline: int | None = None
    suspend: bool = False


@dataclass(frozen=True)
class TaskRecord:
    """A task row as the API returns it."""

    id: int
    handler: str
    queue: str
    priority: int
    payload: dict[str, Any]
    status: str
    attempt: int
    max_attempts: int
    run_at: datetime
    timeout: float
    result: Any
    error: str | None
    traceback: str | None
    worker_id: str | None
    pod_id: str | None
    progress: int | None
    progress_message: str | None
    tags: list[str]
    dedupe_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    parent_id: int | None = None  # the task that spawned this one (workflows)
    spawn_key: str | None = None
    #: Runs that did not count against max_attempts; ``attempt`` is the latest run's number.
    uncharged: int = 0
    #: The latest progress report's stage and metadata (see ``TaskContext.progress``).
    progress_stage: str | None = None
    progress_metadata: dict[str, Any] | None = None
    #: When this running task was asked to pause (None: it is not).
    pause_requested_at: datetime | None = None
    #: What became of the last pause asked of a run: ``checkpoint`` (its handler paused),
    #: ``after_attempt`` (paused when the attempt ended), ``moot`` (that attempt finished the
    #: task); None: none since the task was last resumed or claimed.
    pause_outcome: str | None = None

    @property
    def attempts_spent(self) -> int:
        return self.attempt - self.uncharged

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> TaskRecord:
        return cls(
            id=r["id"],
            handler=r["handler"],
            queue=r["queue"],
            priority=r["priority"],
            payload=r["payload"],
            status=r["status"],
            attempt=r["attempt"],
            max_attempts=r["max_attempts"],
            run_at=r["run_at"],
            timeout=r["timeout_s"],
            result=r["result"],
            error=r["error"],
            traceback=r["traceback"],
            worker_id=str(r["worker_id"]) if r["worker_id"] else None,
            pod_id=r["pod_id"],
            progress=r["progress"],
            progress_message=r["progress_message"],
            tags=list(r["tags"]),
            dedupe_key=r["dedupe_key"],
            created_at=r["created_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            parent_id=r.get("parent_id"),
            spawn_key=r.get("spawn_key"),
            uncharged=r.get("uncharged") or 0,
            progress_stage=r.get("progress_stage"),
            progress_metadata=r.get("progress_metadata"),
            pause_requested_at=r.get("pause_requested_at"),
            pause_outcome=r.get("pause_outcome"),
        )


@dataclass(frozen=True)
class TaskPage:
    items: list[TaskRecord]
    total: int
    limit: int
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.items) < self.total


@dataclass(frozen=True)
class EnqueueRequest:
    """One task for ``enqueue_many``; fields mirror ``enqueue``'s arguments."""

    handler: str
    payload: Mapping[str, Any] | None = None
    delay: float | None = None
    run_at: datetime | None = None
    priority: int | None = None
    queue: str | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    tags: Sequence[str] | None = None
    dedupe_key: str | None = None
    #: Retry policy of this task: seconds before the first retry, the factor each later one
    #: grows by, and the cap (None: the handler's option, else the App default).
    retry_delay: float | None = None
    backoff: float | None = None
    max_retry_delay: float | None = None


@dataclass(frozen=True)
class Prepared:
    """One request validated into the values its INSERT writes (``kubetasks.enqueue``)."""

    handler: str
    queue: str
    priority: int
    payload: str
    max_attempts: int
    run_at: datetime | None
    delay: float | None
    timeout: float
    retry_delay: float
    backoff: float
    max_retry_delay: float
    tags: list[str]
    dedupe_key: str | None

    def columns(self) -> TaskColumns:
        """The inserted values, as the store's typed inserts take them."""
        return TaskColumns(
            handler=self.handler, queue=self.queue, priority=self.priority, payload=self.payload,
            max_attempts=self.max_attempts, run_at=self.run_at, delay=self.delay, timeout=self.timeout,
            retry_delay=self.retry_delay, backoff=self.backoff, max_retry_delay=self.max_retry_delay,
            tags=self.tags, dedupe_key=self.dedupe_key,
        )  # fmt: skip
