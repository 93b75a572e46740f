"""The CLI's --help is part of its interface: snapshot it. To accept a
deliberate change, run with BKV_UPDATE_SNAPSHOTS=1 and review the diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bkv.cli import app

SNAPSHOTS = Path(__file__).parent / "snapshots"
COMMANDS = [[], ["dev"], ["dev", "up"], ["dev", "down"], ["dev", "status"], ["dev", "login"], ["dev", "issuer"], ["dev", "member-set"], ["dev", "island-set"],
            ["dev", "cluster"], ["demo"], ["audit"],
            ["backup"], ["restore"], ["list"], ["verify"], ["password"], ["password", "change"], ["password", "forgot"], ["disable"],
            ["events"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: "bkv " + " ".join(a) if a else "bkv")
def test_help_text_matches_its_snapshot(argv):
    result = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"},
                                prog_name="bkv")
    assert result.exit_code == 0
    snap = SNAPSHOTS / ("help-" + ("-".join(argv) or "bkv") + ".txt")
    if os.environ.get("BKV_UPDATE_SNAPSHOTS") == "1":
        snap.write_text(result.output)
    assert result.output == snap.read_text()


@pytest.mark.parametrize("argv", [["dev", "up"], ["dev", "login"], ["backup"], ["restore"], ["list"], ["verify"],
                                  ["password", "change"], ["disable"], ["events"]], ids=" ".join)
def test_every_user_command_explains_itself_with_an_example(argv):
    out = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "100", "TERM": "dumb"}, prog_name="bkv").output
    assert "Example: bkv " in out
