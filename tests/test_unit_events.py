"""The account's event feed (issue #27) with in-memory fakes: the boundary
chains each change's event into the entry it makes, the island stores it
beside the entry and shows the last few, the boundary signs the committed
head, and the device's check (``bkv.sdk.verify_feed``) finds an event an
island hid or altered. The same through real processes: tests/test_events.py."""

from __future__ import annotations

import os

import opaque_ke_py as opaque
import pytest

from bkv import errors
from bkv.sdk import VaultProtocol, verify_feed
from bkv_hsm_proxy.core import VaultHsm
from bkv_island.core import Island
from bkv_island.ledger import Ledger
from bkv_island.store import StoredEvent, event_key, events_prefix
from bkv_protocol import hsm_api as hapi
from bkv_protocol import island_api as iapi
from bkv_protocol import transcripts, v1
from bkv_protocol.encoding import user_ref
from bkv_server import metrics
from fakes import InProcessHsmFake
from test_unit_vault_logic import _registered
from test_unit_vault_logic import parts as vault_parts

K = v1.EventKind


@pytest.fixture
def parts(tmp_path):
    """test_unit_vault_logic's parts, with an island that keeps 4 events per account."""
    vault, _, etcd, clock = vault_parts.__wrapped__(tmp_path)
    port = InProcessHsmFake(vault)
    island = Island("island-a", Ledger("island-a", etcd, "/bkv", port, events_kept=4), port)
    return vault, island, etcd, clock


async def _guess(island: Island, user: str, pw: bytes):
    login = opaque.client_login_start(pw)
    out = await island.recover_start(iapi.RecoverStartIn(user_id=user, request_id=os.urandom(16),
                                                         credential_request=login.get_message()))
    return login, out


async def _recover(island: Island, user: str, pw: bytes) -> None:
    login, out = await _guess(island, user, pw)
    fin = opaque.client_login_finish(pw, login.get_state(), out.credential_response)
    await island.recover_finish(iapi.RecoverFinishIn(user_id=user, request_id=os.urandom(16),
                                                     login_state=out.login_state,
                                                     credential_finalization=fin.get_message()))


async def _feed(vault: VaultHsm, island: Island, user: str, after_version: int = 0):
    nonce = os.urandom(16)
    out = await island.events(iapi.EventsIn(user_id=user, nonce=nonce))
    VaultProtocol(vault.public_key_der, user).verify(
        out.signature, transcripts.events_answer(vault.fleet_id, user, out.version, out.head, nonce))
    return out, verify_feed(out, after_version)


def _kinds(feed) -> list[tuple[int, K, int]]:
    return [(e.version, e.kind, e.attempts_left) for e in feed.events]


async def test_every_committed_change_is_an_event_numbered_by_version_and_chained_to_the_signed_head(parts):
    vault, island, etcd, clock = parts
    await _registered(island, "alice")
    clock.ms += 1000
    await _guess(island, "alice", b"wrong")
    await _recover(island, "alice", b"pw")
    out, feed = await _feed(vault, island, "alice")
    assert _kinds(feed) == [(1, K.REGISTERED, 3), (2, K.ATTEMPT_USED, 2), (3, K.ATTEMPT_USED, 1),
                            (4, K.RECOVERED, 3)]
    assert feed.events[1].at_ms == feed.events[0].at_ms + 1000  # the HSM clock's time
    assert feed.complete and out.before == transcripts.EVENTS_EMPTY and feed.version == 4
    # The head is the one in the entry the log proves: the boundary's, not the island's.
    stored = hapi.Entry.model_validate_json(etcd.kv[b"/bkv/records/island-a/" + user_ref("alice").encode()][0])
    assert stored.events_head == feed.head


async def test_the_feed_keeps_the_last_events_and_says_which_versions_it_did_not_show(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    for _ in range(2):
        await _recover(island, "alice", b"pw")  # two events each
    _, feed = await _feed(vault, island, "alice")
    assert [e.version for e in feed.events] == [2, 3, 4, 5]  # events_kept=4
    assert feed.missing == range(1, 2)
    _, seen = await _feed(vault, island, "alice", after_version=3)  # this device saw up to 3 before
    assert seen.complete
    keys = [k for k in etcd.kv if k.startswith(events_prefix("/bkv", "island-a", user_ref("alice")))]
    assert len(keys) == 4


async def test_a_destroyed_record_keeps_its_feed_and_a_new_registration_continues_the_chain(parts):
    vault, island, _, _ = parts
    await _registered(island, "alice")
    for _ in range(3):
        await _guess(island, "alice", b"wrong")
    _, feed = await _feed(vault, island, "alice")
    assert _kinds(feed)[-1] == (4, K.DESTROYED, 0)
    await _registered(island, "alice")
    _, again = await _feed(vault, island, "alice")
    assert _kinds(again)[-1] == (5, K.REGISTERED, 3) and again.events[0].version == 2


async def test_an_event_hidden_by_the_island_fails_the_devices_check(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    await _guess(island, "alice", b"wrong")
    await _guess(island, "alice", b"wrong")
    ref = user_ref("alice")
    # An island (or etcd) drops the middle event: the chain no longer reaches the signed head.
    del etcd.kv[event_key("/bkv", "island-a", ref, 2)]
    out = await island.events(iapi.EventsIn(user_id="alice", nonce=os.urandom(16)))
    with pytest.raises(errors.BadSignature, match="hidden or altered"):
        verify_feed(out)
    # It drops the last one: the chain stops short of the signed head.
    with pytest.raises(errors.BadSignature):
        verify_feed(out.model_copy(update={"events": out.events[:1]}))
    # It alters one (an attempt that was never used): no longer the chain the boundary made.
    forged = out.events[-1].model_copy(update={"attempts_left": 3})
    with pytest.raises(errors.BadSignature):
        verify_feed(out.model_copy(update={"events": [out.events[0], forged]}))


async def test_an_island_that_hides_the_oldest_events_is_seen_as_a_gap(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    await _guess(island, "alice", b"wrong")
    del etcd.kv[event_key("/bkv", "island-a", user_ref("alice"), 1)]
    _, feed = await _feed(vault, island, "alice")
    assert [e.version for e in feed.events] == [2] and feed.missing == range(1, 2) and not feed.complete


async def test_an_account_without_a_record_gets_an_empty_signed_feed(parts):
    vault, island, _, _ = parts
    out, feed = await _feed(vault, island, "nobody")
    assert feed.events == () and feed.version == 0 and feed.complete and out.head == transcripts.EVENTS_EMPTY


async def test_an_event_is_stored_only_with_its_change_and_counted_by_kind_without_a_user(parts):
    vault, island, etcd, _ = parts
    before = metrics.child(metrics.ACCOUNT_EVENTS, "registered")._value.get()  # noqa: SLF001
    await _registered(island, "alice")
    assert metrics.child(metrics.ACCOUNT_EVENTS, "registered")._value.get() == before + 1  # noqa: SLF001
    (key,) = [k for k in etcd.kv if k.startswith(b"/bkv/events/")]
    assert StoredEvent.model_validate_json(etcd.kv[key][0]).before == transcripts.EVENTS_EMPTY
    assert all("user" not in label for label in metrics.ACCOUNT_EVENTS._labelnames)  # noqa: SLF001


def test_entries_from_before_the_feed_keep_their_log_digest():
    old = hapi.Entry(state=hapi.EntryState.DESTROYED, version=3)
    assert hapi.entry_digest(old) == hapi.entry_digest(hapi.Entry.model_validate_json(old.model_dump_json()))
    assert "events_head" not in old.model_dump_json()
    assert hapi.entry_digest(old) != hapi.entry_digest(old.model_copy(update={"events_head": bytes(32)}))


async def test_a_move_carries_the_feed_only_as_a_run_that_chains_to_the_moved_entrys_head(parts):
    from bkv_island.store import carried

    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    await _recover(island, "alice", b"pw")
    ref = user_ref("alice")
    stored = await island._ledger.events(ref, 3)
    head = island._ledger.current(ref).events_head
    assert [e.event.version for e in carried(stored, head, 3, 64)] == [1, 2, 3]
    assert [e.event.version for e in carried(stored, head, 3, 2)] == [2, 3]  # the new island's own limit
    assert carried(stored[::-1], head, 3, 64) == carried(stored, head, 3, 64)  # order as sent does not matter
    # What no device would accept is not stored: a hole, an altered event, a
    # run that stops short of the moved version, or a head it does not reach.
    assert carried([stored[0], stored[2]], head, 3, 64) == []
    altered = stored[1].model_copy(update={"event": stored[1].event.model_copy(update={"attempts_left": 3})})
    assert carried([stored[0], altered, stored[2]], head, 3, 64) == []
    assert carried(stored[:2], head, 3, 64) == []
    assert carried(stored, bytes(32), 3, 64) == [] and carried(stored, None, 3, 64) == []
    # The oldest missing is fine: the run chains from its first event's `before`.
    assert [e.event.version for e in carried(stored[1:], head, 3, 64)] == [2, 3]
