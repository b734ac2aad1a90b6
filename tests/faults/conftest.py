"""Fixtures of the fault matrix: Toxiproxy, a PostgreSQL server of its own, the run count, the table.

`make test` runs every scenario once; `make faults RUNS=n` (FAULTS_RUNS=n)
runs each n times and prints the table of the five figures per scenario.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.toxiproxy import Toxiproxy
from tests.pgcluster import PgCluster

ROOT = Path(__file__).resolve().parents[2]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" in metafunc.fixturenames:
        n = int(os.environ.get("FAULTS_RUNS", "1"))
        metafunc.parametrize("run", range(1, n + 1), ids=[f"run{i}" for i in range(1, n + 1)])


@pytest.fixture(scope="package")
def toxi() -> Iterator[Toxiproxy]:
    logdir = ROOT / ".run" / "faults"
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        tp = Toxiproxy.start(logdir / "toxiproxy.log")
    except RuntimeError as exc:
        pytest.fail(f"the fault proxy could not start: {exc}", pytrace=False)
    yield tp
    tp.stop()


@pytest.fixture(scope="package")
def fault_pg() -> Iterator[PgCluster]:
    """A PostgreSQL server for the matrix alone: scenarios restart and freeze it."""
    try:
        cluster = PgCluster.start()
    except Exception as exc:
        pytest.fail(f"could not start PostgreSQL for the fault matrix: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def fault_target(fault_pg: PgCluster) -> harness.Target:
    p = fault_pg.primary
    return harness.Target(admin_url=p.url("{db}"), upstream_port=p.port)


@pytest.fixture
def pg_pair() -> Iterator[PgCluster]:
    """A primary and a synchronous standby of this test's own (a failover destroys them)."""
    cluster = PgCluster.start(standbys=1, sync_standby=True)
    yield cluster
    cluster.stop()


def table(results: list[dict[str, object]]) -> str:
    cols = ["lost", "duplicates", "started_twice", "stale_running", "attempts_spent"]
    by: dict[str, list[dict[str, object]]] = {}
    for r in results:
        by.setdefault(str(r["scenario"]), []).append(r)
    head = (
        f"{'scenario':<26} {'runs':>4} {'passed':>6} {'known':>5} "
        + " ".join(f"{c:>14}" for c in cols)
        + f" {'phantom':>7} {'zombie':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, rs in by.items():
        sums = [sum(int(r[c]) for r in rs) for c in cols]  # type: ignore[call-overload]
        passed = sum(1 for r in rs if r["status"] == "passed")
        known = sum(1 for r in rs if r["status"] == "known defect")
        ph = sum(int(r["phantom"]) for r in rs)  # type: ignore[call-overload]
        zo = sum(int(r["zombie_accepted"]) for r in rs)  # type: ignore[call-overload]
        lines.append(
            f"{name:<26} {len(rs):>4} {passed:>6} {known:>5} "
            + " ".join(f"{s:>14}" for s in sums)
            + f" {ph:>7} {zo:>6}"
        )
    lines.append(
        "(figures summed over the runs; a run passes when all are 0 and the scenario's own checks hold; "
        "known: runs whose only failures are defects listed in test_matrix.KNOWN)"
    )
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not harness.RESULTS:
        return
    text = table(harness.RESULTS)
    terminalreporter.write_sep("=", "fault matrix")
    terminalreporter.write_line(text)
    for r in harness.RESULTS:
        if r["problems"]:
            terminalreporter.write_line(f"{r['scenario']}: " + " | ".join(map(str, r["problems"]))[:1500])
    out = ROOT / ".run" / "faults"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n")
