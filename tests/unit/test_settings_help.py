"""`kubetasks run --help` and `worker --help` list every setting (issue 17 item 10).

Generated from ``Settings`` itself: a field added there shows up with its
variable, its default and the comment above it, with no second list to keep.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
from typer.testing import CliRunner

from kubetasks.cli import cli
from kubetasks.config import Settings, describe


@pytest.mark.parametrize("command", ["run", "worker"])
def test_help_lists_every_setting_with_its_default(command: str) -> None:
    res = CliRunner().invoke(cli, [command, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for d in describe():
        assert f"{d.var} = {d.default}" in text, d.var
        assert d.doc.split()[0] in text
    assert len(describe()) == len(fields(Settings))


def test_every_setting_says_what_it_is() -> None:
    by_name = {d.name: d for d in describe()}
    assert not [d.var for d in by_name.values() if not d.doc]
    assert by_name["concurrency"].default == "10"
    assert by_name["lease_ttl"].default == "15"
    assert by_name["dashboard_writes"].default == "false"
    assert by_name["database_url"].default == "(required)"
    assert by_name["dashboard_token"].default == "(unset; a secret)"
    assert by_name["pod_id"].default == "$POD_NAME, else computed"
    assert by_name["retention_failed"].default == "2592000"
