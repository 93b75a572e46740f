"""Which code may import which: fakes stay in tests, the island reaches the
HSM only over its port, and the load tests stand without the test suite."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# What tests/ offers as top-level modules once it is on sys.path.
TEST_MODULES = {p.stem for p in TESTS.glob("*.py")} | {p.name for p in TESTS.iterdir() if (p / "__init__.py").exists()}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def _production_files() -> list[Path]:
    return [p for base in ("services", "src", "protocol/src", "client/src") for p in (ROOT / base).rglob("*.py")]


def test_production_code_holds_no_fakes_and_imports_nothing_from_the_tests():
    files = _production_files()
    assert len(files) > 50  # the walk found the packages
    for path in files:
        fakes = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and "Fake" in n.name]
        assert not fakes, f"{path.relative_to(ROOT)} defines {fakes}: fakes belong in tests/fakes/"
        assert not _top(_imports(path)) & TEST_MODULES, f"{path.relative_to(ROOT)} imports from tests/"


def test_the_island_imports_nothing_of_the_hsm_proxy():
    files = list((ROOT / "services" / "vault-island" / "bkv_island").rglob("*.py"))
    assert files
    for path in files:
        assert "bkv_hsm_proxy" not in _top(_imports(path)), f"{path.relative_to(ROOT)} imports bkv_hsm_proxy"


def test_the_load_tests_import_nothing_from_the_tests():
    files = list((ROOT / "loadtest").glob("*.py"))
    assert files
    for path in files:
        assert not _top(_imports(path)) & TEST_MODULES, f"{path.relative_to(ROOT)} imports from tests/"
        assert '"tests"' not in path.read_text(), f"{path.relative_to(ROOT)} puts tests/ on its path"
