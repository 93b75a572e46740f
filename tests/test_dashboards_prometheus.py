"""A real Prometheus (Debian's) scrapes the local fleet under a short load,
and every PromQL expression of every dashboard panel returns at least one
series -- so no panel of the chart's dashboards is wired to a metric that
does not exist or is never exported."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bkv import errors
from bkv.sdk import VaultClient
from bkv.transport import AsyncNoiseTransport
from bkv_protocol.encoding import b64d
from bkv_protocol.secrets import BackupKey
from bkv_protocol.noise import StaticKey
from support import procs

DASHBOARDS = Path(__file__).resolve().parent.parent / "charts" / "backup-key-vault" / "dashboards"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def scrape_config(fleet) -> str:
    ports = fleet.ports
    jobs = {
        "frontend": [f"127.0.0.1:{ports.frontend}"],
        "hsm-proxy": [f"127.0.0.1:{ports.hsm_proxy(i)}" for i in range(ports.hsm_proxies)],
        "vault-island": [f"127.0.0.1:{ports.island(j, r)}" for j in range(len(ports.islands))
                         for r in range(ports.replicas_per_island)],
        "etcd": [f"127.0.0.1:{ports.etcd_client(i)}" for i in range(ports.etcd_members)],
        "noise-processor": [f"127.0.0.1:{ports.processor_metrics}"],
    }
    lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s", "scrape_configs:"]
    for job, targets in jobs.items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(targets)}"]
    lines += ["  - job_name: envoy", "    metrics_path: /stats/prometheus", "    static_configs:",
              f"      - targets: [\"127.0.0.1:{ports.envoy_admin}\"]"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prometheus(fleet, tmp_path_factory):
    assert os.path.exists(PROMETHEUS), "Prometheus is missing: run `bash scripts/setup.sh` (Debian package prometheus)"
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(scrape_config(fleet))
    port = _free_port()
    log = open(work / "prometheus.log", "wb")
    proc = procs.spawn([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        procs.stop(proc)
        log.close()


def query(url: str, expr: str) -> list:
    res = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert res["status"] == "success", res
    return res["data"]["result"]


async def short_load(fleet, users: int = 4) -> None:
    """Registrations, recoveries, wrong guesses and one lockout, through Envoy
    and the Noise processor, so every kind of outcome has been counted."""
    fleet_key = b64d(fleet.fleet_params["fleet_public_key"])

    def client(user: str) -> VaultClient:
        device = StaticKey.generate()
        token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device.public).decode())
        return VaultClient(fleet.edge_url, fleet_key, user, token,
                           transport=AsyncNoiseTransport(fleet.edge_url, b64d(fleet.edge_public_key), device))

    stamp = os.urandom(4).hex()
    for i in range(users):
        async with client(f"dash-{stamp}-{i}") as vault:
            await vault.register(BackupKey(os.urandom(32)), "right")
            await vault.recover("right")
            with pytest.raises(errors.WrongPassword):
                await vault.recover("wrong")
    async with client(f"dash-{stamp}-locked") as vault:
        await vault.register(BackupKey(os.urandom(32)), "right")
        for _ in range(fleet.spec.max_attempts):
            try:
                await vault.recover("wrong")
            except (errors.WrongPassword, errors.LockedOut):
                pass
        with pytest.raises(errors.LockedOut):
            await vault.recover("right")


async def test_every_dashboard_query_returns_a_series_from_a_real_prometheus(fleet, prometheus):
    # Every target scraped once before the load, so rates see the counters move.
    targets = scrape_config(fleet).count("127.0.0.1:")
    deadline = time.monotonic() + 30
    while len(query(prometheus, "up == 1")) < targets:
        assert time.monotonic() < deadline, f"targets down: {query(prometheus, 'up == 0')}"
        time.sleep(0.2)
    await short_load(fleet)
    deadline = time.monotonic() + 60
    while not query(prometheus, "sum(increase(bkv_lockout_hits_total[1m])) > 0"):
        assert time.monotonic() < deadline, "Prometheus never saw the load"
        time.sleep(0.5)
    queries = dashboard_queries()
    assert len(queries) >= 25
    empty: list[str] = []
    deadline = time.monotonic() + 30
    for board, title, expr in queries:
        while not query(prometheus, expr):
            if time.monotonic() > deadline:
                empty.append(f"{board} / {title}: {expr}")
                break
            time.sleep(0.5)
    assert not empty, "dashboard queries with no series:\n" + "\n".join(empty)


def test_no_metric_of_the_fleet_carries_a_user_id_label(fleet, prometheus):
    names = query(prometheus, '{__name__=~"bkv_.+"}')
    assert names
    labels = {k for series in names for k in series["metric"]}
    assert not labels & {"user", "user_id", "user_ref", "account", "sub"}
