"""Listings keep ids and names whole and print JSON on request (issue 17 item 10).

In an 80-column terminal a table wraps long cells instead of cutting them;
``-o wide`` prints each row on one line whatever its width; ``-o json`` (or
``--json``) works on every listing; a bad ``-o`` is refused naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubetasks import App
from tests.integration.helpers import ROOT

LONG_HANDLER = "reports.monthly-revenue-reconciliation-for-every-region.v2-final"[:63]
LONG_QUEUE = "q." + "x" * 61


def kt(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
    env.update(KUBETASKS_DATABASE_URL=db_url, PYTHONPATH=str(ROOT), COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", "kubetasks", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
async def task_id(db_url: str) -> int:
    async with App(database_url=db_url, strict_handlers=False) as app:
        return await app.enqueue(LONG_HANDLER, queue=LONG_QUEUE)


async def test_tables_wrap_wide_stays_whole_json_everywhere(db_url: str, task_id: int) -> None:
    table = kt(db_url, "tasks", "list")
    assert table.returncode == 0, table.stderr
    assert "…" not in table.stdout  # wrapped, never cut
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    wide = kt(db_url, "tasks", "list", "-o", "wide")
    assert any(LONG_HANDLER in line and LONG_QUEUE in line for line in wide.stdout.splitlines()), wide.stdout
    stats = kt(db_url, "stats")
    assert "…" not in stats.stdout, stats.stdout
    for args in (
        ["tasks", "list"], ["tasks", "get", str(task_id)], ["stats"], ["schedules", "list"], ["events"],
        ["attempts"], ["locks", "list"],
    ):  # fmt: skip
        res = kt(db_url, *args, "-o", "json")
        assert res.returncode == 0, (args, res.stderr)
        json.loads(res.stdout)
    listed = json.loads(kt(db_url, "tasks", "list", "--json").stdout)
    assert listed["items"][0]["handler"] == LONG_HANDLER
    bad = kt(db_url, "tasks", "list", "-o", "yaml")
    assert bad.returncode == 2 and "--output" in bad.stderr and "table, wide, json" in bad.stderr
