"""Release riding on a capture (``CaptureIn.release``, issue #17's cheaper
commit): the hsm-proxy releases held answers in the capture call only by
``IslandLog.release``'s rules, with its own fresh statement beside the ones
given; the island asks for it only with a single hsm-proxy, and only on the
capture that ends on the entry the answers were held for.

VaultHsm and the log's rules are the real ones (keys in memory, real state
files); the same through real processes: tests/test_hsm_log_release_on_capture.py."""

from __future__ import annotations

import json
import os

import opaque_ke_py as opaque
import pytest

from bkv_hsm_proxy import errors
from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.nvram import StateFile
from bkv_island import hsm_client
from bkv_protocol import hsm_api as hapi
from bkv_protocol import merkle
from bkv_protocol.encoding import user_ref
from bkv_server.http import UpstreamUnavailable
from fakes import InMemoryEtcdFake, InMemoryHsmFake, InProcessHsmFake, with_island_set
from test_unit_vault_logic import _guess, _register, _registered, replica

ISLAND = "island-a"
ABSENT = hapi.Entry(state=hapi.EntryState.ABSENT, version=0)


def fleet(tmp_path, n: int) -> list[VaultHsm]:
    """``n`` hsm-proxies of one fleet (one token's keys, a state file each)."""
    token = InMemoryHsmFake()
    VaultHsm.create_opaque_setup(token)
    with_island_set(token)
    members = [f"hsm-{i}" for i in range(n)]
    out = []
    for m in members:
        vault = VaultHsm(token, max_attempts=3)
        state = StateFile(tmp_path / f"{m}.state")
        state.load()
        vault.attach_log(state, m, members)
        out.append(vault)
    return out


def registration(vault: VaultHsm, head: hapi.LogEntry, user: str) -> tuple[hapi.LogEntry, bytes]:
    """A candidate entry after ``head`` (the empty trie) registering ``user``, and its held answer."""
    start = opaque.client_registration_start(b"pw")
    out = vault.registration_start(hapi.RegistrationStartIn(user_id=user, island=ISLAND, current=ABSENT,
                                                            registration_request=start.get_message()))
    fin = opaque.client_registration_finish(b"pw", start.get_state(), out.registration_response)
    applied = vault.apply(hapi.ApplyIn(head=head, ops=[hapi.Op(
        kind=hapi.OpKind.REGISTRATION_FINISH, proof=merkle.Trie().prove(bytes.fromhex(user_ref(user))).to_bytes(),
        registration_finish=hapi.RegistrationFinishIn(
            user_id=user, island=ISLAND, request_id=os.urandom(16), current=ABSENT, challenge=out.challenge,
            registration_upload=fin.get_message(), ek=os.urandom(hapi.EK_LEN), k_nonce=os.urandom(hapi.K_NONCE_LEN)))]))
    assert applied.entry is not None and applied.results[0].held is not None
    return applied.entry, applied.results[0].held


def capture(entry: hapi.LogEntry, held: list[bytes] | None, statements=()) -> hapi.CaptureIn:
    return hapi.CaptureIn(entries=[entry], release=None if held is None else hapi.ReleaseAsk(
        statements=list(statements), held=held))


async def test_on_a_fleet_of_one_a_capture_with_held_answers_releases_them_once_the_entry_is_durable(tmp_path):
    (vault,) = fleet(tmp_path, 1)
    entry, held = registration(vault, vault.genesis(ISLAND), "alice")
    out = await vault.capture(capture(entry, [held]))
    assert json.loads(out.answers[0])["signature"]  # the client's answer, in clear
    reread = StateFile(tmp_path / "hsm-0.state")
    reread.load()
    assert reread.head(ISLAND).mac == entry.mac  # in the state file before it left
    # exactly what a release of its own gives for the same statement
    assert vault.release(hapi.ReleaseIn(entry=entry, statements=[out.statement], held=[held])).answers == out.answers
    # without a release asked, the answer keeps the old shape: no "answers" at all
    plain = await vault.capture(capture(entry, None))
    assert plain.answers is None and "answers" not in plain.model_dump_json()


async def test_a_capture_carrying_answers_held_for_another_entry_releases_nothing(tmp_path):
    (vault,) = fleet(tmp_path, 1)
    genesis = vault.genesis(ISLAND)
    a, held_a = registration(vault, genesis, "alice")
    b, held_b = registration(vault, genesis, "bob")  # another candidate for the same index
    with pytest.raises(errors.LogError, match="not held for this entry"):
        await vault.capture(capture(b, [held_a]))
    with pytest.raises(errors.LogError, match="not held for this entry"):
        await vault.capture(capture(b, [held_b, held_a]))  # one of another entry spoils the lot
    assert (await vault.capture(capture(b, [held_b]))).answers is not None  # its own do open


async def test_a_refused_capture_releases_nothing(tmp_path):
    (vault,) = fleet(tmp_path, 1)
    genesis = vault.genesis(ISLAND)
    a, _ = registration(vault, genesis, "alice")
    fork, held_fork = registration(vault, genesis, "bob")
    await vault.capture(capture(a, None))
    with pytest.raises(errors.NotNextEntry):  # a fork of a captured index
        await vault.capture(capture(fork, [held_fork]))
    with pytest.raises(errors.NoQuorum):
        vault.release(hapi.ReleaseIn(entry=fork, statements=[], held=[held_fork]))


async def test_with_three_hsm_proxies_a_lone_capture_with_held_answers_releases_nothing(tmp_path):
    proxies = fleet(tmp_path, 3)
    assert proxies[0].log.quorum == 2
    entry, held = registration(proxies[0], proxies[0].genesis(ISLAND), "alice")
    first = await proxies[0].capture(capture(entry, [held]))
    assert first.answers is None  # one of the two needed: its own statement alone is no quorum
    relabelled = first.statement.model_copy(update={"hsm": "hsm-1"})
    assert (await proxies[0].capture(capture(entry, [held], [relabelled]))).answers is None  # a forged vote
    other, _ = registration(proxies[2], proxies[2].genesis(ISLAND), "bob")  # a fork at the same index
    elsewhere = (await proxies[2].capture(capture(other, None))).statement
    assert (await proxies[0].capture(capture(entry, [held], [elsewhere]))).answers is None  # a vote for the fork
    second = await proxies[1].capture(capture(entry, [held], [first.statement]))
    assert second.answers is not None and json.loads(second.answers[0])["signature"]  # hsm-0 and hsm-1: a quorum


async def test_on_a_fleet_of_one_the_island_captures_and_releases_in_one_call(tmp_path):
    (vault,) = fleet(tmp_path, 1)
    etcd = InMemoryEtcdFake()
    port = InProcessHsmFake(vault)
    island = replica(vault, etcd, port)
    await _registered(island, "alice")
    out = await island.recover_start(_guess("alice", b"wrong"))
    assert out.attempts_left == 2
    assert port.captures_with_release == 2 and port.releases == 0


async def test_held_answers_ride_only_on_the_capture_that_ends_on_their_entry_never_on_a_catch_up_chunk(
        tmp_path, monkeypatch):
    token = InMemoryHsmFake()
    VaultHsm.create_opaque_setup(token)
    with_island_set(token)

    def vault(name: str) -> VaultHsm:
        v = VaultHsm(token, max_attempts=3)
        state = StateFile(tmp_path / name)
        state.load()
        v.attach_log(state, "hsm-0", ["hsm-0"])
        return v

    etcd = InMemoryEtcdFake()
    ahead = vault("ahead.state")
    island = replica(ahead, etcd)
    for user in ("alice", "bob", "carol", "dave", "erin"):
        await _registered(island, user)  # entries 1-5, captured by this state file only
    # The same hsm-proxy on a copy of its state file from before those: 5 entries behind.
    behind = vault("behind.state")
    calls = []
    real = behind.capture

    async def recorded(req: hapi.CaptureIn) -> hapi.CaptureOut:
        try:
            out = await real(req)
        except errors.LogError as exc:
            calls.append(([e.index for e in req.entries], req.release is not None, type(exc).__name__))
            raise
        calls.append(([e.index for e in req.entries], req.release is not None, out.answers is not None))
        return out

    monkeypatch.setattr(behind, "capture", recorded)
    monkeypatch.setattr(hsm_client, "CATCH_UP_CHUNK", 2)
    port = InProcessHsmFake(behind)
    late = replica(behind, etcd, port)
    out = await late.recover_start(_guess("alice", b"wrong"))  # entry 6
    assert out.attempts_left == 2 and port.releases == 0
    # refused (behind), then caught up in chunks: only the one ending on #6 carries the held answer
    assert calls == [([6], True, "NotNextEntry"), ([1, 2], False, False), ([3, 4], False, False),
                     ([5, 6], True, True)]


async def test_an_island_whose_one_capture_is_no_quorum_releases_apart_and_nothing_leaves(tmp_path):
    proxies = fleet(tmp_path, 3)  # the island reaches hsm-0 only: 1 of the 2 captures needed
    port = InProcessHsmFake(proxies[0])
    island = replica(proxies[0], InMemoryEtcdFake(), port)
    _, _, finish = await _register(island, "alice")
    with pytest.raises(UpstreamUnavailable) as failed:
        await island.registration_finish(finish)
    assert "too few hsm-proxies" in str(failed.value)
    assert port.captures_with_release == 1 and port.releases == 1 and port.refused == {"no_quorum": 1}


async def test_an_island_ahead_of_an_hsm_proxy_that_refuses_release_on_capture_captures_in_the_old_shape(tmp_path):
    """A rolling upgrade that starts the islands first: the older hsm-proxy
    (its CaptureIn without ``release``, unknown fields refused) is served
    over real HTTP; the island captures once more without the field and
    releases apart -- no failed commit, no answer released early."""
    import asyncio

    import uvicorn

    from bkv_protocol.wire import Frozen
    from bkv_server.rpc import RpcApp

    class OldCaptureIn(Frozen):
        entries: list[hapi.LogEntry]

    (vault,) = fleet(tmp_path, 1)
    seen: list[bool] = []

    async def old_capture(req: OldCaptureIn) -> hapi.CaptureOut:
        seen.append(True)
        return await vault.capture(hapi.CaptureIn(entries=req.entries))

    app = RpcApp("old-hsm-proxy", {"/hsm/v1/log/capture": (OldCaptureIn, old_capture)}, errors=errors.TABLE)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = hsm_client.HsmHttpClient([f"http://127.0.0.1:{port}"])
    try:
        entry, held = registration(vault, vault.genesis(ISLAND), "alice")
        got = await client.commit([entry], chain=None, held=[held])
    finally:
        await client.aclose()
        server.should_exit = True
        await serving
    assert len(seen) == 1  # the first capture, with the field, was refused before it reached the boundary
    assert got.answers is None  # nothing released by the capture: the island releases apart
    assert [(s.hsm, s.index, s.mac) for s in got.statements] == [("hsm-0", entry.index, entry.mac)]
    assert vault.log_heads().heads[ISLAND].index == entry.index
