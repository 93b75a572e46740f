"""Release riding on a capture, through real processes (etcd, SoftHSM2, the
hsm-proxy with its state file, island, frontend): with one hsm-proxy (1 of
1) the island captures and releases each entry in one call, so the
hsm-proxy never sees /hsm/v1/log/release, and answers still come back.

Three hsm-proxies still capture everywhere and release apart:
tests/test_hsm_boundary_forks.py; the rules: tests/test_unit_hsm_log_release_on_capture.py."""

from __future__ import annotations

import httpx
import pytest

from bkv_dev.fleet import start_fleet
from test_hsm_boundary_attacks import ISLAND, PW, device, registered


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    f = start_fleet(tmp_path_factory.mktemp("one-call"), islands=[ISLAND], replicas_per_island=1)
    yield f
    f.down()


def hsm_counted(fleet, prefix: str, label: str = "") -> float:
    """Sum of the hsm-proxies' ``prefix`` series whose labels contain ``label``."""
    total = 0.0
    for i in range(fleet.spec.hsm_proxies):
        text = httpx.get(f"http://127.0.0.1:{fleet.ports.hsm_proxy(i)}/metrics", timeout=5).text
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith(prefix + "{") and label in line)
    return total


def releases(fleet) -> float:
    return hsm_counted(fleet, "bkv_http_requests_total", 'operation="/hsm/v1/log/release"')


async def test_with_one_hsm_proxy_a_recovery_is_captured_and_released_without_a_release_call(one):
    assert one.spec.hsm_proxies == 1
    user, k = await registered(one)
    captures = hsm_counted(one, "bkv_log_captures_total", f'island="{ISLAND}"')
    async with device(one, user) as phone:
        assert (await phone.recover(PW)).key == k  # login start and finish: two entries, two answers
    assert hsm_counted(one, "bkv_log_captures_total", f'island="{ISLAND}"') >= captures + 2
    assert releases(one) == 0  # not for the registration either
    # (the same series does count the captures: the zero above is not a misread)
    assert hsm_counted(one, "bkv_http_requests_total", 'operation="/hsm/v1/log/capture"') >= 3
