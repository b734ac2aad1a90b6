"""The worker's decisions, without a database: which queues and handlers it claims, how a
handler's exception ends its attempt, and how finished outcomes are grouped and cleaned
before they are written.

The same decisions through PostgreSQL, with real workers: tests/integration/test_engine.py,
test_engine_faults.py, test_served.py and test_default_queues.py.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from typing import Any

import asyncpg
import pytest

from kubetasks import App, validation
from kubetasks.errors import Fail, Retry
from kubetasks.model import TaskDef
from kubetasks.worker import (
    ERROR_MAX_CHARS,
    Failure,
    Outcome,
    Worker,
    as_unstorable,
    claim_filters,
    classify_failure,
    cluster_limits,
    declared_limits,
    group_outcomes,
    set_failure,
    wanted_queues,
)
from kubetasks.workflows import ChildFailed
from tests.handlers import noop

W1 = uuid.UUID(int=1)
W2 = uuid.UUID(int=2)


def td(name: str, **kw: Any) -> TaskDef:
    return TaskDef(name=name, func=noop, is_async=True, **kw)


def defs(*tds: TaskDef) -> dict[str, TaskDef]:
    return {t.name: t for t in tds}


# -- which queues and handlers a worker asks for ----------------------------------------


class TestWantedQueues:
    def test_named_queues_alone_in_the_order_given(self) -> None:
        handlers = defs(td("a", queue="qa"), td("b"))
        assert wanted_queues(["z", "y"], False, handlers, "default", []) == ("z", "y")

    def test_none_named_the_queues_of_the_handlers_once_each(self) -> None:
        handlers = defs(td("a", queue="qa"), td("b"), td("c", queue="qa"), td("d", queue="qd"))
        assert wanted_queues([], False, handlers, "dflt", []) == ("qa", "dflt", "qd")

    def test_no_handlers_the_default_queue(self) -> None:
        assert wanted_queues([], False, {}, "dflt", []) == ("dflt",)

    def test_star_named_first_then_the_handlers_then_those_found(self) -> None:
        handlers = defs(td("a", queue="qa"), td("b"))
        got = wanted_queues(["first", "qa"], True, handlers, "default", ["found", "first", "qa", "more"])
        assert got == ("first", "qa", "default", "found", "more")

    def test_a_worker_serves_what_its_app_and_settings_say(self) -> None:
        """Wired through a Worker built on an App that was never opened."""
        app = App(database_url="postgresql://nobody@127.0.0.1:1/none", pod_id="unit", default_queue="dq")
        app.register("a", noop, queue="qa")
        app.register("b", noop)
        assert Worker(app).queues == ("qa", "dq")
        assert Worker(app, queues=["x", "*"]).queues == ("x", "qa", "dq")
        assert Worker(app, queues=["x"]).queues == ("x",)


class TestClaimFilters:
    """The plain claim takes the handlers the worker recorded as served, which it reads from the
    database (worker_handlers); these say which of them it must not take now."""

    def test_plain_handlers_are_left_to_the_plain_claim(self) -> None:
        handlers = defs(td("a"), td("b"), td("c"))
        limits = cluster_limits(declared_limits(handlers.values()), {})
        assert claim_filters((), handlers, limits, {}) == ([], [])

    def test_a_cluster_limited_handler_is_claimed_on_its_own(self) -> None:
        handlers = defs(td("a"), td("lim", cluster_concurrency=2))
        limits = cluster_limits(declared_limits(handlers.values()), {})
        assert limits == {"lim": 2}
        assert claim_filters((), handlers, limits, {}) == (["lim"], ["lim"])

    def test_a_limit_only_the_database_holds_counts_too(self) -> None:
        """Another live worker declared it: this pod's code does not, the plain claim skips it anyway."""
        handlers = defs(td("a"), td("b"))
        limits = cluster_limits(declared_limits(handlers.values()), {"b": 4})
        assert limits == {"b": 4}
        assert claim_filters((), handlers, limits, {}) == (["b"], ["b"])

    def test_the_smaller_of_the_declared_and_the_held_limit_wins(self) -> None:
        handlers = defs(td("a", cluster_concurrency=5), td("b", cluster_concurrency=2))
        assert cluster_limits(declared_limits(handlers.values()), {"a": 3, "b": 9}) == {"a": 3, "b": 2}

    def test_a_declared_limit_of_a_handler_not_served_is_not_applied(self) -> None:
        """Limits are noted of the handlers served: one registered since is not among them."""
        handlers = defs(td("a"), td("later", cluster_concurrency=1))
        assert cluster_limits(declared_limits([handlers["a"]]), {}) == {}

    @pytest.mark.parametrize("limited", [False, True])
    def test_a_handler_whose_local_slots_are_full_is_not_asked_for(self, limited: bool) -> None:
        kw = {"cluster_concurrency": 10} if limited else {}
        handlers = defs(td("a"), td("busy", concurrency=2, **kw))
        capped = [n for n, t in handlers.items() if t.concurrency]
        limits = cluster_limits(declared_limits(handlers.values()), {})
        not_full = (["busy"], ["busy"]) if limited else ([], [])
        assert claim_filters(capped, handlers, limits, {"busy": 1}) == not_full
        for running in ({"busy": 2}, {"busy": 3}):  # full, or over its limit (a claim raced it)
            assert claim_filters(capped, handlers, limits, running) == ([], ["busy"])

    def test_served_handlers_the_app_no_longer_has_are_not_taken(self) -> None:
        """Served but removed from the app since (a worker that has it runs it): left out until the
        worker records what it serves now, limited or not."""
        handlers = defs(td("kept"), td("new"))
        limits = {"gone.limited": 1}
        assert claim_filters((), handlers, limits, {}, gone=["gone", "gone.limited"]) == (
            [],
            ["gone", "gone.limited"],
        )

    def test_they_read_the_limited_and_capped_handlers_only(self) -> None:
        """With 10,000 served handlers, none limited or capped, nothing is looked up: a claim costs
        the same however many handlers the worker serves."""

        class Untouchable(dict[str, TaskDef]):
            def get(self, *a: Any) -> Any:
                raise AssertionError("a served handler was looked up")

            def __getitem__(self, k: str) -> TaskDef:
                raise AssertionError("a served handler was looked up")

            def __iter__(self) -> Any:
                raise AssertionError("the served handlers were walked")

        handlers = Untouchable({f"h{i}": td(f"h{i}") for i in range(10_000)})
        assert claim_filters((), handlers, cluster_limits({}, {}), {}) == ([], [])

    def test_a_worker_notes_its_capped_and_limited_handlers_when_it_serves(self) -> None:
        """The counter a worker compares before each claim moves on with every change of the app's
        handlers, so it records them again then, and only then."""
        app = App(database_url="postgresql://nobody@127.0.0.1:1/none", pod_id="unit")
        v0 = app.handlers_version
        app.register("a", noop)
        v1 = app.handlers_version
        app.register("a", noop, concurrency=2, replace=True)
        v2 = app.handlers_version
        app.unregister("a")
        assert v0 < v1 < v2 < app.handlers_version


# -- how a handler's exception ends its attempt -----------------------------------------


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a handler would raise it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


class TestClassifyFailure:
    def test_a_timeout_names_the_limit_and_has_no_traceback(self) -> None:
        assert classify_failure(raised(TimeoutError()), 2.5) == Failure(
            "timed out after 2.5s", None, "timeout"
        )

    def test_retry_keeps_its_delay_and_message(self) -> None:
        f = classify_failure(raised(Retry(3, "busy")), 60)
        assert f == Failure("busy", None, "retried", delay=3.0, force_retry=True)
        assert classify_failure(raised(Retry()), 60).delay is None  # the task's backoff

    def test_fail_and_a_failed_child_end_the_task(self) -> None:
        assert classify_failure(raised(Fail("nope")), 60) == Failure("nope", None, "failed", no_retry=True)
        f = classify_failure(raised(ChildFailed(7, "kid", "failed", "boom")), 60)
        assert f.kind == "failed" and f.no_retry and "child task 7 (kid) failed: boom" in f.error

    @pytest.mark.parametrize("exc", [RuntimeError("x"), KeyError("k"), SystemExit(3), KeyboardInterrupt()])
    def test_anything_else_is_retried_with_its_type_and_traceback(self, exc: BaseException) -> None:
        f = classify_failure(raised(exc), 60)
        assert f.kind == "retried" and f.delay is None and not f.no_retry and not f.force_retry
        assert f.error == f"{type(exc).__name__}: {exc}"
        assert f.tb is not None and "Traceback" in f.tb and f"{type(exc).__name__}" in f.tb

    def test_a_cancel_from_inside_the_handler_is_retried(self) -> None:
        f = classify_failure(raised(asyncio.CancelledError()), 60)
        assert (f.error, f.kind) == ("the handler was cancelled", "retried")
        assert f.tb is not None and "CancelledError" in f.tb


ROW = {"max_attempts": 3, "retry_delay_s": 2.0, "retry_backoff": 3.0, "max_retry_delay_s": 100.0}


def outcome(attempt: int = 1, uncharged: int = 0, **kw: Any) -> Outcome:
    kw.setdefault("worker_id", W1)
    kw.setdefault("task_id", 1)
    return Outcome(attempt=attempt, uncharged=uncharged, handler="h", queue="q", **kw)


def failed(attempt: int, f: Failure, row: dict[str, Any] = ROW, uncharged: int = 0) -> Outcome:
    out = outcome(attempt, uncharged)
    set_failure(out, row, f)
    return out


class TestSetFailure:
    @pytest.mark.parametrize(("attempt", "base"), [(1, 2.0), (2, 6.0)])
    def test_attempts_left_retry_after_the_backoff(self, attempt: int, base: float) -> None:
        for _ in range(50):
            out = failed(attempt, Failure("boom", None, "retried"))
            assert out.kind == "retried" and out.error == "boom"
            assert out.delay is not None and base * 0.9 <= out.delay <= base * 1.1

    def test_the_last_attempt_fails(self) -> None:
        out = failed(3, Failure("boom", None, "retried"))
        assert (out.kind, out.delay, out.error) == ("failed", None, "boom")

    def test_uncharged_attempts_do_not_count(self) -> None:
        """Attempts handed back without charge (orphans, a lost claim reply) leave the budget intact."""
        out = failed(3, Failure("boom", None, "retried"), uncharged=1)
        assert out.kind == "retried" and out.delay is not None and 5.4 <= out.delay <= 6.6

    def test_a_timeout_stays_a_timeout_retried_or_not(self) -> None:
        f = Failure("timed out after 1s", None, "timeout")
        first, last = failed(1, f), failed(3, f)
        assert (first.kind, first.delay is not None) == ("timeout", True)
        assert (last.kind, last.delay) == ("timeout", None)

    def test_fail_ends_the_task_with_attempts_left(self) -> None:
        out = failed(1, Failure("nope", None, "failed", no_retry=True))
        assert (out.kind, out.delay, out.error) == ("failed", None, "nope")

    def test_retry_with_a_delay_waits_exactly_that(self) -> None:
        out = failed(1, Failure("busy", None, "retried", delay=42.0, force_retry=True))
        assert (out.kind, out.delay) == ("retried", 42.0)

    def test_retry_on_the_last_attempt_fails_and_says_why(self) -> None:
        out = failed(3, Failure("busy", None, "retried", delay=1.0, force_retry=True))
        assert (out.kind, out.delay) == ("failed", None)
        assert out.error == "busy (no attempts left: 3 of 3)"

    @pytest.mark.parametrize(
        ("delay", "written"),
        [(1e300, validation.DELAY_MAX), (math.inf, validation.DELAY_MAX), (math.nan, validation.DELAY_MAX),
         (-5.0, 0.0), (0.0, 0.0)],
    )  # fmt: skip
    def test_a_delay_is_bounded_to_what_the_database_adds_to_now(self, delay: float, written: float) -> None:
        out = failed(1, Failure("x", None, "retried", delay=delay))
        assert out.delay == written

    def test_the_backoff_is_capped(self) -> None:
        row = {**ROW, "max_attempts": 50, "retry_backoff": 10.0, "max_retry_delay_s": 15.0}
        for _ in range(50):
            out = failed(20, Failure("x", None, "retried"), row)
            assert out.delay is not None and 13.5 <= out.delay <= 16.5

    def test_texts_are_made_storable_and_bounded(self) -> None:
        """NUL and lone surrogates escaped, the error's start kept, the traceback's end."""
        error = "bad \x00 \udcff " + "e" * (ERROR_MAX_CHARS * 2)
        tb = "first line\n" + "t" * (ERROR_MAX_CHARS * 8) + "\nlast line \x00"
        out = failed(1, Failure(error, tb, "retried"))
        assert out.error is not None and out.tb is not None
        assert out.error.startswith("bad \\x00 \\udcff ") and len(out.error) == ERROR_MAX_CHARS
        assert out.tb.endswith("last line \\x00") and len(out.tb) <= ERROR_MAX_CHARS * 4
        assert "\x00" not in out.error + out.tb
        (out.error + out.tb).encode("utf-8")  # PostgreSQL stores UTF-8


# -- how finished outcomes are grouped and cleaned before the write ----------------------


def o(task_id: int, kind: str, worker: uuid.UUID = W1, parent: int | None = None) -> Outcome:
    return outcome(task_id=task_id, kind=kind, worker_id=worker, parent_id=parent)


def ids(outs: list[Outcome]) -> list[int]:
    return [x.task_id for x in outs]


class TestGroupOutcomes:
    def test_per_worker_successes_endings_and_suspensions(self) -> None:
        batch = [
            o(1, "succeeded"), o(2, "failed", W2), o(3, "suspended"), o(4, "retried"), o(5, "timeout"),
            o(6, "succeeded", W2), o(9, "suspended", W2), o(7, "suspended", W2), o(8, "succeeded"),
        ]  # fmt: skip
        got = [(wid, ids(ok), ids(bad), ids(sus)) for wid, ok, bad, sus, _ in group_outcomes(batch)]
        assert got == [(W1, [1, 8], [4, 5], [3]), (W2, [6], [2], [7, 9])]

    def test_children_go_by_parent_so_batches_lock_parents_in_one_order(self) -> None:
        batch = [o(1, "succeeded", parent=30), o(2, "succeeded"), o(3, "succeeded", parent=10),
                 o(4, "failed", parent=20), o(5, "retried", parent=5)]  # fmt: skip
        ((_, ok, bad, _, _),) = group_outcomes(batch)
        assert ids(ok) == [2, 3, 1]  # no parent first (0), then 10, 30
        assert ids(bad) == [5, 4]

    def test_without_parents_the_order_of_arrival_is_kept(self) -> None:
        batch = [o(5, "succeeded"), o(2, "succeeded"), o(9, "failed"), o(1, "failed")]
        ((_, ok, bad, _, _),) = group_outcomes(batch)
        assert (ids(ok), ids(bad)) == ([5, 2], [9, 1])

    def test_every_outcome_lands_in_exactly_one_group_of_its_own_worker(self) -> None:
        rnd = random.Random(16)
        kinds = ["succeeded", "failed", "retried", "timeout", "suspended", "paused"]
        for _ in range(200):
            batch = [
                o(i, rnd.choice(kinds), rnd.choice([W1, W2]), rnd.choice([None, rnd.randrange(50)]))
                for i in range(rnd.randrange(40))
            ]
            seen: list[int] = []
            for wid, ok, bad, sus, held in group_outcomes(batch):
                assert all(x.worker_id == wid for x in ok + bad + sus + held)
                assert all(x.kind == "succeeded" for x in ok) and all(x.kind == "suspended" for x in sus)
                assert all(x.kind == "paused" for x in held) and ids(held) == sorted(ids(held))
                assert all(x.kind not in ("succeeded", "suspended", "paused") for x in bad)
                seen += ids(ok + bad + sus + held)
            assert sorted(seen) == list(range(len(batch)))

    def test_an_empty_batch_has_no_group(self) -> None:
        assert group_outcomes([]) == []


class TestAsUnstorable:
    def test_a_refused_outcome_becomes_a_plain_storable_failure(self) -> None:
        out = outcome(2, kind="suspended", result='{"x": 1}', tb="tb", delay=5.0, wait_ids=[3, 4])
        as_unstorable(out, asyncpg.DataError("invalid byte sequence \x00 " + "z" * ERROR_MAX_CHARS))
        assert (out.kind, out.delay, out.result, out.tb, out.wait_ids) == ("failed", None, None, None, [])
        assert out.error is not None
        assert out.error.startswith("outcome could not be stored (suspended): DataError: invalid byte")
        assert "\x00" not in out.error and len(out.error) == ERROR_MAX_CHARS
