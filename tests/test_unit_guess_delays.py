"""Wrong guesses spaced out by the HSM's clock, and refusals signed once per
record state (issue #27), with in-memory fakes (a fake token, etcd and
clock; the record operations, the boundary, the log and the island are the
real ones). Through real processes: tests/test_guess_delays.py."""

from __future__ import annotations

import os

import opaque_ke_py as opaque
import pytest
from pydantic import ValidationError

from bkv.sdk import Call, VaultProtocol
from bkv_hsm_proxy import records as hrecords
from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.nvram import StateFile
from bkv_hsm_proxy.settings import HsmProxySettings
from bkv_island import errors as ierr
from bkv_island.core import Island
from bkv_island.ledger import Ledger
from bkv_protocol import island_api as iapi
from bkv_protocol import transcripts
from bkv_protocol.encoding import pack16, u32
from bkv_protocol.wire import ErrorCode
from bkv_server.http import UpstreamError
from fakes import FakeClock, InMemoryEtcdFake, InMemoryHsmFake, InProcessHsmFake, with_island_set

RECORDS = b"/bkv/records/island-a/"
SCHEDULE = hrecords.DEFAULT_GUESS_DELAYS_S


class _CountingHsmFake(InMemoryHsmFake):
    """The in-memory token, counting its signatures."""

    signed = 0

    def sign(self, message: bytes, gen: int = 0) -> bytes:
        self.signed += 1
        return super().sign(message, gen)


@pytest.fixture
def parts(tmp_path):
    hsm = _CountingHsmFake()
    VaultHsm.create_opaque_setup(hsm)
    hsm.admin = with_island_set(hsm)
    clock = FakeClock()
    vault = VaultHsm(hsm, max_attempts=10, guess_delays_s=SCHEDULE, clock=clock)
    state = StateFile(tmp_path / "state")
    state.load()
    vault.attach_log(state, "hsm-0", ["hsm-0"])
    etcd = InMemoryEtcdFake()
    port = InProcessHsmFake(vault)
    return vault, Island("island-a", Ledger("island-a", etcd, "/bkv", port), port), etcd, clock, hsm


def _records(etcd) -> dict:
    return {k: v for k, (v, _) in etcd.kv.items() if k.startswith(RECORDS) or b"/log/" in k}


async def _register(island, user: str, pw: bytes = b"pw") -> None:
    start = opaque.client_registration_start(pw)
    out = await island.registration_start(iapi.RegistrationStartIn(user_id=user,
                                                                   registration_request=start.get_message()))
    fin = opaque.client_registration_finish(pw, start.get_state(), out.registration_response)
    await island.registration_finish(iapi.RegistrationFinishIn(
        user_id=user, request_id=os.urandom(16), challenge=out.challenge, registration_upload=fin.get_message(),
        ek=os.urandom(48), k_nonce=os.urandom(12)))


async def _guess(island, user: str, pw: bytes):
    """A recover start, and the finish if its OPAQUE step passes (the right password)."""
    login = opaque.client_login_start(pw)
    out = await island.recover_start(iapi.RecoverStartIn(user_id=user, request_id=os.urandom(16),
                                                         credential_request=login.get_message()))
    try:
        fin = opaque.client_login_finish(pw, login.get_state(), out.credential_response)
    except ValueError:
        return out.attempts_left
    return await island.recover_finish(iapi.RecoverFinishIn(
        user_id=user, request_id=os.urandom(16), login_state=out.login_state,
        credential_finalization=fin.get_message()))


async def _wrong_a_day_apart(island, clock, times: int) -> None:
    for _ in range(times):
        clock.ms += 24 * 3600_000
        await _guess(island, "alice", b"wrong")


def _device_believes(vault, user: str, exc: UpstreamError, code: transcripts.Refusal) -> bool:
    """What the SDK decides of this error answer (bkv.sdk: the same transcript the boundary signed)."""
    err = exc.body.error
    return VaultProtocol(vault.public_key_der, user).refusal_is_signed(
        Call("POST", "/v1/recover/start", None, None), code, err.signature, err.state)


# -- the record's format --------------------------------------------------------------------
def test_records_of_formats_one_and_two_open_as_no_delay_and_format_three_keeps_the_not_before_time():
    pf, ek, kn, salt = os.urandom(100), os.urandom(48), os.urandom(12), os.urandom(hrecords.SALT_LEN)
    one = hrecords.Record.unpack(pack16(b"\x01", pf, ek, kn, u32(7), u32(10)))
    two = hrecords.Record.unpack(pack16(b"\x02", pf, ek, kn, u32(7), u32(10), salt))
    assert (one.salt, one.not_before_ms, one.attempts_left) == (None, 0, 7)
    assert (two.salt, two.not_before_ms) == (salt, 0)
    assert one.pack()[2] == 1 and two.pack()[2] == 2  # never waited: written as it was
    for record in (one, two):
        waiting = hrecords.Record(record.password_file, ek, kn, 6, 10, record.salt, 1_700_000_123_456)
        packed = waiting.pack()
        assert packed[2] == hrecords.RECORD_FORMAT == 3
        assert hrecords.Record.unpack(packed) == waiting  # format 1's bare user id stays (no salt)
    with pytest.raises(ValueError):
        hrecords.Record.unpack(pack16(b"\x09", pf, ek, kn, u32(7), u32(10), salt))


def test_the_schedule_after_ios_makes_ten_wrong_guesses_take_about_a_day():
    waits = [hrecords.guess_delay_ms(SCHEDULE, spent) for spent in range(1, 10)]  # between guesses 1..10
    assert waits[:3] == [0, 0, 0] and 20 * 3600_000 <= sum(waits) <= 26 * 3600_000
    assert hrecords.guess_delay_ms(SCHEDULE, 50) == 1000 * SCHEDULE[-1]  # past the end: the last again
    assert hrecords.guess_delay_ms((), 5) == 0


def test_a_schedule_outside_its_bounds_is_refused_at_start_up(monkeypatch):
    monkeypatch.setenv("BKV_HSM_USER_PIN", "a-real-looking-pin-for-this-test")
    for bad in ("[-1]", f"[{hrecords.MAX_GUESS_DELAY_S + 1}]", "[\"soon\"]"):
        monkeypatch.setenv("BKV_HSM_GUESS_DELAYS_S", bad)
        with pytest.raises(ValidationError):
            HsmProxySettings()
    monkeypatch.setenv("BKV_HSM_GUESS_DELAYS_S", "[]")
    assert HsmProxySettings().guess_delays_s == ()
    monkeypatch.delenv("BKV_HSM_GUESS_DELAYS_S")
    assert HsmProxySettings().guess_delays_s == SCHEDULE  # the production default


# -- the delay, by the HSM's clock ------------------------------------------------------------
async def test_ten_wrong_guesses_follow_the_schedule_and_one_too_early_spends_nothing(parts):
    vault, island, etcd, clock, _ = parts
    await _register(island, "alice")
    started = clock.ms
    for spent in range(1, 11):
        if spent > 1:
            wait = hrecords.guess_delay_ms(SCHEDULE, spent - 1)
            if wait:
                clock.ms += wait - 1  # a millisecond early: refused, signed, nothing spent
                before = _records(etcd)
                with pytest.raises(UpstreamError) as early:
                    await _guess(island, "alice", b"wrong")
                err = early.value.body.error
                assert early.value.status == 423 and err.code is ErrorCode.TOO_EARLY
                assert err.state.retry_at == clock.ms + 1 and err.state.version == spent  # the record's version
                assert _device_believes(vault, "alice", early.value, transcripts.Refusal.TOO_EARLY)
                assert not _device_believes(vault, "bob", early.value, transcripts.Refusal.TOO_EARLY)
                assert _records(etcd) == before
                clock.ms += 1
        assert await _guess(island, "alice", b"wrong") == 10 - spent  # at its time: one attempt spent
    assert clock.ms - started == sum(hrecords.guess_delay_ms(SCHEDULE, n) for n in range(1, 10))
    with pytest.raises(ierr.RecordDestroyed):
        await _guess(island, "alice", b"pw")


async def test_a_right_password_resets_the_count_and_the_delay(parts):
    vault, island, etcd, clock, _ = parts
    await _register(island, "alice")
    await _wrong_a_day_apart(island, clock, 5)
    with pytest.raises(UpstreamError) as early:
        await _guess(island, "alice", b"pw")  # even the right one waits: the HSM cannot tell before it evaluates
    assert early.value.body.error.code is ErrorCode.TOO_EARLY
    clock.ms = early.value.body.error.state.retry_at
    assert (await _guess(island, "alice", b"pw")).record_status.value == "reset"
    for left in (9, 8, 7, 6):  # no wait left over, and the first four free again
        assert await _guess(island, "alice", b"wrong") == left


async def test_a_forged_or_unsigned_too_early_is_not_believed(parts):
    vault, island, _, clock, _ = parts
    await _register(island, "alice")
    for _ in range(4):
        await _guess(island, "alice", b"wrong")
    with pytest.raises(UpstreamError) as early:
        await _guess(island, "alice", b"wrong")
    err = early.value.body.error
    later = err.state.model_copy(update={"retry_at": err.state.retry_at + 3600_000})
    protocol = VaultProtocol(vault.public_key_der, "alice")
    call = Call("POST", "/v1/recover/start", None, None)
    assert protocol.refusal_is_signed(call, transcripts.Refusal.TOO_EARLY, err.signature, err.state)
    assert not protocol.refusal_is_signed(call, transcripts.Refusal.TOO_EARLY, err.signature, later)
    assert not protocol.refusal_is_signed(call, transcripts.Refusal.TOO_EARLY, None, err.state)
    assert not protocol.refusal_is_signed(call, transcripts.Refusal.TOO_EARLY, err.signature, None)


# -- one signature per record state -------------------------------------------------------
async def test_a_flood_at_a_destroyed_record_makes_one_signature_served_from_the_islands_memory(parts):
    vault, island, _, clock, hsm = parts
    await _register(island, "alice")
    await _wrong_a_day_apart(island, clock, 10)
    signed, calls = hsm.signed, []
    real = island._hsm.refusal  # noqa: SLF001 - counting the island's calls to the hsm-proxy

    async def counted(req):
        calls.append(req)
        return await real(req)

    island._hsm.refusal = counted  # noqa: SLF001
    refusals = []
    for _ in range(50):
        with pytest.raises(ierr.RecordDestroyed) as gone:
            await _guess(island, "alice", b"another")
        refusals.append(gone.value)
    assert hsm.signed - signed == 1 and len(calls) == 1  # one signature, one hsm-proxy call, for fifty requests
    assert {r.signature for r in refusals} == {refusals[0].signature}
    state = refusals[0].signed_state
    protocol = VaultProtocol(vault.public_key_der, "alice")
    assert protocol.refusal_is_signed(Call("POST", "/v1/recover/start", None, None),
                                      transcripts.Refusal.RECORD_DESTROYED, refusals[0].signature, state)


async def test_an_absent_account_costs_one_signature_and_the_boundary_still_checks_each_request(parts):
    vault, island, _, _, hsm = parts
    signed = hsm.signed
    for _ in range(20):
        with pytest.raises(ierr.NoRecord):
            await _guess(island, "nobody", b"guess")
    assert hsm.signed - signed == 1


async def test_an_island_of_the_build_before_still_gets_a_refusal_signed_over_its_request(parts):
    from bkv_protocol import hsm_api as hapi

    vault, island, _, _, _ = parts
    ledger = island._ledger  # noqa: SLF001
    await ledger.ready()
    ref = hrecords.user_ref("nobody")
    rid, guess = os.urandom(16), opaque.client_login_start(b"pw").get_message()
    out = vault.refusal(hapi.RefusalIn(
        user_id="nobody", island="island-a", current=ledger.current(ref), proven=ledger.proven(ref),
        statements=await ledger.statements_for(ledger.proven(ref).head), route="login-start", request_id=rid,
        fields=[guess]))
    assert out.state is None
    request = transcripts.recover_start_request(None, "nobody", rid, guess)
    VaultProtocol(vault.public_key_der, "nobody").verify(
        out.signature, transcripts.refusal_answer(vault.fleet_id, request, transcripts.Refusal.NO_RECORD))


def test_the_cli_says_when_to_try_again_with_an_exit_code_of_its_own(capsys):
    import datetime

    import typer

    from bkv import errors
    from bkv.exitcodes import ExitCode, outcomes

    at = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    with pytest.raises(typer.Exit) as done:
        with outcomes():
            raise errors.TooEarly(at)
    assert done.value.exit_code == ExitCode.TOO_EARLY == 17
    assert "after 2030-01-02 03:04:05 UTC" in capsys.readouterr().err
