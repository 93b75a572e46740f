"""Unit tests, with in-memory fakes (no etcd process, no token), of the
password's entry points outside recovery (issue #25): a registration start
never evaluates under a live record's OPRF key; a live escrow is replaced or
deleted only with a change ticket whose proof only the device can make;
a signed refusal answers only the request of the user whose entry the log
proved. The HSM logic is the real VaultHsm; the same through real
processes: tests/test_password_entry_points.py."""

from __future__ import annotations

import os

import opaque_ke_py as opaque
import pytest

from bkv_hsm_proxy import records as hrecords
from bkv_island import errors as ierr
from bkv_protocol import hsm_api as hapi
from bkv_protocol import island_api as iapi
from bkv_protocol import transcripts
from bkv_protocol.encoding import user_ref
from bkv_server.http import UpstreamError
from test_unit_vault_logic import _register, _registered, entry, parts, records, refused  # noqa: F401  (fixture)

OPRF_ELEMENT = 32  # a Ristretto255 element: the first bytes of each OPAQUE message that carries one


async def _recovered(island, user: str, pw: bytes = b"pw") -> tuple[iapi.RecoverFinishOut, bytes]:
    """A successful recovery: its answer (with the change ticket) and the ticket's key."""
    login = opaque.client_login_start(pw)
    out = await island.recover_start(iapi.RecoverStartIn(user_id=user, request_id=os.urandom(16),
                                                     credential_request=login.get_message()))
    fin = opaque.client_login_finish(pw, login.get_state(), out.credential_response)
    done = await island.recover_finish(iapi.RecoverFinishIn(user_id=user, request_id=os.urandom(16),
                                                        login_state=out.login_state,
                                                        credential_finalization=fin.get_message()))
    return done, transcripts.ticket_key(fin.get_session_key())


async def _replacement(island, user: str, ticket: bytes | None, key: bytes | None, pw: bytes = b"new"):
    """A registration of a new password, with ``ticket`` proven under ``key``."""
    _, _, finish = await _register(island, user, pw)
    if ticket is None:
        return finish
    request = transcripts.registration_finish_request(None, user, finish.request_id, finish.challenge,
                                                      finish.registration_upload, finish.ek, finish.k_nonce, ticket)
    return finish.model_copy(update={"ticket": ticket, "ticket_proof": transcripts.ticket_proof(key, request)})


def _delete(user: str, ticket: bytes, key: bytes) -> iapi.DeleteIn:
    rid = os.urandom(16)
    request = transcripts.delete_request(None, user, rid, ticket)
    return iapi.DeleteIn(user_id=user, request_id=rid, ticket=ticket,
                         ticket_proof=transcripts.ticket_proof(key, request))


# -- every evaluation of a live record's OPRF key is an attempt ------------------------------------
async def test_a_registration_start_never_evaluates_the_password_under_the_live_records_oprf_key(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    # The same blinded element, once as a guess and once as a registration start:
    # before salted identifiers both came back evaluated under the same key.
    guess = opaque.client_login_start(b"candidate").get_message()
    as_login = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                          credential_request=guess))
    starts = [await island.registration_start(iapi.RegistrationStartIn(
        user_id="alice", registration_request=guess[:OPRF_ELEMENT])) for _ in range(2)]
    evaluated = [s.registration_response[:OPRF_ELEMENT] for s in starts]
    assert as_login.credential_response[:OPRF_ELEMENT] not in evaluated
    assert evaluated[0] != evaluated[1]  # a fresh salt for every registration start
    assert entry(etcd, "alice").version == 2  # the one guess was counted; the starts changed nothing


async def test_each_registration_gets_its_own_credential_identifier_sealed_in_its_record(parts):
    vault, island, etcd, _ = parts
    for user in ("alice", "bob"):
        await _registered(island, user)
    salts = [vault.keys.open_record(e_ref, "island-a", entry(etcd, u)).salt
             for u, e_ref in (("alice", user_ref("alice")), ("bob", user_ref("bob")))]
    assert all(len(s) == hrecords.SALT_LEN for s in salts) and salts[0] != salts[1]
    assert hrecords.credential_id(b"alice", salts[0]) != b"alice"


async def test_a_record_of_the_build_before_salts_keeps_its_identifier_and_recovers(parts, monkeypatch):
    vault, island, etcd, _ = parts
    # Registered as the build before did: the bare user id, a format-1 record.
    with monkeypatch.context() as m:
        m.setattr(hrecords, "credential_id", lambda uid, salt: uid)
        real = hrecords.Record
        m.setattr(hrecords, "Record", lambda *a: real(*a[:5]))
        await _registered(island, "old-timer")
    record = vault.keys.open_record(user_ref("old-timer"), "island-a", entry(etcd, "old-timer"))
    assert record.salt is None and record.pack()[2] == 1
    done, _ = await _recovered(island, "old-timer")  # the right password still opens it, twice
    done, _ = await _recovered(island, "old-timer")
    assert done.record_status.value == "reset" and done.ticket is not None
    assert vault.keys.open_record(user_ref("old-timer"), "island-a", entry(etcd, "old-timer")).salt is None


# -- a live escrow changes only through its password --------------------------------------------------
async def test_a_live_escrow_is_not_replaced_without_proof_of_its_password(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    before = records(etcd)
    with pytest.raises(UpstreamError) as failed:
        await island.registration_finish(await _replacement(island, "alice", None, None))
    assert refused(failed) == "password_proof_required" and records(etcd) == before


async def test_a_recoverys_ticket_replaces_the_escrow_once_and_the_old_password_stops_working(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    done, key = await _recovered(island, "alice")
    await island.registration_finish(await _replacement(island, "alice", done.ticket, key, pw=b"new"))
    again = await _replacement(island, "alice", done.ticket, key, pw=b"third")
    with pytest.raises(UpstreamError) as failed:  # single use: the escrow's version moved on
        await island.registration_finish(again)
    assert refused(failed) == "ticket_rejected"
    await _recovered(island, "alice", b"new")
    login = opaque.client_login_start(b"pw")
    out = await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                     credential_request=login.get_message()))
    with pytest.raises(ValueError):
        opaque.client_login_finish(b"pw", login.get_state(), out.credential_response)


async def test_a_ticket_relayed_by_the_island_is_useless_without_the_devices_key(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    done, _ = await _recovered(island, "alice")  # the island saw the ticket go by, not its key
    before = records(etcd)
    forged_key = os.urandom(32)
    for attempt in (await _replacement(island, "alice", done.ticket, forged_key), _delete("alice", done.ticket,
                                                                                             forged_key)):
        with pytest.raises(UpstreamError) as failed:
            await (island.registration_finish(attempt) if isinstance(attempt, iapi.RegistrationFinishIn)
                   else island.delete(attempt))
        assert refused(failed) == "ticket_rejected"
    assert records(etcd) == before


async def test_a_ticket_is_for_one_user_and_expires(parts):
    vault, island, etcd, clock = parts
    for user in ("alice", "bob"):
        await _registered(island, user)
    done, key = await _recovered(island, "alice")
    with pytest.raises(UpstreamError) as failed:
        await island.delete(_delete("bob", done.ticket, key))
    assert refused(failed) == "ticket_rejected"
    clock.ms += hrecords.TICKET_TTL_MS + 1
    with pytest.raises(UpstreamError, match="expired") as failed:
        await island.delete(_delete("alice", done.ticket, key))
    assert refused(failed) == "ticket_rejected"
    assert entry(etcd, "alice").state is hapi.EntryState.LIVE and entry(etcd, "bob").state is hapi.EntryState.LIVE


async def test_a_deletion_with_a_ticket_is_signed_over_the_devices_request(parts):
    from bkv.sdk import VaultProtocol

    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    done, key = await _recovered(island, "alice")
    delete = _delete("alice", done.ticket, key)
    out = await island.delete(delete)
    client = VaultProtocol(vault.public_key_der, "alice")
    request = transcripts.delete_request(None, "alice", delete.request_id, delete.ticket)
    client.verify(out.signature, transcripts.delete_answer(client.fleet_id, request, out.version))
    assert out.deleted and entry(etcd, "alice") .state is hapi.EntryState.DESTROYED
    assert out.version == entry(etcd, "alice").version
    # A resend gets the same signed answer; a new delete gets the signed refusal.
    assert await island.delete(delete) == out
    with pytest.raises(ierr.RecordDestroyed) as gone:
        await island.delete(_delete("alice", done.ticket, key))
    assert gone.value.signature is not None


async def test_after_its_attempts_are_spent_anyone_may_register_afresh_without_a_ticket(parts):
    vault, island, etcd, _ = parts
    await _registered(island, "alice")
    for _ in range(3):  # max_attempts=3 in the fixture
        await island.recover_start(iapi.RecoverStartIn(user_id="alice", request_id=os.urandom(16),
                                                   credential_request=opaque.client_login_start(b"x").get_message()))
    assert entry(etcd, "alice").state is hapi.EntryState.DESTROYED
    await island.registration_finish(await _replacement(island, "alice", None, None, pw=b"fresh"))
    await _recovered(island, "alice", b"fresh")


# -- a refusal answers only the request of the user the log proved --------------------------------------
async def test_a_refusal_is_signed_over_the_state_the_boundary_proved_for_the_user(parts):
    from bkv.sdk import VaultProtocol

    vault, island, etcd, _ = parts
    guess = opaque.client_login_start(b"pw").get_message()
    rid = os.urandom(16)
    with pytest.raises(ierr.NoRecord) as absent:
        await island.recover_start(iapi.RecoverStartIn(user_id="nobody", request_id=rid, credential_request=guess))
    state = absent.value.signed_state
    assert (state.island, state.version, state.retry_at) == ("island-a", 0, None)
    client = VaultProtocol(vault.public_key_der, "nobody")
    client.verify(absent.value.signature, transcripts.state_answer(client.fleet_id, "nobody", "island-a", 0,
                                                                   transcripts.Refusal.NO_RECORD))
    for user, code in (("alice", transcripts.Refusal.NO_RECORD), ("nobody", transcripts.Refusal.RECORD_DESTROYED)):
        with pytest.raises(Exception, match="signature"):
            client.verify(absent.value.signature, transcripts.state_answer(client.fleet_id, user, "island-a", 0,
                                                                           code))
    assert "fingerprint" not in hapi.RefusalIn.model_fields  # nothing a caller could pick


def test_only_the_requests_a_device_acts_on_can_be_refused_and_with_their_own_fields():
    with pytest.raises(ValueError):
        transcripts.refusable_request(transcripts.Route.REGISTRATION_FINISH, None, "u", os.urandom(16), [b"x"])
    with pytest.raises(ValueError):
        transcripts.refusable_request(transcripts.Route.RECOVER_START, None, "u", os.urandom(16), [b"a", b"b"])
    rid = os.urandom(16)
    assert transcripts.refusable_request(transcripts.Route.RECOVER_START, None, "u", rid, [b"cr"]) == \
        transcripts.recover_start_request(None, "u", rid, b"cr")


def test_a_change_tickets_repr_and_its_recoverys_never_show_the_ticket_or_its_key():
    from bkv.sdk import ChangeTicket, Recovery
    from bkv_protocol.secrets import BackupKey, TicketKey

    key, blob = os.urandom(32), os.urandom(80)
    ticket = ChangeTicket(blob, TicketKey(key))
    shown = repr(Recovery(BackupKey(os.urandom(32)), "reset", ticket))
    assert "redacted" in repr(ticket) and "redacted" in shown
    assert all(secret.hex() not in shown and repr(secret) not in shown for secret in (key, blob))
