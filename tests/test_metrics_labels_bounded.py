"""Issue #15 item 4: HTTP metrics are labelled by route template (or
"unmatched"), a method from a fixed set and a bounded status -- never by the
path or method a caller sent. Before, 200 requests with 4 KB paths grew the
frontend's /metrics from 33 KiB to 15 MiB, for good."""

from __future__ import annotations

import random
import string

import httpx
import pytest
from prometheus_client import REGISTRY

from bkv_server import metrics
from bkv_server.metrics import OTHER, UNMATCHED, RouteTable, http_labels, method_label, status_label

# -- the label functions (unit) -------------------------------------------------------


def test_a_declared_route_is_its_own_label_and_anything_else_is_unmatched():
    table = RouteTable(["/v1/recover/start", "/v1/fleet"])
    assert table.label("/v1/recover/start") == "/v1/recover/start"
    for path in ("/v1/recover/start/", "/v1/recover/start/x", "/V1/FLEET", "/v1/fleet\n", "", "/",
                 "/" + "a" * 4096, "/v1/recover/start?x=1", "/v1/recovery/%2e%2e"):
        assert table.label(path) == UNMATCHED, path


def test_a_templated_route_is_labelled_by_its_template_never_by_the_value():
    table = RouteTable(["/v1/users/{user}", "/files/{rest:path}", "/n/{id:int}", "/static"])
    assert table.label("/v1/users/alice") == "/v1/users/{user}"
    assert table.label("/v1/users/" + "b" * 4096) == "/v1/users/{user}"
    assert table.label("/v1/users/alice/extra") == UNMATCHED  # one segment only
    assert table.label("/v1/users/") == UNMATCHED
    assert table.label("/files/a/b/c") == "/files/{rest:path}"
    assert table.label("/static") == "/static"
    assert table.label("/n/42") == "/n/{id:int}" and table.label("/n/4/2") == UNMATCHED


def test_methods_outside_the_known_set_are_other():
    for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert method_label(m) == m
    for m in ("PROPFIND", "post", "X" * 1000, "", "GET "):
        assert method_label(m) == OTHER


def test_statuses_are_bounded_ints_or_other():
    assert [status_label(s) for s in (100, 200, 404, 599)] == ["100", "200", "404", "599"]
    for s in (99, 600, -1, 10**30, True, "200", None, 200.0):
        assert status_label(s) == OTHER


def test_http_labels_of_random_requests_come_from_a_small_fixed_set():
    table = RouteTable(["/a", "/b/{x}"])
    rng = random.Random(15)
    seen = set()
    for _ in range(2000):
        path = "/" + "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 64)))
        method = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randrange(1, 9)))
        seen.add(http_labels(table, rng.choice([path, "/a", "/b/" + path[1:]]), method, rng.randrange(-5, 2000)))
    operations = {s[0] for s in seen}
    assert operations <= {"/a", "/b/{x}", UNMATCHED}
    assert {s[1] for s in seen} <= metrics.KNOWN_METHODS | {OTHER}
    assert all(s[2] == OTHER or 100 <= int(s[2]) <= 599 for s in seen)


# -- the ASGI layers in process (unit: no network) ---------------------------------


def _label_values(service: str) -> set[str]:
    values = set()
    for family in REGISTRY.collect():
        if family.name in ("bkv_http_requests", "bkv_http_request_duration_seconds"):
            for sample in family.samples:
                if sample.labels.get("service") == service:
                    values |= {v for k, v in sample.labels.items() if k not in ("service", "le")}
    return values


async def test_rpc_app_labels_unknown_paths_unmatched_in_process():
    from pydantic import BaseModel

    from bkv_server.rpc import ErrorTable, RpcApp

    class In(BaseModel):
        x: int

    async def handler(req: In) -> In:
        return req

    app = RpcApp("test-rpc-labels", {"/t/v1/echo": (In, handler)}, errors=ErrorTable())
    rng = random.Random(4)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.post("/t/v1/echo", json={"x": 1})).status_code == 200
        for _ in range(50):
            path = "/" + "".join(rng.choice(string.ascii_letters) for _ in range(200))
            assert (await c.request(rng.choice(["POST", "PUT", "DELETE"]), path, json={})).status_code == 404
    values = _label_values("test-rpc-labels")
    assert values <= {"/t/v1/echo", UNMATCHED, "POST", "PUT", "DELETE", "200", "404"}, values
    assert UNMATCHED in values and "/t/v1/echo" in values


async def test_guard_and_measure_labels_a_fastapi_app_by_its_routes_in_process():
    from fastapi import FastAPI

    from bkv_server.service import install_common

    app = FastAPI()

    @app.get("/t/v1/items/{item}")
    async def item(item: str) -> dict:
        return {"ok": True}

    install_common(app, "test-fastapi-labels", ready=lambda: True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/t/v1/items/" + "z" * 300)).status_code == 200
        assert (await c.get("/nowhere/" + "y" * 300)).status_code == 404
        assert (await c.request("PURGE", "/t/v1/items/x")).status_code == 405
    values = _label_values("test-fastapi-labels")
    assert values <= {"/t/v1/items/{item}", UNMATCHED, "GET", OTHER, "200", "404", "405"}, values
    assert {"/t/v1/items/{item}", UNMATCHED, OTHER} <= values


# -- a real fleet: the frontend, an island and an hsm-proxy as processes -----------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PROPFIND", "PURGE", "MKCOL", "SEARCH"]
PREFIXES = ["/", "/v1/", "/v1/recover/start/", "/metrics", "/healthz/", "/island/v1/", "/hsm/v1/recover/start/"]


def _random_path(rng: random.Random, size: int = 4096) -> tuple[str, str]:
    """(path, a marker that appears in it): 4 KB of URL-safe noise after a plausible prefix."""
    marker = "zq" + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(14))
    filler = "".join(rng.choice(string.ascii_letters + string.digits + "-._~") for _ in range(size - 32))
    return rng.choice(PREFIXES) + marker + filler, marker


def _service_urls(fleet) -> dict[str, str]:
    procs = fleet.procs
    island = next(p for n, p in procs.items() if n.startswith("island"))
    hsm = next(p for n, p in procs.items() if n.startswith("hsm-proxy"))
    return {"frontend": fleet.frontend_url, "vault-island": f"http://{island.host}:{island.port}",
            "hsm-proxy": f"http://{hsm.host}:{hsm.port}", "witness": fleet.witness_url}


@pytest.mark.parametrize("service,count", [("frontend", 300), ("vault-island", 100), ("hsm-proxy", 100),
                                           ("witness", 60)])
def test_metrics_stay_bounded_under_random_paths_and_methods(fleet, service, count):
    url = _service_urls(fleet)[service]
    rng = random.Random(f"{service}-15")
    with httpx.Client(base_url=url, timeout=10.0) as c:
        # The series "unmatched" may need creating once per method and status: warm up.
        for m in METHODS:
            c.request(m, "/warm-up-unmatched", headers={"content-type": "application/json"}, content=b"{}")
        before = c.get("/metrics").text
        markers = []
        for _ in range(count):
            path, marker = _random_path(rng)
            markers.append(marker)
            resp = c.request(rng.choice(METHODS), path, headers={"content-type": "application/json"},
                             content=b"{}")
            assert resp.status_code < 500, (resp.status_code, resp.text[:200])
        after = c.get("/metrics").text
    assert "warm-up-unmatched" not in after
    leaked = [m for m in markers if m in after]
    assert not leaked, f"{len(leaked)} request paths became label values"
    # 4 KB paths: one leaked series would add more than this. Counters' digits may grow.
    assert len(after) - len(before) < 4096, (len(before), len(after))
    ops = {line.split('operation="')[1].split('"')[0] for line in after.splitlines()
           if line.startswith("bkv_http_requests_total{") and f'service="{service}"' in line}
    assert UNMATCHED in ops and all(op == UNMATCHED or op.startswith("/") and len(op) < 64 for op in ops), ops
