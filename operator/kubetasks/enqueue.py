"""Enqueue: a request validated into a ``Prepared`` task, and the INSERTs that write it.

Used by ``App.enqueue``/``enqueue_many``, by a running task's ``spawn``, by the
scheduler's ticks and by the Kubernetes layer's Task objects, so every path
resolves options the same way: enqueue argument > the handler's option > App
default. ``Registry`` is what this needs of an App: its settings and handlers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kubetasks import validation
from kubetasks.errors import Fail, UnknownHandler, ValidationError
from kubetasks.model import EnqueueRequest, HandlerOptions, Prepared, TaskDef
from kubetasks.store import Store, queues, tasks

if TYPE_CHECKING:
    from kubetasks.config import Settings


class Registry(Protocol):
    """The handlers and settings requests are resolved against (an ``App``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def handlers(self) -> Mapping[str, TaskDef]: ...

    @property
    def strict_handlers(self) -> bool: ...


def prepare(
    reg: Registry,
    req: EnqueueRequest,
    max_payload: int | None = None,
    *,
    stored: HandlerOptions | None = None,
    strict: bool | None = None,
) -> Prepared:
    """Validate one request into the values inserted; ``stored``: the options of a
    handler ``reg`` does not have, as read from the database (see ``prepare_any``)."""
    s = reg.settings
    validation.name("handler", req.handler)
    td: TaskDef | HandlerOptions | None = reg.handlers.get(req.handler)
    inputs = td.inputs if isinstance(td, TaskDef) else None
    if td is None and (reg.strict_handlers if strict is None else strict):
        raise UnknownHandler(req.handler, list(reg.handlers))
    if td is None:
        td = stored
    if req.delay is not None and req.run_at is not None:
        raise ValidationError("delay", "give delay or run_at, not both")
    payload_obj: Mapping[str, Any] = req.payload if req.payload is not None else {}
    if not isinstance(payload_obj, Mapping):
        raise ValidationError("payload", f"must be a JSON object (a dict), got {type(payload_obj).__name__}")
    if inputs and isinstance(td, TaskDef):
        payload_obj = td.apply_inputs(payload_obj)
    payload = validation.payload(payload_obj, max_payload or s.max_payload_bytes)

    def pick(arg: Any, opt: Any, default: Any) -> Any:
        return arg if arg is not None else (opt if opt is not None else default)

    return Prepared(
        handler=req.handler,
        queue=validation.name("queue", pick(req.queue, td and td.queue, s.default_queue)),
        priority=validation.priority(pick(req.priority, td and td.priority, 0)),
        payload=payload,
        max_attempts=validation.max_attempts(
            pick(req.max_attempts, td and td.max_attempts, s.default_max_attempts)
        ),
        run_at=None if req.run_at is None else validation.run_at(req.run_at),
        delay=None if req.delay is None else validation.delay(req.delay),
        timeout=validation.timeout(pick(req.timeout, td and td.timeout, s.default_timeout)),
        retry_delay=validation.retry_delay(
            pick(req.retry_delay, td and td.retry_delay, s.default_retry_delay)
        ),
        backoff=validation.backoff(pick(req.backoff, td and td.backoff, s.default_backoff)),
        max_retry_delay=validation.max_retry_delay(
            pick(req.max_retry_delay, td and td.max_retry_delay, s.default_max_retry_delay)
        ),
        tags=validation.tags(req.tags),
        dedupe_key=validation.dedupe_key(req.dedupe_key),
    )


async def stored_options(
    reg: Registry, store: Store, names: Iterable[str], conn: Any = None
) -> dict[str, HandlerOptions]:
    """The stored options of the handlers among ``names`` that ``reg`` does not have."""
    missing = sorted({n for n in names if n not in reg.handlers})
    if not missing:
        return {}
    rows = await queues.handler_options(store, handlers=missing, conn=conn)
    return {r["name"]: HandlerOptions.from_row(r) for r in rows}


async def prepare_any(reg: Registry, req: EnqueueRequest, store: Store, conn: Any = None) -> Prepared:
    """Like ``prepare``, but never refuses a handler for being absent from ``reg``: its
    options come from the database (the latest registration of a pod that has it). For
    tasks that did not come from this app's code: Task objects, CronJobLocks."""
    validation.name("handler", req.handler)
    stored = (await stored_options(reg, store, [req.handler], conn)).get(req.handler)
    return prepare(reg, req, stored=stored, strict=False)


async def insert(
    store: Store,
    p: Prepared,
    cr: tuple[str, str, str] | None = None,
    paused: bool = False,
) -> int:
    """Insert one prepared task (``cr``: the uid, namespace and name of its Task object);
    a dedupe key or Task object that names a live task returns that task's id."""
    cr_uid, cr_ns, cr_name = cr if cr else (None, None, None)
    for _ in range(5):
        task_id = await tasks.enqueue(
            store, p.columns(), cr_uid=cr_uid, cr_namespace=cr_ns, cr_name=cr_name, paused=paused
        )
        if task_id is not None:
            return task_id
        if cr_uid is not None:
            existing = await tasks.find_by_cr_uid(store, cr_uid=cr_uid)
            if existing is not None:
                return existing
        if p.dedupe_key is not None:
            rows = await tasks.find_live_by_dedupe_key(store, keys=[p.dedupe_key])
            if rows:
                return int(rows[0]["id"])
        # The conflicting task finished in between: insert again.
    raise RuntimeError("enqueue kept conflicting with a task that was finishing; try again")


async def insert_many(store: Store, prepared: Sequence[Prepared]) -> list[int]:
    """Insert many prepared tasks in one round trip; ids in the order given. A dedupe key
    that names an unfinished task gets that task's id."""
    if not prepared:
        return []
    keys = [p.dedupe_key for p in prepared if p.dedupe_key is not None]
    if len(keys) != len(set(keys)):
        raise ValidationError("dedupe_key", "the same dedupe key appears twice in one batch")
    rows = await tasks.enqueue_many(store, [p.columns() for p in prepared])
    if len(rows) == len(prepared):
        return [int(r["id"]) for r in rows]
    # Some dedupe keys named live tasks: map them, insert-order for the rest.
    by_key = {r["dedupe_key"]: int(r["id"]) for r in rows if r["dedupe_key"] is not None}
    missing = [k for k in keys if k not in by_key]
    for r in await tasks.find_live_by_dedupe_key(store, keys=missing):
        by_key[r["dedupe_key"]] = int(r["id"])
    plain = iter(int(r["id"]) for r in rows if r["dedupe_key"] is None)
    return [by_key[p.dedupe_key] if p.dedupe_key is not None else next(plain) for p in prepared]


async def spawn_children(
    reg: Registry,
    store: Store,
    parent: tuple[int, int, str],
    requests: Sequence[EnqueueRequest],
    keys: Sequence[str],
) -> list[int] | None:
    """Children of the running task ``parent`` (id, attempt, worker id), one per key; None
    when that attempt was taken away from its worker."""
    parent_id, attempt, worker_id = parent
    for k in keys:
        if not isinstance(k, str) or not 1 <= len(k) <= 255:
            raise ValidationError("key", f"a spawn key is 1 to 255 characters, got {k!r}")
    if len(set(keys)) != len(keys):
        raise ValidationError("key", "the same spawn key appears twice in one call")
    for r in requests:
        if r.dedupe_key is not None:
            raise ValidationError("dedupe_key", "a child task is identified by its spawn key instead")
    ps = [prepare(reg, r) for r in requests]
    rows = await tasks.spawn_children(
        store, parent_id=parent_id, attempt=attempt, worker_id=worker_id, keys=keys,
        tasks=[p.columns() for p in ps],
    )  # fmt: skip
    if not rows or any(r["id"] is None for r in rows):
        return None
    for p, row in zip(ps, rows, strict=True):
        if row["handler"] != p.handler:
            raise Fail(
                f"spawn {row['spawn_key']!r} of task {parent_id} was {row['handler']!r} in an earlier run "
                f"and is {p.handler!r} now: a workflow handler must spawn the same children in the "
                "same order on every run (or give each a key)"
            )
    return [int(r["id"]) for r in rows]
