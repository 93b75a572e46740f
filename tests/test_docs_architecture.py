"""docs/architecture.md says what the code does: its port table is the one
`Ports` makes, its links lead to files, and every `path:name` of "One
recovery, end to end" names a function, class or method that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bkv_dev.ports import Ports

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_port_table_is_the_one_ports_makes():
    rows = []
    for line in section("Ports of the local fleet").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("name", "---"):
            rows.append((cells[0], int(cells[1]), cells[2]))
    assert rows == Ports().table()


def test_every_relative_link_leads_to_a_file_of_the_repository():
    links = re.findall(r"\]\(([^)\s]+)\)", DOC.read_text())
    relative = [link for link in links if not re.match(r"[a-z]+:|#", link)]
    missing = [link for link in relative if not (DOC.parent / link.split("#")[0]).exists()]
    assert not missing


def test_every_loopback_port_the_docs_name_is_one_of_the_default_fleet():
    ports = set(Ports().all())
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", doc.read_text())}
        assert {p for p in named if 18000 <= p < 19000} <= ports, doc.name


# `path:name`: a function or class, or `Class.method` (in Go `Type.method`).
REFERENCE = re.compile(r"`([\w./-]+\.(?:py|go)):([\w.]+)`")


def defines(path: Path, name: str) -> bool:
    text = path.read_text()
    owner, _, member = name.rpartition(".")
    if path.suffix == ".go":
        receiver = rf"\(\w+ \*?{owner}\) " if owner else r"(\(\w+ \*?\w+\) )?"
        return re.search(rf"^func {receiver}{member}\(", text, re.M) is not None
    if not owner:
        return re.search(rf"^(\s*(async )?(def|class) {member}\b|{member} = )", text, re.M) is not None
    body = re.search(rf"^class {owner}\b.*?(?=^\S|\Z)", text, re.M | re.S)
    return body is not None and re.search(rf"^\s+(async )?def {member}\(", body.group(), re.M) is not None


RECOVERY = REFERENCE.findall(section("One recovery, end to end"))


def test_the_recovery_walk_names_the_sdk_the_edge_every_tier_and_the_token():
    files = {path for path, _ in RECOVERY}
    for part in ("client/src/bkv/sdk.py", "protocol/src/bkv_protocol/noise.py", "services/edge/noise-processor/",
                 "services/frontend/bkv_frontend/app.py", "services/vault-island/bkv_island/core.py",
                 "services/vault-island/bkv_island/hsm_client.py", "services/hsm-proxy/bkv_hsm_proxy/app.py",
                 "services/hsm-proxy/bkv_hsm_proxy/core.py", "services/hsm-proxy/bkv_hsm_proxy/hsm.py",
                 "services/vault-island/bkv_island/ledger.py", "services/hsm-proxy/bkv_hsm_proxy/log.py"):
        assert any(f.startswith(part) for f in files), part
    names = {name for _, name in RECOVERY}
    assert {"VaultProtocol.recover_start", "Island.recover_start", "Island.recover_finish", "VaultHsm.recover_start",
            "VaultHsm.recover_finish"} <= names


@pytest.mark.parametrize("path,name", RECOVERY, ids=[f"{p}:{n}" for p, n in RECOVERY])
def test_each_name_of_the_recovery_walk_exists(path, name):
    assert (ROOT / path).is_file(), path
    assert defines(ROOT / path, name), f"{path} defines no {name}"


def test_a_name_that_is_not_there_is_not_found():
    sdk, exchange = ROOT / "client/src/bkv/sdk.py", ROOT / "services/edge/noise-processor/exchange.go"
    assert defines(sdk, "VaultProtocol.recover_start") and defines(exchange, "exchange.open")
    assert not defines(sdk, "VaultProtocol.recovery_start")
    assert not defines(sdk, "VaultClientSync.verify")  # VaultProtocol's, not this class's
    assert not defines(exchange, "processor.open")
