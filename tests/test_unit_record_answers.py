"""Unit tests of the record operations as pure functions (bkv_hsm_proxy.records)
and of the bytes of their answers: the boundary holds, seals for resends
and releases an answer as ``core.json_bytes`` of the typed ``v1`` model, and
a resend compares those bytes, so they must be exactly the ones the
hand-built dicts of the build before made."""

from __future__ import annotations

import json
import os

import opaque_ke_py as opaque
import pytest

from bkv_hsm_proxy import errors, records
from bkv_hsm_proxy.core import SystemRng, json_bytes
from bkv_protocol import hsm_api as hapi
from bkv_protocol import v1
from bkv_protocol.encoding import b64e

from fakes import FakeClock

SIG, RESP, STATE, WRAPPED, NONCE, TICKET = (os.urandom(n) for n in (71, 64, 280, 64, 12, 120))


def _old_bytes(answer: dict) -> bytes:  # the encoding of the build before, verbatim
    return json.dumps(answer, separators=(",", ":")).encode()


@pytest.mark.parametrize("model,old", [
    (v1.RegistrationFinishOut(version=7, max_attempts=10, signature=SIG),
     {"version": 7, "max_attempts": 10, "signature": b64e(SIG)}),
    (v1.RecoverStartOut(credential_response=RESP, login_state=STATE, attempts_left=0, signature=SIG),
     {"credential_response": b64e(RESP), "login_state": b64e(STATE), "attempts_left": 0, "signature": b64e(SIG)}),
    (v1.RecoverFinishOut(wrapped_key=WRAPPED, rk_nonce=NONCE, record_status=v1.RecordStatus.RESET, signature=SIG,
                       ticket=TICKET),
     {"wrapped_key": b64e(WRAPPED), "rk_nonce": b64e(NONCE), "record_status": "reset", "signature": b64e(SIG),
      "ticket": b64e(TICKET)}),
    (v1.RecoverFinishOut(wrapped_key=WRAPPED, rk_nonce=NONCE, record_status=v1.RecordStatus.DESTROYED, signature=SIG),
     {"wrapped_key": b64e(WRAPPED), "rk_nonce": b64e(NONCE), "record_status": "destroyed", "signature": b64e(SIG)}),
    (v1.DeleteOut(deleted=True, version=12, signature=SIG),
     {"deleted": True, "version": 12, "signature": b64e(SIG)}),
], ids=["registration_finish", "recover_start", "recover_finish_reset", "recover_finish_destroyed", "delete"])
def test_each_typed_answer_is_held_as_the_very_bytes_of_the_dict_it_replaces(model, old):
    assert json_bytes(model) == _old_bytes(old)
    assert type(model).model_validate_json(json_bytes(model)) == model  # what the island and the SDK read back


# -- the guess limit, read in records.py alone -----------------------------------------------------
class _TokenFake:
    """A ``records.Sealer`` that seals nothing: the record operations need no token to count."""

    def sign(self, fleet, transcript) -> bytes:
        return b"sig:" + transcript(fleet or "fleet")[:8]

    def seal_transient(self, fleet, label, uid, island, data) -> bytes:
        return data

    def unseal_transient(self, fleet, label, uid, island, blob) -> bytes:
        return blob


def _context(max_attempts: int = 3) -> records.Context:
    def settled(ref, island, what):
        return None

    return records.Context(max_attempts, opaque.server_setup(), _TokenFake(), FakeClock(), SystemRng(), settled)


def _registered(ctx: records.Context, pw: bytes = b"pw") -> tuple[records.Record, hapi.Entry]:
    absent = hapi.Entry(state=hapi.EntryState.ABSENT, version=0)
    start = opaque.client_registration_start(pw)
    rs = records.registration_start(hapi.RegistrationStartIn(
        user_id="alice", island="island-a", current=absent, registration_request=start.get_message()), ctx)
    fin = opaque.client_registration_finish(pw, start.get_state(), rs.registration_response)
    done = records.registration_finish(hapi.RegistrationFinishIn(
        user_id="alice", island="island-a", request_id=os.urandom(16), current=absent, challenge=rs.challenge,
        registration_upload=fin.get_message(), ek=os.urandom(48), k_nonce=os.urandom(12)), ctx)
    assert isinstance(done.answer, v1.RegistrationFinishOut) and done.answer.version == 1
    return done.record, hapi.Entry(state=hapi.EntryState.LIVE, version=1, sealed=b"x")


def _guess(record: records.Record, version: int, ctx: records.Context, pw: bytes):
    login = opaque.client_login_start(pw)
    done = records.recover_start(hapi.RecoverStartIn(
        user_id="alice", island="island-a", request_id=os.urandom(16),
        current=hapi.Entry(state=hapi.EntryState.LIVE, version=version, sealed=b"x"),
        credential_request=login.get_message()), record, ctx)
    return login, done


def test_each_guess_returns_the_record_with_one_attempt_fewer_and_none_at_zero():
    ctx = _context(max_attempts=3)
    record, _ = _registered(ctx)
    assert record.attempts_left == 3
    _, done = _guess(record, 1, ctx, b"wrong")
    assert done.record.attempts_left == 2 and done.answer.attempts_left == 2
    _, done = _guess(done.record, 2, ctx, b"wrong")
    _, done = _guess(done.record, 3, ctx, b"wrong")
    assert done.record is None and done.answer.attempts_left == 0  # a tombstone with the last response
    assert "redacted" in repr(done) and "redacted" in repr(ctx)


def test_a_malformed_guess_costs_nothing_and_a_wrong_password_fails_uniformly():
    ctx = _context()
    record, _ = _registered(ctx)
    with pytest.raises(errors.MalformedOpaqueMessage):
        records.recover_start(hapi.RecoverStartIn(
            user_id="alice", island="island-a", request_id=os.urandom(16),
            current=hapi.Entry(state=hapi.EntryState.LIVE, version=1, sealed=b"x"), credential_request=b"\x00" * 96),
            record, ctx)
    login, done = _guess(record, 1, ctx, b"wrong")
    with pytest.raises(ValueError):
        opaque.client_login_finish(b"wrong", login.get_state(), done.answer.credential_response)
    with pytest.raises(errors.AuthenticationFailed):  # a finalization that does not verify: the one error
        records.recover_finish(hapi.RecoverFinishIn(
            user_id="alice", island="island-a", request_id=os.urandom(16),
            current=hapi.Entry(state=hapi.EntryState.LIVE, version=2, sealed=b"x"),
            login_state=done.answer.login_state, credential_finalization=os.urandom(64)), done.record, ctx)


def test_the_right_password_resets_the_attempts_and_issues_a_change_ticket():
    ctx = _context(max_attempts=3)
    record, _ = _registered(ctx)
    login, done = _guess(record, 1, ctx, b"pw")
    fin = opaque.client_login_finish(b"pw", login.get_state(), done.answer.credential_response)
    finished = records.recover_finish(hapi.RecoverFinishIn(
        user_id="alice", island="island-a", request_id=os.urandom(16),
        current=hapi.Entry(state=hapi.EntryState.LIVE, version=2, sealed=b"x"),
        login_state=done.answer.login_state, credential_finalization=fin.get_message()), done.record, ctx)
    assert finished.record.attempts_left == 3 and finished.answer.record_status is v1.RecordStatus.RESET
    assert finished.answer.ticket is not None
