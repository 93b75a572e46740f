"""README.md and docs/*.md name only what exists: every repository path
(``services/...``, ``scripts/x.sh``, ``bkv_island/core.py``, and after a
``.py``/``.go`` path a ``:name`` that occurs in that file), every
``make TARGET`` (a target of the Makefile) and every ``bkv SUBCOMMAND ...``
or ``bkv-<service> SUBCOMMAND`` in code (a command of that parser). Each
test lists every miss at once."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
# Where a package-relative path (bkv_island/core.py, bkv/sdk.py) is looked for.
PACKAGE_ROOTS = [ROOT / "src", ROOT / "protocol" / "src", ROOT / "client" / "src",
                 *sorted(p for p in (ROOT / "services").iterdir() if p.is_dir())]

_EDGE = r"(?<![\w./<>$-])(?<!> )"  # not a redirect's target: the command writes it
TOP_PATH = re.compile(_EDGE + r"((?:" + "|".join(map(re.escape, TOP)) + r")/[\w./*-]*[\w/*])(?::([A-Za-z_][\w.]*))?")
PACKAGE_PATH = re.compile(_EDGE + r"(bkv(?:_\w+)?/[\w./-]*\.(?:py|go|sh|md))(?::([A-Za-z_][\w.]*))?")
CODE_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.S)
# A command where a code span or line of a code block begins, or after a shell's separators.
COMMAND = re.compile(r"(?:^|(?<=[;|&(]\s)|(?<=\$\s)|(?<=&&\s)|(?<=^\s{4}))(make|bkv(?:-[a-z]+)*)[ \t]+([^\n`;|&)]*)",
                     re.M)


def _doc_name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def _resolve(path: str, top: bool) -> list[Path]:
    path = path.rstrip("/")
    roots = [ROOT] if top else PACKAGE_ROOTS
    if "*" in path:
        return [hit for root in roots for hit in root.glob(path)]
    return [root / path for root in roots if (root / path).exists()]


def _names_ok(file: Path, name: str) -> bool:
    if not file.is_file():
        return False
    text = file.read_text(errors="replace")
    return all(re.search(rf"\b{re.escape(part)}\b", text) for part in name.split("."))


def path_misses(text: str) -> list[str]:
    misses = []
    for rx, top in ((TOP_PATH, True), (PACKAGE_PATH, False)):
        for m in rx.finditer(text):
            path, name = m.group(1), m.group(2)
            found = _resolve(path, top)
            if not found:
                misses.append(path)
            elif name and path.endswith((".py", ".go")) and not any(_names_ok(f, name) for f in found):
                misses.append(f"{path}:{name}")
    return misses


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@functools.cache
def bkv_command():
    import typer

    from bkv.cli import app

    return typer.main.get_command(app)


@functools.cache
def service_commands(program: str) -> frozenset[str] | None:
    import importlib

    module = {"bkv-hsm-proxy": "bkv_hsm_proxy", "bkv-island": "bkv_island", "bkv-frontend": "bkv_frontend",
              "bkv-edge": "bkv_edge", "bkv-witness": "bkv_witness"}.get(program)
    if module is None:
        return None  # another program (bkv-noise-processor): not a parser of ours
    cli = importlib.import_module(f"{module}.__main__").cli
    return frozenset(cli._sub.choices)


def _bkv_misses(words: list[str]) -> str | None:
    command = bkv_command()
    said = ["bkv"]
    for word in words:
        if not hasattr(command, "commands") or not re.fullmatch(r"[a-z][a-z-]*", word):
            return None
        said.append(word)
        command = command.commands.get(word)
        if command is None:
            return " ".join(said)
    return None


def command_misses(text: str) -> list[str]:
    misses = []
    for span in CODE_SPAN.findall(text):
        for m in COMMAND.finditer(span.strip("`")):
            program, words = m.group(1), m.group(2).split()
            if not words:
                continue
            if program == "make":
                if re.fullmatch(r"[a-z][\w-]*", words[0]) and words[0] not in make_targets():
                    misses.append(f"make {words[0]}")
            elif program == "bkv":
                miss = _bkv_misses(words)
                if miss:
                    misses.append(miss)
            else:
                known = service_commands(program)
                if known is not None and re.fullmatch(r"[a-z][a-z-]*", words[0]) and words[0] not in known:
                    misses.append(f"{program} {words[0]}")
    return misses


def test_every_repository_path_the_docs_name_exists():
    misses = {_doc_name(d): m for d in DOCS if (m := path_misses(d.read_text()))}
    assert not misses


def test_every_make_target_and_command_the_docs_name_exists():
    misses = {_doc_name(d): m for d in DOCS if (m := command_misses(d.read_text()))}
    assert not misses


@pytest.mark.parametrize("text,missing", [
    ("see `services/hsm-proxy/bkv_hsm_proxy/log.py:IslandLog.capture`", []),
    ("see `services/hsm-proxy/bkv_hsm_proxy/log.py:IslandLog.no_such_method`",
     ["services/hsm-proxy/bkv_hsm_proxy/log.py:IslandLog.no_such_method"]),
    ("in scripts/no-such-script.sh and bkv_island/nowhere.py", ["scripts/no-such-script.sh", "bkv_island/nowhere.py"]),
    ("`bkv_island/rebalance.py`, `tests/test_unit_*.py`, the key `/bkv/records/<island>`", []),
])
def test_a_path_that_is_not_there_is_found_and_one_that_is_is_not(text, missing):
    assert path_misses(text) == missing


@pytest.mark.parametrize("text,missing", [
    ("`make demo`, then `bkv dev up --sites 5` and `bkv password forgot`", []),
    ("`make no-such-target`", ["make no-such-target"]),
    ("```\n$ bkv backup ./photos --store s3://b/p\nbkv passwort change\n```", ["bkv passwort"]),
    ("`bkv password remember`; `bkv-hsm-proxy no-such-command`", ["bkv password remember",
                                                                  "bkv-hsm-proxy no-such-command"]),
    ("we make or adopt the state file; the bkv dev fleet", []),  # prose, not code
])
def test_a_command_that_is_not_there_is_found_and_one_that_is_is_not(text, missing):
    assert command_misses(text) == missing
