"""The structure issue 16 reached, kept: no import cycle, no module using another's private
names, no raw query call outside the store, no environment read outside the settings module.

The import direction itself is import-linter's ``layers`` contract (``make lint``); this
catches what a layers contract does not (a cycle inside one layer, private names, raw SQL)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def metrics() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "structure_metrics", ROOT / "tools" / "structure_metrics.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycle() -> None:
    m = metrics()
    assert m.cycles(exclude_type_checking=False) == []


def test_no_module_uses_another_modules_private_names() -> None:
    m = metrics()
    assert m.private_uses(m.files()) == []


def test_queries_are_called_only_from_the_store() -> None:
    m = metrics()
    outside = [p for p in m.files() if p.relative_to(m.PKG).parts[0] != "store"]
    assert m.store_runs(outside) == []


def test_settings_come_only_from_the_settings_module() -> None:
    """Four reads are not settings: the child-process plumbing of sync handlers (subprocs) and
    the environment devenv hands to apt-get."""
    m = metrics()
    reads = m.grep(r"os\.environ|os\.getenv", m.files(), {"config.py"})
    assert {r.split(":")[0] for r in reads} <= {
        "operator/kubetasks/subprocs.py",
        "operator/kubetasks/devenv.py",
    }
    assert len(reads) <= 4, reads
