"""operations.sql: every query that filters tasks carries the same filter block."""

from __future__ import annotations

import re
from pathlib import Path

from kubetasks.store import queries

SQL = Path(__file__).resolve().parents[2] / "operator" / "kubetasks" / "store" / "sql" / "operations.sql"
FILTERED = {
    "tasks_page", "tasks_count", "tasks_count_by", "bulk_retry_batch", "bulk_cancel_batch",
    "bulk_delete_batch",
}  # fmt: skip


def blocks() -> dict[str, str]:
    """The filter block of each query, whitespace-normalised."""
    text = SQL.read_text()
    out: dict[str, str] = {}
    for m in re.finditer(r"^-- name: (\w+) :\w+(?: :replica)?$(.*?)(?=^-- name: |\Z)", text, re.M | re.S):
        found = re.findall(r"-- filter:begin\n(.*?)\s*-- filter:end", m.group(2), re.S)
        if found:
            assert len(found) == 1, m.group(1)
            out[m.group(1)] = " ".join(found[0].split())
    return out


def test_every_filtered_query_has_the_one_filter_block() -> None:
    """The eleven parameters mean the same in each query: one copy of the block, six places."""
    found = blocks()
    assert set(found) == FILTERED
    assert len(set(found.values())) == 1
    block = next(iter(found.values()))
    assert {int(n) for n in re.findall(r"\$(\d+)", block)} == set(range(1, 12))


def test_the_queries_load_and_keep_their_comments_out() -> None:
    q = queries.load()
    for name in FILTERED:
        assert "filter:begin" not in q[name].sql and "$11" in q[name].sql
    assert "schedule_pause" in q and "events_page" in q and "claim" in q
