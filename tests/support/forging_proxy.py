"""A keyless forging proxy for tests: the attacker of issue #15, who sits on
the network path in front of Envoy, sees only the clear outer HTTP and holds
no key (not the edge's, not the fleet's, not the device's).

It listens on loopback, forwards every request to the fleet's Noise edge
(``fleet.edge_url``), and, by a per-test script of :class:`Fault` rules,
for chosen requests (by outer path and by the index of the request on that
path) can:

- ``forge``: forward the sealed request to the edge, read the edge's real
  answer, then give the client a forged clear answer instead;
- ``drop``: forward, read the answer, then cut the client's connection;
- ``forge_only``: answer with a forged clear answer without forwarding.

Everything it did is recorded (:attr:`ForgingProxy.log`), so a test can
prove the fault happened while the client ran: e.g. that a forged 503 came
after the edge answered 200 to a sealed request it had really forwarded.

It runs its own asyncio loop in a thread, so blocking code (a ``bkv``
subprocess, ``subprocess.run``) and the tests' own loop can both use it.
The server side is a small HTTP/1.1 reader on ``asyncio.start_server`` (so
``drop`` can abort the exact connection); the upstream side is aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from support import procs

NOISE = "/noise/v1"
HANDSHAKE = "/noise/handshake"
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "host"}


def error_body(code: str, message: str, retryable: bool = False) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "retryable": retryable}}).encode()


# The forged clear answers of the issue. Each is (status, body).
def unavailable() -> tuple[int, bytes]:
    return 503, error_body("unavailable", "the vault is unavailable; try again", True)


def session_unknown() -> tuple[int, bytes]:
    return 401, error_body("noise_session_unknown", "unknown or expired Noise session")


def no_record() -> tuple[int, bytes]:
    return 404, error_body("no_record", "no key is escrowed for this account")


PERSUASION = "Your backup key was destroyed. Run `bkv backup --new-key --yes-abandon-old-backups` to start over."


def record_destroyed(status: int = 410) -> tuple[int, bytes]:
    # The message is the trap by persuasion: it tells the user what to run.
    return status, error_body("record_destroyed", PERSUASION)


@dataclass
class Fault:
    """One rule of a script. ``indices``: which requests on ``path`` it applies
    to, counted from 0 since the script was set (None: every one)."""

    action: str                       # "forge" | "drop" | "forge_only"
    answer: tuple[int, bytes] = field(default_factory=unavailable)
    path: str = NOISE
    indices: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if self.action not in ("forge", "drop", "forge_only"):
            raise ValueError(f"unknown action {self.action!r}")
        if self.indices is not None:
            self.indices = frozenset(self.indices)

    def applies(self, path: str, index: int) -> bool:
        return path == self.path and (self.indices is None or index in self.indices)


@dataclass(frozen=True)
class Exchange:
    """One request as the proxy handled it."""

    path: str
    index: int                  # its index on this path since the script was set
    action: str                 # "forwarded", "forged", "dropped", "forged_only"
    upstream_status: int | None  # what the edge answered (None: not forwarded)
    client_status: int | None    # what the client got (None: the connection was cut)
    request_bytes: int
    at: float


class ForgingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._faults: list[Fault] = []
        self._counts: dict[str, int] = {}
        self._log: list[Exchange] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"ForgingProxy({self.url} -> {self.upstream})"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the script --------------------------------------------------------------
    def script(self, *faults: Fault) -> None:
        """Replace the script; request indices count from 0 again."""
        with self._lock:
            self._faults = list(faults)
            self._counts = {}

    def clear(self) -> None:
        self.script()

    @property
    def log(self) -> list[Exchange]:
        with self._lock:
            return list(self._log)

    def faulted(self, action: str | None = None) -> list[Exchange]:
        """The exchanges the proxy forged or dropped (optionally one action)."""
        return [e for e in self.log if e.action != "forwarded" and (action is None or e.action == action)]

    def _decide(self, path: str) -> tuple[int, Fault | None]:
        with self._lock:
            index = self._counts.get(path, 0)
            self._counts[path] = index + 1
            return index, next((f for f in self._faults if f.applies(path, index)), None)

    def _record(self, *args) -> None:
        with self._lock:
            self._log.append(Exchange(*args, at=time.monotonic()))

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> ForgingProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._open())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="forging-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the forging proxy did not start")
        return self

    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self._server.close()
        await self._session.close()

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> ForgingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP/1.1, the client side -------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
                lower = {k.lower(): v for k, v in headers}
                if "chunked" in lower.get("transfer-encoding", "").lower():
                    await self._write(writer, 501, b'{"error":"the forging proxy reads Content-Length bodies only"}')
                    return
                body = await reader.readexactly(int(lower.get("content-length", "0")))
                if not await self._handle(method, target, headers, body, writer):
                    return
                if lower.get("connection", "").lower() == "close":
                    return
        finally:
            if not writer.is_closing():
                writer.close()

    async def _write(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                     content_type: str = "application/json") -> None:
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                     "connection: keep-alive\r\n\r\n".encode() + body)
        await writer.drain()

    async def _handle(self, method: str, target: str, headers, body: bytes, writer) -> bool:
        """Answer one request; False when the connection was cut."""
        path = target.split("?", 1)[0]
        index, fault = self._decide(path)
        if fault is not None and fault.action == "forge_only":
            await self._write(writer, *fault.answer)
            self._record(path, index, "forged_only", None, fault.answer[0], len(body))
            return True
        async with self._session.request(method, self.upstream + target, data=body,
                                         headers=[(k, v) for k, v in headers if k.lower() not in _HOP]) as resp:
            content = await resp.read()
            status, ctype = resp.status, resp.headers.get("content-type", "application/octet-stream")
        if fault is None:
            await self._write(writer, status, content, ctype)
            self._record(path, index, "forwarded", status, status, len(body))
            return True
        if fault.action == "drop":
            writer.transport.abort()
            self._record(path, index, "dropped", status, None, len(body))
            return False
        await self._write(writer, *fault.answer)
        self._record(path, index, "forged", status, fault.answer[0], len(body))
        return True
