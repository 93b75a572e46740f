"""The suite's own subprocess discipline (tests/support/procs.py): whatever
a test starts ends with it, background children and detached daemons
included, and no test module starts a process any other way."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest

from support import procs

TESTS = Path(__file__).resolve().parent


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not procs._alive(pid):
            return True
        time.sleep(0.05)
    return False


DIRECT = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}


def _direct_calls(path: Path) -> list[int]:
    """Lines calling subprocess.X(...) in the module's own code (a script in
    a string, run by a child the helper started, is the child's business)."""
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DIRECT
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"]


def test_no_test_module_starts_a_process_outside_the_procs_helper():
    offenders = [f"{p.relative_to(TESTS)}:{n}" for p in sorted(TESTS.rglob("*.py")) if p.name != "procs.py"
                 for n in _direct_calls(p)]
    assert offenders == []


def test_the_check_finds_a_direct_call(tmp_path):
    (tmp_path / "t.py").write_text("import subprocess\nsubprocess.run(['true'])\nx = 'subprocess.run([])'\n")
    assert _direct_calls(tmp_path / "t.py") == [2]


def test_a_command_that_times_out_takes_its_background_children_with_it(tmp_path):
    pidfile = tmp_path / "child"
    with pytest.raises(procs.TimeoutExpired):
        procs.run(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=1)
    child = int(pidfile.read_text())
    assert _gone(child), "the command's background child outlived its timeout"


def test_a_command_that_returns_ends_what_it_left_running_in_its_group():
    done = procs.run(["bash", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                     timeout=30)
    assert done.returncode == 0
    assert _gone(int(done.stdout)), "a background child outlived the command that started it"


def test_stop_ends_a_spawned_process_and_its_children(tmp_path):
    pidfile = tmp_path / "child"
    proc = procs.spawn(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    procs.stop(proc)
    assert proc.returncode is not None
    assert _gone(int(pidfile.read_text()))


# A daemon in a session of its own, out of reach of the command's group, as
# cluster-up's are; the command returns once it has left the group.
DAEMON = ('setsid sleep 300 >/dev/null 2>&1 < /dev/null & p=$!; '
          'until [ "$(ps -o sid= -p $p | tr -d " ")" = "$p" ]; do sleep 0.01; done; echo $p')


def test_the_session_sweep_ends_a_detached_daemon_that_carries_the_mark_and_spares_others():
    mark, other_mark = os.urandom(8).hex(), os.urandom(8).hex()
    daemon = int(procs.run(["bash", "-c", DAEMON], env={**os.environ, procs.SESSION_MARK: mark},
                           capture_output=True, text=True, timeout=30).stdout)
    other = int(procs.run(["bash", "-c", DAEMON], env={**os.environ, procs.SESSION_MARK: other_mark},
                          capture_output=True, text=True, timeout=30).stdout)
    try:
        assert procs._alive(daemon) and procs._alive(other)
        ended = procs.sweep_session(mark)
        assert any(line.startswith(f"{daemon} ") for line in ended)
        assert _gone(daemon)
        assert procs._alive(other)
    finally:
        procs.sweep_session(other_mark)
    assert _gone(other)
