"""An on-path HTTP box for tests: it sits between a client and a real
upstream (the edge, the witness) and decides per request what goes back --
the upstream's answer, a forged one, or nothing (the connection is dropped).
It is the network the threat model says may lie; the parts behind it are real."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

Answer = tuple[int, dict[str, str], bytes]
# handler(method, path, body, forward) -> the answer to send, or None to drop the connection
Handler = Callable[[str, str, bytes, Callable[[], Answer]], "Answer | None"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


def passthrough(method: str, path: str, body: bytes, forward: Callable[[], Answer]) -> Answer:
    return forward()


class OnPath:
    def __init__(self, upstream: str, handler: Handler = passthrough) -> None:
        self.upstream = upstream.rstrip("/")
        self.handler = handler
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, in order
        box = self
        http = httpx.Client(timeout=30)

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                box.seen.append((self.command, self.path))

                def forward() -> Answer:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"host"}}
                    res = http.request(self.command, box.upstream + self.path, content=body, headers=headers)
                    return res.status_code, {k: v for k, v in res.headers.items() if k.lower() not in _HOP}, \
                        res.content

                answer = box.handler(self.command, self.path, body, forward)
                if answer is None:
                    self.close_connection = True
                    return
                status, headers, content = answer
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._http = http

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def __enter__(self) -> OnPath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
