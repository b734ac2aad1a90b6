"""The named-query loader splits, names and checks the queries file."""

from __future__ import annotations

import pytest

from kubetasks.store import queries


def test_parse_blocks_and_kinds() -> None:
    text = """
-- name: first :one
-- $1 id
SELECT 1 WHERE $1 = 1;

-- name: second :many
SELECT 2
  FROM x;
"""
    q = queries.parse(text)
    assert list(q) == ["first", "second"]
    assert q["first"].kind == "one" and q["first"].sql == "SELECT 1 WHERE $1 = 1"
    assert q["second"].sql == "SELECT 2\n  FROM x"


def test_duplicate_and_bad_kind_and_empty() -> None:
    with pytest.raises(queries.QueryFileError, match="defined twice"):
        queries.parse("-- name: a :one\nSELECT 1;\n-- name: a :one\nSELECT 2;")
    with pytest.raises(queries.QueryFileError, match="unknown kind :some"):
        queries.parse("-- name: a :some\nSELECT 1;")
    with pytest.raises(queries.QueryFileError, match="has no statement"):
        queries.parse("-- name: a :one\n-- only a comment\n")


def test_shipped_queries_load() -> None:
    q = queries.load()
    for name in ("enqueue", "claim", "complete_unsuccessful", "heartbeat"):
        assert name in q
    assert all(";" not in v.sql.rstrip()[-1:] for v in q.values())


def test_migrations_numbered_without_gaps() -> None:
    found = queries.migrations()
    assert [v for v, _, _ in found] == list(range(1, len(found) + 1))


def test_replica_marker() -> None:
    """Only queries marked :replica may run on a read replica; the engine's never are."""
    q = queries.parse("-- name: a :many :replica\nSELECT 1;\n-- name: b :many\nSELECT 2;")
    assert q["a"].replica and q["a"].kind == "many" and not q["b"].replica
    shipped = queries.load()
    for name in ("claim", "enqueue", "heartbeat", "get_task", "tasks_max_id", "tasks_count"):
        assert not shipped[name].replica, name
    assert shipped["stats_counts"].replica and shipped["metrics_queue_depths"].replica
