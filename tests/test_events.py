"""The account's own event feed (issue #27) through real processes (the dev
fleet: etcd, SoftHSM2, hsm-proxy, islands, frontend, edge): a device reads
its events, verifies them, and detects an event that etcd or an island hid."""

from __future__ import annotations

import os

import pytest

from bkv import errors
from bkv_island.store import event_key
from bkv_protocol.encoding import user_ref
from bkv_protocol.secrets import BackupKey
from bkv_protocol.v1 import EventKind as K
from bkv_server.fleetmap import rendezvous
from conftest import unique_user

PW = "correct horse"


def _seen(feed) -> list[tuple[int, K, int]]:
    return [(e.version, e.kind, e.attempts_left) for e in feed.events]


async def _guessed_at(make_client, guesses: int):
    """A new account that registered, then ``guesses`` wrong passwords: (user, its device)."""
    user = unique_user("ev")
    device = make_client(user)
    await device.register(BackupKey(os.urandom(32)), PW)
    for _ in range(guesses):
        with pytest.raises(errors.WrongPassword):
            await device.recover("not it")
    return user, device


async def test_a_device_reads_every_change_of_its_record_signed_and_in_order(make_client, fleet):
    user, device = await _guessed_at(make_client, 2)
    await device.recover(PW)
    await device.change_password(PW, "new password")
    await device.disable("new password")
    feed = await make_client(user).events()  # another device of the account reads the same feed
    top = fleet.fleet_params["max_attempts"]
    assert _seen(feed) == [
        (1, K.REGISTERED, top), (2, K.ATTEMPT_USED, top - 1), (3, K.ATTEMPT_USED, top - 2),
        (4, K.ATTEMPT_USED, top - 3), (5, K.RECOVERED, top),            # the recovery
        (6, K.ATTEMPT_USED, top - 1), (7, K.RECOVERED, top), (8, K.PASSWORD_CHANGED, top),  # the change
        (9, K.ATTEMPT_USED, top - 1), (10, K.RECOVERED, top), (11, K.DELETED, 0)]  # the deletion
    assert feed.complete and feed.version == 11
    assert [e.at_ms for e in feed.events] == sorted(e.at_ms for e in feed.events)


async def test_an_accounts_feed_is_its_own_the_user_comes_from_the_token(make_client):
    await _guessed_at(make_client, 1)
    other = unique_user("ev")
    feed = await make_client(other).events()
    assert feed.events == () and feed.version == 0


async def test_an_event_hidden_in_etcd_is_detected_by_the_device(make_client, fleet, etcd):
    user, device = await _guessed_at(make_client, 3)
    island = rendezvous(user, fleet.spec.islands)
    # An insider hides one guess from the owner: the feed no longer chains to the signed head.
    await etcd.delete(event_key("/bkv", island, user_ref(user), 3))
    with pytest.raises(errors.BadSignature, match="hidden or altered"):
        await device.events()
    # Hiding the oldest instead leaves a chain the device can check, and a gap it reports.
    await etcd.delete(event_key("/bkv", island, user_ref(user), 2))
    await etcd.delete(event_key("/bkv", island, user_ref(user), 1))
    feed = await device.events()
    assert [e.version for e in feed.events] == [4] and feed.missing == range(1, 4) and not feed.complete


async def test_bkv_events_shows_the_accounts_changes_and_exits_15_when_it_misses_some_since_the_last_seen(
        fleet, etcd, tmp_path):
    from test_cli_backup import PW as CLI_PW
    from test_cli_backup import make_device, make_source

    user = unique_user("evcli")
    bkv = make_device(fleet, tmp_path / "home", user)
    assert bkv("backup", str(make_source(tmp_path / "src")), "--store", str(tmp_path / "store")).returncode == 0
    assert bkv("password", "change", "--password-stdin", stdin=f"{CLI_PW}\nnew password\n",
               password=None).returncode == 0
    shown = bkv("events")
    assert shown.returncode == 0, shown.stderr
    assert "key escrowed" in shown.stdout and "password changed" in shown.stdout
    assert "password attempt used" in shown.stdout and "attempts left" in shown.stdout
    last = int(shown.stdout.strip().splitlines()[-1].split("#")[1].split()[0])
    assert bkv("events", "--after", str(last)).returncode == 0
    # The changes after version 1 hidden from the feed: a device that saw version 1 is told.
    island = rendezvous(user, fleet.spec.islands)
    for version in range(1, last):
        await etcd.delete(event_key("/bkv", island, user_ref(user), version))
    hidden = bkv("events", "--after", "1")
    assert hidden.returncode == 16 and f"versions 2 to {last - 1} were not shown" in hidden.stderr
