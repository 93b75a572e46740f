"""Subprocesses the tests start, each in a process group of its own, so that
nothing the suite starts outlives the test or fixture that started it.

``subprocess.run(..., timeout=)`` kills only its direct child: a script's own
children (a build, a daemon it waits for) go on as orphans and compete with
the next tests for the two cores. :func:`run` starts the child as the leader
of a new session and, when it returns, times out or is interrupted (Ctrl-C,
pytest-timeout's signal), ends the whole group. :func:`spawn` is Popen in a
new session, remembered until :func:`stop` ends its group; whatever is still
alive at the end of the session is ended by :func:`stop_all` (conftest).

Processes that must outlive the call on purpose start a session of their own
(``setsid``, ``start_new_session``), as the fleet's supervisor and
cluster-up's daemons do, and are stopped by the fixture that owns them
(``Fleet.down``, ``cluster-down.sh``).

Every test goes through here: tests/test_unit_test_procs.py checks that no
test module calls ``subprocess.run`` or ``subprocess.Popen`` itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from subprocess import CompletedProcess, TimeoutExpired  # noqa: F401  (re-exported for callers)

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
CalledProcessError = subprocess.CalledProcessError

_spawned: list[subprocess.Popen] = []


def end_group(pgid: int, grace_s: float = 5.0, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM to the group, then SIGKILL to whatever is left after
    ``grace_s``. A ``leader`` of ours is reaped meanwhile: unreaped, it would
    keep the group in existence as a zombie."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(args, *, timeout: float | None = None, check: bool = False, input=None, capture_output: bool = False,
        **kwargs) -> CompletedProcess:
    """``subprocess.run`` with the child as a process-group leader; its whole
    group is ended on return, on timeout and on any interruption."""
    kwargs.setdefault("start_new_session", True)
    if input is not None:
        kwargs["stdin"] = PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = PIPE
    with subprocess.Popen(args, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            end_group(proc.pid, grace_s=2.0, leader=proc)
            proc.wait()
            raise
        finally:
            # A background child the command left behind (its group) ends with it.
            if kwargs["start_new_session"]:
                end_group(proc.pid, grace_s=2.0)
    result = CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def spawn(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session; :func:`stop` (or the session's
    end) ends its group."""
    kwargs.setdefault("start_new_session", True)
    proc = subprocess.Popen(args, **kwargs)
    _spawned.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> int | None:
    """Ends ``proc``'s process group and reaps ``proc``; its exit code."""
    end_group(proc.pid, grace_s, leader=proc)
    try:
        return proc.wait(timeout=grace_s)
    except TimeoutExpired:
        proc.kill()
        return proc.wait()
    finally:
        if proc in _spawned:
            _spawned.remove(proc)


def stop_all() -> list[str]:
    """Ends every spawned group still alive; what it ended, for the report."""
    ended = []
    for proc in list(_spawned):
        if proc.poll() is None:
            ended.append(" ".join(map(str, proc.args))[:120])
        stop(proc, grace_s=2.0)
    return ended


SESSION_MARK = "BKV_TEST_SESSION"


def sweep_session(mark: str) -> list[str]:
    """Ends every process on the machine whose environment carries
    ``BKV_TEST_SESSION=mark`` (every process the suite started inherits it,
    detached daemons included), other than this one. The last net, after
    every fixture's own teardown; what it ended, for the report."""
    me = os.getpid()
    needle = f"{SESSION_MARK}={mark}".encode()
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if needle not in env:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((int(entry), cmd))
    for pid, _ in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p, _ in found):
        time.sleep(0.05)
    for pid, _ in found:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return [f"{pid} {cmd[:120]}" for pid, cmd in found]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
