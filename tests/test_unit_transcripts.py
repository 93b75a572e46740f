"""Unit tests of the signed transcripts and request fingerprints
(bkv_protocol/transcripts.py): every field of a request changes its
fingerprint, every transcript has its own label, and what the hsm-proxy
signs is exactly what the SDK verifies."""

from __future__ import annotations

import os

import pytest

from bkv_protocol import labels, transcripts
from bkv_protocol.encoding import canonical

FLEET = "0" * 32
RID = bytes(range(16))


def _fields() -> dict:
    return dict(fleet_id=FLEET, user_id="alice", request_id=RID, challenge=b"c" * 60, registration_upload=b"u" * 192,
                ek=b"e" * 48, k_nonce=b"n" * 12)


@pytest.mark.parametrize("field", ["fleet_id", "user_id", "request_id", "challenge", "registration_upload", "ek",
                                   "k_nonce"])
def test_every_field_of_a_registration_finish_changes_its_fingerprint(field):
    base = _fields()
    changed = dict(base)
    changed[field] = ("1" * 32 if field == "fleet_id" else "bob" if field == "user_id"
                      else bytes(reversed(base[field])) if field == "request_id" else base[field][:-1] + b"X")
    assert transcripts.registration_finish_request(**base) != transcripts.registration_finish_request(**changed)


def test_the_routes_fingerprint_the_same_bytes_differently():
    """A login start and a login finish can never share a fingerprint, even
    with the same field bytes: the route is inside."""
    start = transcripts.recover_start_request(FLEET, "alice", RID, b"x" * 32)
    finish = transcripts.recover_finish_request(FLEET, "alice", RID, b"x" * 32, b"")
    assert start != finish


def test_an_unpinned_fleet_and_a_pinned_one_fingerprint_differently():
    assert transcripts.recover_start_request(None, "alice", RID, b"x") != \
        transcripts.recover_start_request(FLEET, "alice", RID, b"x")


@pytest.mark.parametrize("bad", [b"", b"\0" * 15, b"\0" * 17])
def test_a_request_id_must_be_sixteen_bytes(bad):
    with pytest.raises(ValueError):
        transcripts.recover_start_request(FLEET, "alice", bad, b"x")


def test_each_signed_answer_has_its_own_label():
    req = transcripts.recover_start_request(FLEET, "alice", RID, b"x")
    made = {
        labels.SIG_REGISTRATION_START: transcripts.registration_start_answer(FLEET, "alice", b"r", b"s", b"c"),
        labels.SIG_REGISTRATION_FINISH: transcripts.registration_finish_answer(FLEET, req, 1, 10),
        labels.SIG_LOGIN_START: transcripts.recover_start_answer(FLEET, req, b"cr", 9),
        labels.SIG_LOGIN_FINISH: transcripts.recover_finish_answer(FLEET, req, b"w", b"n", "reset"),
        labels.SIG_REFUSAL: transcripts.refusal_answer(FLEET, req, transcripts.Refusal.NO_RECORD),
    }
    for label, transcript in made.items():
        assert transcript.startswith(canonical(label)), label
    assert len(set(made)) == len(made) == len({t[:60] for t in made.values()})


def test_the_two_refusals_are_not_interchangeable():
    req = transcripts.recover_start_request(FLEET, "alice", RID, b"x")
    assert transcripts.refusal_answer(FLEET, req, transcripts.Refusal.NO_RECORD) != \
        transcripts.refusal_answer(FLEET, req, transcripts.Refusal.RECORD_DESTROYED)


def test_a_kept_reply_is_bound_to_user_island_version_and_request():
    ref = "ab" * 32
    base = transcripts.reply_aad(ref, "island-a", 7, RID, b"f" * 32)
    assert base != transcripts.reply_aad("cd" * 32, "island-a", 7, RID, b"f" * 32)
    assert base != transcripts.reply_aad(ref, "island-b", 7, RID, b"f" * 32)
    assert base != transcripts.reply_aad(ref, "island-a", 8, RID, b"f" * 32)
    assert base != transcripts.reply_aad(ref, "island-a", 7, os.urandom(16), b"f" * 32)
    assert base != transcripts.reply_aad(ref, "island-a", 7, RID, b"g" * 32)


# Known answers of the account's event feed (docs/protocol.md, "The account's event feed"), for
# other SDKs (a TypeScript one) to check their chain and transcript against.
EVENT_1 = "000000000000000800000000000000010000000a72656769737465726564000000040000000a000000080000018bcfe56800"
HEAD_1 = "57c07ec04249e381695d18c129f9024f75468eb83887e3a3b0fa95400b1046da"
HEAD_2 = "539b9346d35a98ca953f6381dcd74a07b08616a9dcfea27e4e14c0c33f45d2fb"
EVENTS_ANSWER = ("00000011626b762f76312f7369672f6576656e747300000020303031313232333334343535363637373838393961616262"
                 "636364646565666600000005616c69636500000008000000000000000200000020" + HEAD_2 +
                 "00000010000102030405060708090a0b0c0d0e0f")


def test_the_event_chain_and_the_feeds_transcript_match_their_known_answers():
    e1 = transcripts.event_bytes(1, "registered", 10, 1_700_000_000_000)
    h1 = transcripts.event_chain(transcripts.EVENTS_EMPTY, e1)
    h2 = transcripts.event_chain(h1, transcripts.event_bytes(2, "attempt_used", 9, 1_700_000_060_000))
    assert (e1.hex(), h1.hex(), h2.hex()) == (EVENT_1, HEAD_1, HEAD_2)
    assert transcripts.events_answer("00112233445566778899aabbccddeeff", "alice", 2, h2,
                                     bytes(range(16))).hex() == EVENTS_ANSWER
