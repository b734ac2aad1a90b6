"""The typed query functions of ``kubetasks.store``: each names a query that exists and
passes exactly as many arguments as its SQL has parameters (no server needed)."""

from __future__ import annotations

import contextlib
import inspect
import re
from types import ModuleType
from typing import Any

import pytest

from kubetasks.store import dashboard, locks, objects, operations, queries, queues, schedules, tasks, workers

MODULES = [tasks, queues, objects, schedules, workers, operations, locks, dashboard]
QUERIES = queries.load()
RESULT = {"one": None, "many": [], "val": 1, "exec": None}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def run(self, name: str, *args: Any, conn: Any = None) -> Any:
        self.calls.append((name, args))
        return RESULT[QUERIES[name].kind]


COLUMNS: tasks.TaskColumns = {
    "handler": "h", "queue": "q", "priority": 0, "payload": "{}", "max_attempts": 3, "run_at": None,
    "delay": None, "timeout": 1.0, "retry_delay": 1.0, "backoff": 2.0, "max_retry_delay": 9.0,
    "tags": ["t"], "dedupe_key": None,
}  # fmt: skip


class Opaque:
    """A value the function must pass on as it is (iterable: list() of it is a list)."""

    def __iter__(self) -> Any:
        return iter((self,))


FILTER: operations.TaskFilterParams = {
    "statuses": None, "queues": None, "handlers": None, "tags": None, "created_after": None,
    "created_before": None, "ids": None, "worker": None, "pod": None, "run_after": None, "run_before": None,
}  # fmt: skip


def functions() -> list[tuple[str, Any]]:
    out = []
    for mod in MODULES:
        assert isinstance(mod, ModuleType)
        for name, fn in vars(mod).items():
            if inspect.iscoroutinefunction(fn) and fn.__module__ == mod.__name__ and not name.startswith("_"):
                out.append((f"{mod.__name__.rsplit('.', 1)[1]}.{name}", fn))
    return out


def params(sql: str) -> int:
    return max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)


@pytest.mark.parametrize(("name", "fn"), functions(), ids=[n for n, _ in functions()])
async def test_each_call_passes_every_parameter_of_its_query(name: str, fn: Any) -> None:
    kwargs: dict[str, Any] = {}
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.name == "task":
            kwargs[p.name] = COLUMNS
        elif p.name == "tasks":
            kwargs[p.name] = [COLUMNS, COLUMNS]
        elif p.name == "flt":
            kwargs[p.name] = FILTER
        elif p.name == "action":
            kwargs[p.name] = "cancel"  # the one with an extra parameter; all three: below
        elif p.name == "topics":
            kwargs[p.name] = ["finished", "depth"]
        elif p.name == "cursors":
            kwargs[p.name] = [None, (0, None, 1)]  # claim: one queue without a cursor, one with
        elif p.name == "worker_id":
            kwargs[p.name] = "00000000-0000-0000-0000-000000000001"
        elif p.default is inspect.Parameter.empty:
            kwargs[p.name] = Opaque()
    rec = Recorder()
    # A conversion of the fake result may fail; the call was recorded before it.
    with contextlib.suppress(TypeError, ValueError):
        await fn(rec, **kwargs)
    assert rec.calls, f"{name} sent no query"
    for query, args in rec.calls:
        assert query in QUERIES, f"{name}: no query {query!r}"
        assert len(args) == params(QUERIES[query].sql), (
            f"{name}: {len(args)} arguments for {query!r}, whose SQL has {params(QUERIES[query].sql)}"
        )


@pytest.mark.parametrize("action", ["retry", "cancel", "delete"])
async def test_every_bulk_batch_passes_every_parameter(action: str) -> None:
    rec = Recorder()
    await operations.bulk_batch(rec, action, FILTER, after_id=0, up_to_id=9, batch_size=5, reason="r")
    ((query, args),) = rec.calls
    assert query == f"bulk_{action}_batch" and len(args) == params(QUERIES[query].sql)


def test_the_typed_functions_cover_queries() -> None:
    assert len(functions()) >= 40
