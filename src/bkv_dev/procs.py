"""Process supervision for the local fleet: start a part in its own session
with its output in ``<state>/logs/<name>.log``, wait until it is ready, stop
it; and :func:`wait_until`, the one poll-until-deadline helper."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class FleetError(Exception):
    """The fleet could not be brought up; the message says what to do."""


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``check()`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last_exc = exc
        time.sleep(interval_s)
    raise FleetError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f" ({last_exc})" if last_exc else ""))


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def reap(pid: int | None) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, TypeError):
        pass


def signal_group(pid: int | None, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    health: str | None  # URL polled for readiness; None for etcd (TCP check)
    pid: int | None = None
    netns: str | None = None  # the site's network namespace, with --sites
    host: str = "127.0.0.1"  # where its port is reached from the root namespace

    def listening(self) -> bool:
        return port_in_use(self.port, self.host)


class Supervisor:
    """Starts, watches and stops the processes of one state directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.logs = state / "logs"

    def start(self, p: Proc) -> None:
        if alive(p.pid):
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{p.name}.log", "ab")
        argv = ["ip", "netns", "exec", p.netns, *p.argv] if p.netns else p.argv
        proc = subprocess.Popen(argv, env={**os.environ, **p.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.state)
        log.close()
        p.pid = proc.pid

    def wait_ready(self, p: Proc, timeout_s: float) -> None:
        """Until its health URL answers 200 (or, without one, its port listens);
        a part that exits meanwhile fails at once, with its log's last lines."""
        if not p.health:
            wait_until(p.listening, timeout_s, f"{p.name} on port {p.port}")
            return

        def ok() -> bool:
            if not alive(p.pid):
                raise FleetError(f"{p.name} exited; see {self.logs / (p.name + '.log')}")
            return httpx.get(p.health, timeout=1.0).status_code == 200

        try:
            wait_until(ok, timeout_s, f"{p.name} to become ready")
        except FleetError as exc:
            raise FleetError(f"{exc}\n--- last lines of {p.name}.log ---\n{self.log_tail(p.name)}") from None

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    @staticmethod
    def state_of(p: Proc) -> str:
        """ready, starting (alive, not ready yet) or stopped."""
        if not alive(p.pid):
            return "stopped"
        if p.health:
            try:
                healthy = httpx.get(p.health, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                healthy = False
        else:
            healthy = p.listening()
        return "ready" if healthy else "starting"

    @staticmethod
    def kill(p: Proc, sig: int = signal.SIGKILL) -> None:
        if alive(p.pid):
            signal_group(p.pid, sig)
            if sig == signal.SIGKILL:
                wait_until(lambda: not alive(p.pid), 10, f"{p.name} to exit")
                reap(p.pid)

    @staticmethod
    def stop(procs: list[Proc]) -> None:
        """SIGTERM to all (services first, etcd last, so nothing logs a burst of
        etcd errors on the way down), then SIGKILL to whatever outlives 10 s."""
        for p in sorted(procs, key=lambda p: p.name.startswith("etcd")):
            if alive(p.pid):
                signal_group(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                wait_until(lambda p=p: not alive(p.pid), 10, f"{p.name} to stop")
            except FleetError:
                signal_group(p.pid, signal.SIGKILL)
            reap(p.pid)
            p.pid = None
