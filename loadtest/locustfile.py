"""Locust scenarios against the vault, driven through the real SDK.

Scenarios (select with ``--tags`` or by user class):

* ``HonestRecovery`` (tag ``recovery``): a full OPAQUE login with the right
  password, including the client's Argon2 step, on an account of its own.
* ``GuessFlood`` (tag ``flood``): only the recovery start with a wrong
  password, across many accounts -- the path an attacker hits. Cheap for the
  client, so it measures the server.
* ``Registration`` (tag ``registration``): register a fresh key.
* ``AccountFlood`` (tag ``account-flood``): one account's guesses, sent on
  at once past every 429, across several frontends (the rate limits' test).

Configuration comes from the environment (``bkv bench`` sets it):
``BKV_LOAD_URL`` (vault address), ``BKV_LOAD_FLEET_KEY`` (pinned key, base64),
``BKV_LOAD_ISSUER_DIR`` (dev issuer that signs tokens for the seeded
accounts), ``BKV_LOAD_USERS`` (how many accounts were seeded as
``load-<i>`` with password ``pw-load-<i>``), ``BKV_LOAD_PREFIX``; with
``BKV_LOAD_EDGE_URL`` and ``BKV_LOAD_EDGE_KEY`` every simulated device has its
own Noise key and goes through Envoy (what ``bench.py`` does unless
``--plaintext``). ``BKV_LOAD_RATE_PER_USER`` (operations per second per
simulated user) paces ``HonestRecovery`` for the latency-at-half-saturation run.

Distributed: ``locust -f loadtest/locustfile.py --master`` on one machine and
``locust -f loadtest/locustfile.py --worker --master-host HOST`` on others
(same environment on every worker); see docs/performance.md.
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import time

import httpx
import opaque_ke_py as opaque
from locust import User, between, constant, events, tag, task  # noqa: F401

from bkv import errors
from bkv.sdk import VaultClientSync
from bkv.transport import NoiseTransport, tls_context
from bkv_dev.ports import Ports
from bkv_protocol.noise import StaticKey
from bkv_protocol.encoding import b64d
from bkv_protocol.secrets import BackupKey

from accounts import account as _account

URL = os.environ.get("BKV_LOAD_URL", Ports().frontend_url)  # default: `bkv dev up`'s frontend
EDGE_URL = os.environ.get("BKV_LOAD_EDGE_URL", "")   # set: go through Envoy and Noise (the real path)
EDGE_KEY = os.environ.get("BKV_LOAD_EDGE_KEY", "")
PREFIX = os.environ.get("BKV_LOAD_PREFIX", "load")
SEEDED = int(os.environ.get("BKV_LOAD_USERS", "100"))
WORKERS = int(os.environ.get("BKV_LOAD_WORKERS", "1"))
_next_account = itertools.count()


def _issuer():
    from bkv_dev.issuer import DevIssuer

    return DevIssuer.load(__import__("pathlib").Path(os.environ["BKV_LOAD_ISSUER_DIR"]))  # read-only in a pod


def account(i: int) -> tuple[str, str]:
    return _account(i, PREFIX)


class _VaultUser(User):
    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        self._issuer = _issuer()
        self._key = b64d(os.environ["BKV_LOAD_FLEET_KEY"])

    def client_for(self, user_id: str, timer: _RoundTrips | None = None) -> VaultClientSync:
        if not EDGE_URL:  # the dev fleet's plaintext path
            inner = httpx.HTTPTransport(verify=tls_context())
            return VaultClientSync(URL, self._key, user_id, self._issuer.mint(user_id),
                                   transport=timer.wrap(inner) if timer else inner)
        # As a real device: its own Noise key, a token bound to it, through Envoy.
        device = StaticKey.generate()
        token = self._issuer.mint(user_id, device_key_b64=base64.b64encode(device.public).decode())
        transport = NoiseTransport(EDGE_URL, b64d(EDGE_KEY), device)
        if timer:
            transport._http = timer.wrap(transport._http)  # handshake and requests, as sent
        return VaultClientSync(EDGE_URL, self._key, user_id, token, transport=transport)

    def timed(self, name: str, fn, expected=()):
        start = time.perf_counter()
        exc = None
        try:
            fn()
        except expected:
            pass  # an outcome the scenario expects (e.g. a wrong password)
        except Exception as e:  # noqa: BLE001 - every other failure is reported to Locust
            exc = e
        events.request.fire(request_type="bkv", name=name, response_time=(time.perf_counter() - start) * 1000,
                            response_length=0, exception=exc, context={})


class _RoundTrips:
    """Wall time spent waiting for the vault (every HTTP exchange, the Noise
    handshake included), apart from the client's own work (Argon2 above all)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, inner: httpx.BaseTransport) -> httpx.BaseTransport:
        timer = self

        class Timed(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                start = time.perf_counter()
                try:
                    resp = inner.handle_request(request)
                    resp.read()
                    return resp
                finally:
                    timer.seconds += time.perf_counter() - start

            def close(self) -> None:
                inner.close()

        return Timed()


RATE_PER_USER = float(os.environ.get("BKV_LOAD_RATE_PER_USER", "0"))


class HonestRecovery(_VaultUser):
    """Each simulated user owns one seeded account, so no two recover it at
    once. Every recovery is what a new phone does: a new device key, a new
    connection and a new Noise handshake, then the two OPAQUE round trips."""

    _last_s = 0.0

    def wait_time(self) -> float:
        if not RATE_PER_USER:
            return 0.0
        # Poisson arrivals at RATE_PER_USER: evenly spaced users would all fire
        # together and measure their own bursts, not the fleet's latency.
        return max(0.0, random.expovariate(RATE_PER_USER) - self._last_s)

    def on_start(self) -> None:
        super().on_start()
        # Distinct accounts across Locust processes too (``--processes``: BKV_LOAD_WORKERS of them).
        worker = getattr(self.environment.runner, "worker_index", 0)
        self.user_id, self.password = account((worker + next(_next_account) * WORKERS) % SEEDED)

    def _recover(self) -> None:
        started = time.perf_counter()
        timer = _RoundTrips()
        with self.client_for(self.user_id, timer) as vault:
            vault.recover(self.password)
        # The same recovery's time on the wire and in the vault, without the client's Argon2.
        events.request.fire(request_type="bkv", name="recovery round trips", response_time=timer.seconds * 1000,
                             response_length=0, exception=None, context={})
        self._last_s = time.perf_counter() - started

    @tag("recovery")
    @task
    def recover(self) -> None:
        self.timed("recovery", self._recover)


class GuessFlood(_VaultUser):
    """Wrong guesses spread over every seeded account (the limit must hold)."""

    def on_start(self) -> None:
        super().on_start()
        self.vaults = [self.client_for(account(i)[0]) for i in range(SEEDED)]
        self._cycle = itertools.cycle(self.vaults)

    def on_stop(self) -> None:
        for v in self.vaults:
            v.close()

    @tag("flood")
    @task
    def guess(self) -> None:
        vault = next(self._cycle)
        req = opaque.client_login_start(os.urandom(12)).get_message()
        self.timed("guess", lambda: vault.recover_start(req), expected=(errors.LockedOut,))


class AccountFlood(User):
    """One account's guesses as an abuser sends them (tag ``account-flood``):
    recovery starts for ``BKV_LOAD_FLOOD_USER`` spread round robin over the
    frontends in ``BKV_LOAD_FLOOD_URLS`` (comma-separated), over plain HTTP
    and without the SDK, so a 429 is never waited out. Each answer is a
    Locust request named ``account-flood <status>``. Used by
    tests/test_rate_limits.py to flood one account across frontend replicas."""

    wait_time = constant(0)

    def on_start(self) -> None:
        user = os.environ["BKV_LOAD_FLOOD_USER"]
        self._urls = itertools.cycle(os.environ["BKV_LOAD_FLOOD_URLS"].split(","))
        self._fleet_id = os.environ["BKV_LOAD_FLOOD_FLEET_ID"]
        self._http = httpx.Client(timeout=30, headers={"authorization": f"Bearer {_issuer().mint(user)}"})

    def on_stop(self) -> None:
        self._http.close()

    @tag("account-flood")
    @task
    def guess(self) -> None:
        body = {"fleet_id": self._fleet_id, "request_id": base64.b64encode(os.urandom(16)).decode(),
                "credential_request": base64.b64encode(opaque.client_login_start(os.urandom(12)).get_message()).decode()}
        start = time.perf_counter()
        exc, status = None, "failed"
        try:
            status = str(self._http.post(next(self._urls) + "/v1/recover/start", json=body).status_code)
        except httpx.HTTPError as e:
            exc = e
        events.request.fire(request_type="POST", name=f"account-flood {status}",
                            response_time=(time.perf_counter() - start) * 1000, response_length=0, exception=exc,
                            context={})


class Registration(_VaultUser):
    @tag("registration")
    @task
    def register(self) -> None:
        user = f"{PREFIX}-reg-{os.getpid()}-{next(_next_account)}"
        with self.client_for(user) as vault:
            self.timed("registration", lambda: vault.register(BackupKey(os.urandom(32)), "pw-" + user))
