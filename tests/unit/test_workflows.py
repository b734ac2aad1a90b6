"""The pure side of workflows: tree, counts, times, retries and the critical path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetasks import Fail
from kubetasks.workflows import ChildFailed, Suspend, critical_path, label, summarize

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    id: int,
    parent: int | None,
    run_s: float,
    created: float,
    finished: float | None,
    *,
    status: str | None = None,
    attempt: int = 1,
    handler: str = "h",
) -> dict[str, Any]:
    """A workflow_tasks row; times in seconds after T0."""
    return {
        "id": id,
        "parent_id": parent,
        "handler": handler,
        "status": status or ("succeeded" if finished is not None else "running"),
        "attempt": attempt,
        "run_s": run_s,
        "created_at": T0 + timedelta(seconds=created),
        "finished_at": None if finished is None else T0 + timedelta(seconds=finished),
        "db_now": T0 + timedelta(seconds=100),
    }


def test_a_lone_task_is_its_own_critical_path() -> None:
    s = summarize([row(1, None, 2.5, 0, 3)])
    assert (s.critical_path, s.critical_path_s) == ([1], 2.5)
    assert s.tasks == 1 and s.counts == {"succeeded": 1} and s.total_s == 2.5 and s.wall_s == 3.0


def test_concurrent_children_the_longest_one_counts() -> None:
    rows = [row(1, None, 0.1, 0, 10), row(2, 1, 1, 1, 2), row(3, 1, 3, 1, 4), row(4, 1, 2, 1, 3)]
    assert critical_path(summarize(rows).root) == (pytest.approx(3.1), [1, 3])


def test_sequential_stages_chain_up() -> None:
    """c was created after a and b ended (the parent waited for them): c follows the longer, b."""
    rows = [
        row(1, None, 0.1, 0, 10),
        row(2, 1, 1, 1, 2),  # a
        row(3, 1, 2, 1, 3),  # b
        row(4, 1, 1.5, 4, 5.5),  # c, stage 2
    ]
    s = summarize(rows)
    assert s.critical_path == [1, 3, 4]
    assert s.critical_path_s == pytest.approx(0.1 + 2 + 1.5)
    assert [n.on_critical_path for n in s.root.walk()] == [True, False, True, True]


def test_a_child_that_ended_after_another_was_created_is_not_its_predecessor() -> None:
    """x (long) overlaps y's creation: y does not depend on x; the best chain is x alone."""
    rows = [row(1, None, 0, 0, 10), row(2, 1, 5, 0, 6), row(3, 1, 1, 5, 6.5)]
    assert critical_path(summarize(rows).root) == (5, [1, 2])


def test_nested_children_weigh_with_their_own_path() -> None:
    """b runs briefly itself but waits for d (4 s): the path goes through b and d, not a (3 s)."""
    rows = [
        row(1, None, 0.2, 0, 10),
        row(2, 1, 3, 1, 4),  # a
        row(3, 1, 0.1, 1, 6),  # b
        row(5, 3, 4, 1.5, 5.5),  # d, b's child
        row(6, 1, 1, 7, 8),  # e, after both
    ]
    s = summarize(rows)
    assert s.critical_path == [1, 3, 5, 6]
    assert s.critical_path_s == pytest.approx(0.2 + 0.1 + 4 + 1)
    assert [c.id for c in s.root.children] == [2, 3, 6]


def test_ties_go_to_the_earlier_task() -> None:
    rows = [row(1, None, 0, 0, 5), row(3, 1, 2, 1, 3), row(2, 1, 2, 1, 3)]
    assert critical_path(summarize(rows).root)[1] == [1, 2]
    rows = [row(1, None, 0, 0, 5), row(2, 1, 2, 1.5, 3.5), row(3, 1, 2, 1, 3)]
    assert critical_path(summarize(rows).root)[1] == [1, 3]


def test_unfinished_children_count_but_precede_nothing() -> None:
    rows = [
        row(1, None, 0.5, 0, None, status="suspended", attempt=0),
        row(2, 1, 2, 1, None, status="running"),
        row(3, 1, 1, 1, 2, status="failed", attempt=3),
        row(4, 1, 0, 1, None, status="pending"),
    ]
    s = summarize(rows)
    assert s.critical_path == [1, 2] and s.critical_path_s == 2.5
    assert s.counts == {"failed": 1, "pending": 1, "running": 1, "suspended": 1}
    assert s.retries == 2  # attempt 3: two spent beyond the first; suspensions spend none
    assert s.wall_s == 100.0  # unfinished root: up to the database's now()
    assert s.total_s == 3.5


def test_rows_whose_parent_is_gone_are_left_out() -> None:
    rows = [row(1, None, 1, 0, 2), row(2, 1, 1, 0.5, 1.5), row(9, 7, 5, 0.5, 6)]
    s = summarize(rows)
    assert [n.id for n in s.root.walk()] == [1, 2] and s.critical_path == [1, 2]


def test_deep_chain_is_not_recursive() -> None:
    rows = [row(1, None, 1, 0, 5000)] + [row(i, i - 1, 1, i, 5000 - i) for i in range(2, 3001)]
    s = summarize(rows)
    assert len(s.critical_path) == 3000 and s.critical_path_s == 3000


def test_dict_and_label() -> None:
    rows = [row(1, None, 0.25, 0, 2, handler="flow.fan"), row(2, 1, 1, 0.5, 1.5, handler="flow.leaf")]
    s = summarize(rows)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["critical_path"] == [1, 2] and d["tree"]["children"][0]["id"] == 2
    assert d["counts"] == {"succeeded": 2} and d["tree"]["on_critical_path"] is True
    assert label(s.root) == "#1 flow.fan  succeeded  0.250s  [1 children: 1 succeeded]"
    running = summarize([{**row(5, None, 1, 0, None), "progress": 40, "progress_message": "half"}]).root
    assert label(running) == "#5 h  running  1.000s  40% half"


def test_control_flow_classes() -> None:
    assert not issubclass(Suspend, Exception)  # `except Exception` in a handler must not swallow it
    s = Suspend([3, 4], "collect")
    assert (s.child_ids, s.policy) == ([3, 4], "collect")
    err = ChildFailed(7, "flow.leaf", "failed", "boom")
    assert isinstance(err, Fail)  # fails the parent without a pointless retry
    assert err.message == "child task 7 (flow.leaf) failed: boom"


def test_summarize_needs_a_root() -> None:
    with pytest.raises(ValueError, match="root"):
        summarize([])
