"""Unit tests of shared pieces: labels, encoding, secrets, retry, routing, settings."""

from __future__ import annotations

import pickle

import pytest

from bkv_protocol import labels
from bkv_protocol.encoding import canonical
from bkv_server.fleetmap import rendezvous
from bkv_protocol.retry import Backoff, DeadlineExceeded, retry
from bkv_protocol.secrets import BackupKey, Password


def test_every_domain_separation_label_is_distinct_and_versioned():
    values = [v for k, v in vars(labels).items() if k.isupper()]
    assert len(values) == len(set(values)) >= 15
    assert all(v.startswith(b"bkv/v1/") for v in values)


def test_canonical_encoding_never_confuses_field_boundaries():
    assert canonical(b"l", b"ab", b"c") != canonical(b"l", b"a", b"bc")
    assert canonical(b"l", b"") != canonical(b"l")
    assert canonical(b"l1", b"x") != canonical(b"l", b"1x")


def test_secrets_print_as_redacted_and_refuse_pickling():
    k = BackupKey(b"\x01" * 32)
    assert repr(k) == "BackupKey(redacted)" and str(Password(b"hunter2")) == "Password(redacted)"
    assert "01" * 32 not in f"{k!r} {k}"
    with pytest.raises(TypeError):
        pickle.dumps(k)
    with pytest.raises(ValueError):
        BackupKey(b"short")


async def test_retry_gives_up_at_the_deadline_with_the_last_error_as_cause():
    now = {"t": 0.0}
    calls = []

    async def op(n):
        calls.append(n)
        raise ConnectionError(f"try {n}")

    async def fake_sleep(s):
        now["t"] += s

    with pytest.raises(DeadlineExceeded) as exc:
        await retry(op, retry_on=lambda e: isinstance(e, ConnectionError),
                    backoff=Backoff(deadline_s=1.0, first_delay_s=0.1), clock=lambda: now["t"], sleep=fake_sleep)
    assert isinstance(exc.value.__cause__, ConnectionError)
    assert 3 <= len(calls) <= 12 and calls == list(range(len(calls)))


async def test_retry_does_not_retry_errors_it_was_not_told_about():
    async def op(n):
        raise KeyError("no")

    with pytest.raises(KeyError):
        await retry(op, retry_on=lambda e: False)


def test_adding_an_island_moves_only_the_users_that_now_hash_to_it():
    users = [f"user-{i}" for i in range(3000)]
    before = {u: rendezvous(u, ["a", "b"]) for u in users}
    after = {u: rendezvous(u, ["a", "b", "c"]) for u in users}
    moved = [u for u in users if before[u] != after[u]]
    assert all(after[u] == "c" for u in moved)
    assert 800 < len(moved) < 1200  # about a third


def test_settings_refuse_a_placeholder_pin_outside_dev(monkeypatch):
    from pydantic import ValidationError

    from bkv_hsm_proxy.settings import HsmProxySettings

    monkeypatch.setenv("BKV_HSM_USER_PIN", "1234")
    monkeypatch.setenv("BKV_ENV", "prod")
    with pytest.raises(ValidationError, match="placeholder"):
        HsmProxySettings()
    monkeypatch.setenv("BKV_ENV", "dev")
    assert HsmProxySettings().user_pin.get_secret_value() == "1234"
    assert "1234" not in repr(HsmProxySettings())
