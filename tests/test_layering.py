"""Who may import whom, read from the source (every import statement, those
inside functions too): the contract (bkv_protocol) imports nothing of ours,
the client only the contract, the shared server package only the contract,
each service the contract, bkv_server and itself. Third-party imports must
be declared by the package's own distribution (its pyproject), so a
dependency nobody declared fails here rather than on a user's machine."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"bkv_frontend": "services/frontend/bkv_frontend", "bkv_island": "services/vault-island/bkv_island",
            "bkv_hsm_proxy": "services/hsm-proxy/bkv_hsm_proxy", "bkv_edge": "services/edge/bkv_edge",
            "bkv_witness": "services/witness/bkv_witness"}
PACKAGES = {"bkv_protocol": "protocol/src/bkv_protocol", "bkv": "client/src/bkv", "bkv_server": "src/bkv_server",
            "bkv_dev": "src/bkv_dev", **SERVICES}
OURS = frozenset(PACKAGES)


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def declared_imports(pyproject: str) -> frozenset[str]:
    """The import names the distribution's declared dependencies provide
    (dist names mapped through the installed metadata), ours left out."""
    deps = tomllib.loads((ROOT / pyproject).read_text())["project"]["dependencies"]
    dists = {_dist(Requirement(d).name) for d in deps}
    return frozenset(mod for mod, owners in packages_distributions().items()
                     if dists & {_dist(o) for o in owners}) - OURS


# package -> (our packages it may import, the pyproject whose dependencies it may import)
RULES: dict[str, tuple[frozenset[str], str]] = {
    "bkv_protocol": (frozenset({"bkv_protocol"}), "protocol/pyproject.toml"),
    "bkv": (frozenset({"bkv", "bkv_protocol"}), "client/pyproject.toml"),
    "bkv_server": (frozenset({"bkv_server", "bkv_protocol"}), "pyproject.toml"),
    "bkv_dev": (OURS, "pyproject.toml"),
    **{s: (frozenset({s, "bkv_server", "bkv_protocol"}), "pyproject.toml") for s in SERVICES},
}


def imported(source: str, package: str) -> set[str]:
    """Top-level names of every module ``source`` imports anywhere, including
    ``importlib.import_module("...")`` with a literal name; a relative import
    stays inside ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            names.add(node.args[0].value.split(".")[0])
    return names


def violations(package: str, sources: dict[str, str]) -> list[str]:
    """``sources``: file name -> text, all in ``package``."""
    ours, pyproject = RULES[package]
    third_party = declared_imports(pyproject)
    found = []
    for name, text in sorted(sources.items()):
        for mod in sorted(imported(text, package)):
            if mod in OURS:
                if mod not in ours:
                    found.append(f"{name}: imports {mod} (of ours; {package} may import only {sorted(ours)})")
            elif mod not in sys.stdlib_module_names and mod not in third_party:
                found.append(f"{name}: imports {mod}, which {pyproject} does not declare")
    return found


def sources_of(package: str) -> dict[str, str]:
    base = ROOT / PACKAGES[package]
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(base.rglob("*.py"))}


@pytest.mark.parametrize("package", sorted(RULES))
def test_each_package_imports_only_what_its_layer_and_its_pyproject_allow(package):
    sources = sources_of(package)
    assert sources
    assert violations(package, sources) == []


def test_each_distribution_maps_its_declared_dependencies_to_import_names():
    # Without the installed metadata every third-party import would look undeclared.
    assert {"pydantic", "cryptography", "noise"} <= declared_imports("protocol/pyproject.toml")
    assert {"httpx", "opaque_ke_py", "typer", "tomli_w", "fsspec", "s3fs"} <= declared_imports("client/pyproject.toml")
    assert {"fastapi", "pkcs11", "aetcd", "uvicorn", "jwt"} <= declared_imports("pyproject.toml")


def test_the_checker_reports_a_forbidden_import_even_inside_a_function():
    hidden = "import os\n\ndef later():\n    from fastapi import FastAPI\n    import bkv_server.http\n"
    assert violations("bkv_protocol", {"x.py": hidden}) == [
        "x.py: imports bkv_server (of ours; bkv_protocol may import only ['bkv_protocol'])",
        "x.py: imports fastapi, which protocol/pyproject.toml does not declare"]


def test_the_checker_reports_one_service_importing_another_and_the_client():
    src = "from bkv_hsm_proxy.core import VaultHsm\nimport importlib\nimportlib.import_module('bkv.sdk')\n"
    assert [v.split(" (")[0] for v in violations("bkv_island", {"y.py": src})] == [
        "y.py: imports bkv", "y.py: imports bkv_hsm_proxy"]


def test_the_checker_reports_a_dependency_the_client_does_not_declare():
    # aiohttp is installed here (the services declare it) but the client does not.
    assert violations("bkv", {"z.py": "import aiohttp\nfrom . import sdk\n"}) == [
        "z.py: imports aiohttp, which client/pyproject.toml does not declare"]
