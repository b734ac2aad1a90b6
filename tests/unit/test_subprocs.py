"""Registration refuses a plain handler that a child process could not import by module and name."""

from __future__ import annotations

import functools
import sys
from typing import Any

import pytest

from kubetasks import App, Blueprint, SyncTaskContext, TaskContext, ValidationError, subprocs

URL = "postgresql://unused@127.0.0.1:1/none"


def top_level(task: SyncTaskContext) -> str:
    return "ok"


def replaced_later(task: SyncTaskContext) -> str:
    return "original"


class Handlers:
    @staticmethod
    def static(task: SyncTaskContext) -> str:
        return "static"

    def method(self, task: SyncTaskContext) -> str:
        return "bound"


class CallableThing:
    def __call__(self, task: SyncTaskContext) -> str:
        return "called"


class AsyncCallable:
    async def __call__(self, task: TaskContext) -> str:
        return "awaited"


def make_closure() -> Any:
    def inner(task: SyncTaskContext) -> None: ...

    return inner


def make_local_class_method() -> Any:
    class Local:
        @staticmethod
        def run(task: SyncTaskContext) -> None: ...

    return Local.run


REFUSED = [
    (lambda task: None, "it is a lambda"),
    (make_closure(), "it is defined inside make_closure() (a closure, or a method of a local class)"),
    (make_local_class_method(), "it is defined inside make_local_class_method()"),
    (Handlers().method, "it is a bound method, which a child process cannot re-create"),
    (functools.partial(top_level), "it is a partial object, not a function"),
    (CallableThing(), "it is a CallableThing object, not a function"),
]


class TestRegistration:
    @pytest.mark.parametrize(("func", "why"), REFUSED, ids=[w.split(" (")[0] for _, w in REFUSED])
    def test_refused_with_the_handler_named_and_why(self, func: Any, why: str) -> None:
        bp = Blueprint()
        with pytest.raises(ValidationError) as ei:
            bp.register("jobs.sync", func)
        assert ei.value.field == "handler"
        assert ei.value.message.startswith(f"'jobs.sync': {why}")
        assert (
            "define it with `def` at the top level of a module (or make it `async def`)" in ei.value.message
        )
        assert "jobs.sync" not in bp.handlers  # nothing half-registered

    def test_decorator_and_periodic_refuse_too(self) -> None:
        bp = Blueprint()
        with pytest.raises(ValidationError, match=r"^handler: 'inner': it is defined inside"):

            @bp.task("inner")
            def inner(task: SyncTaskContext) -> None: ...

        for policy in ("Forbid", "Allow"):
            with pytest.raises(ValidationError, match=r"^handler: 'tick': it is defined inside"):

                @bp.periodic("* * * * *", name="tick", concurrency_policy=policy)
                def tick(task: SyncTaskContext) -> None: ...

        assert not bp.handlers and not bp.periodics

    def test_module_level_functions_and_async_handlers_pass(self) -> None:
        bp = Blueprint()
        bp.register("top", top_level)
        bp.register("static", Handlers.static)
        bp.register("async.lambda.ok", AsyncCallable())  # awaited on the loop: no child needed
        bp.register("partial.async", functools.partial(_async_top))
        assert not bp.handlers["top"].is_async
        assert bp.handlers["async.lambda.ok"].is_async and bp.handlers["partial.async"].is_async

    def test_interactive_main_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake_main = type(sys)("__main__")
        monkeypatch.setitem(sys.modules, "__main__", fake_main)

        def typed(task: SyncTaskContext) -> None: ...

        typed.__module__ = "__main__"
        typed.__qualname__ = "typed"
        with pytest.raises(ValidationError, match=r"interactive session or `python -c`"):
            Blueprint().register("repl", typed)

    def test_worker_start_refuses_a_name_bound_to_another_object(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A decorator above the registration (or a later rebinding) would make the child run
        something else: the worker refuses to start, naming the handler."""
        app = App(database_url=URL)
        app.register("later", replaced_later)
        subprocs.check_resolves("later", replaced_later)
        monkeypatch.setattr(sys.modules[__name__], "replaced_later", top_level)
        with pytest.raises(
            ValidationError, match=r"'later': tests\.unit\.test_subprocs\.replaced_later is not"
        ):
            subprocs.check_resolves("later", app.handlers["later"].func)


async def _async_top(task: TaskContext) -> None: ...
