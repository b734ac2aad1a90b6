"""TaskFilter and cursors: every bad criterion is refused naming its field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kubetasks.errors import ValidationError
from kubetasks.filters import TaskFilter, decode_cursor, encode_cursor


def field_of(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return exc.value.field


class TestTaskFilter:
    def test_of_normalises_and_keeps_order(self) -> None:
        f = TaskFilter.of(status="failed", queue=["a", "b", "a"], tag=("x",), parent=3)
        assert f.status == ("failed",) and f.queue == ("a", "b") and f.tag == ("x",) and f.parent == 3
        assert f.to_dict() == {"status": ["failed"], "queue": ["a", "b"], "tag": ["x"], "parent": 3}
        assert TaskFilter().is_empty() and not f.is_empty()

    @pytest.mark.parametrize(
        ("criteria", "field"),
        [
            ({"colour": "red"}, "colour"),
            ({"status": "done"}, "status"),
            ({"status": []}, "status"),
            ({"queue": "bad queue"}, "queue"),
            ({"handler": ["ok", 3]}, "handler"),
            ({"tag": "x" * 64}, "tag"),
            ({"created_after": datetime(2024, 1, 1)}, "created_after"),
            ({"created_before": "yesterday"}, "created_before"),
            (
                {
                    "created_after": datetime(2024, 1, 2, tzinfo=UTC),
                    "created_before": datetime(2024, 1, 1, tzinfo=UTC),
                },
                "created_after",
            ),
            ({"parent": 0}, "parent"),
            ({"root": "7"}, "root"),
            ({"worker": "not-a-uuid"}, "worker"),
            ({"pod": ""}, "pod"),
            ({"queue": [f"q{i}" for i in range(101)]}, "queue"),
        ],
    )
    def test_bad_criteria_name_the_field(self, criteria: dict[str, object], field: str) -> None:
        with pytest.raises(ValidationError) as exc:
            TaskFilter.of(**criteria)
        assert field_of(exc) == field, str(exc.value)

    def test_from_params_reads_strings(self) -> None:
        f = TaskFilter.from_params(
            {
                "status": ["failed,cancelled"],
                "queue": "a",
                "created_after": "2024-05-01T10:00:00+00:00",
                "root": "12",
            }
        )
        assert f.status == ("failed", "cancelled") and f.queue == ("a",) and f.root == 12
        assert f.created_after == datetime(2024, 5, 1, 10, tzinfo=UTC)

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"sort": "id"}, "sort"),
            ({"root": "abc"}, "root"),
            ({"parent": ["1", "2"]}, "parent"),
            ({"created_before": "last tuesday"}, "created_before"),
            ({"created_before": "2024-05-01T10:00:00"}, "created_before"),  # no offset: naive
        ],
    )
    def test_from_params_refuses(self, params: dict[str, str | list[str]], field: str) -> None:
        with pytest.raises(ValidationError) as exc:
            TaskFilter.from_params(params)
        assert field_of(exc) == field


class TestCursors:
    def test_round_trip(self) -> None:
        c = encode_cursor("tasks", 12345)
        assert decode_cursor("tasks", c, 1) == (12345,)
        assert decode_cursor("attempts", encode_cursor("attempts", 9, 2), 2) == (9, 2)

    @pytest.mark.parametrize(
        "cursor",
        [
            "",
            "abc",
            "!!!",
            encode_cursor("events", 5),
            encode_cursor("tasks", 1, 2),
            "dGFza3M6LTE",
            "x" * 300,
        ],
    )
    def test_anything_else_is_refused_as_cursor(self, cursor: str) -> None:
        with pytest.raises(ValidationError) as exc:
            decode_cursor("tasks", cursor, 1)
        assert exc.value.field == "cursor"
