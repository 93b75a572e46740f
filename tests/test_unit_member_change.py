"""Changing the member set (bkv_hsm_proxy/membership.py): freeze, the next
set signed at the newest frozen heads, adopt. Logic with real state files
and the real log rules, the token as the in-memory fake, the untrusted
island as test_unit_hsm_log's ``IslandFake``; the same through real
processes: tests/test_member_change.py."""

from __future__ import annotations

import os

import pytest

from bkv_hsm_proxy import log as hlog
from bkv_hsm_proxy import membership, nvram
from bkv_protocol import hsm_api as api
from bkv_protocol import members as ms
from bkv_protocol.bundle import RootKey
from fakes import InMemoryHsmFake
from test_unit_hsm_log import ISLAND, KEY, IslandFake, commit, live

THREE = ("hsm-0", "hsm-1", "hsm-2")


@pytest.fixture
def admin() -> RootKey:
    return RootKey.generate()


def token(admin: RootKey, old=THREE) -> InMemoryHsmFake:
    hsm = InMemoryHsmFake()
    membership.fix_admin_key(hsm, admin.public)
    membership.fix_member_set(hsm, ms.sign(ms.MemberSet.of(list(old)), admin))
    return hsm


def proxy(tmp_path, name: str, members=THREE, epoch: int = 1) -> hlog.IslandLog:
    state = nvram.StateFile(tmp_path / f"{name}.state")
    state.load()
    return hlog.IslandLog(KEY, name, list(members), state, epoch=epoch)


def wire(fz: hlog.FreezeStatement) -> api.FreezeOut:
    return api.FreezeOut(hsm=fz.hsm, epoch=fz.epoch, tag=fz.tag, heads={
        i: api.FrozenHead(index=h.index, mac=h.mac, root=h.root) for i, h in fz.heads.items()})


class Chain:
    """etcd's copy of the island's entries (what an honest island appended)."""

    def __init__(self) -> None:
        self.entries: list[hlog.LogEntry] = []

    def __call__(self, island: str, after: int, upto: int) -> list[api.LogEntry]:
        return [api.LogEntry(island=e.island, index=e.index, root=e.root, prev_mac=e.prev_mac, salt=e.salt, mac=e.mac)
                for e in self.entries if after < e.index <= upto]


async def fleet_with_history(tmp_path, guesses: int = 2):
    """Three hsm-proxies, alice registered and ``guesses`` guesses committed on all three."""
    island, chain = IslandFake(), Chain()
    proxies = [proxy(tmp_path, n) for n in THREE]
    for v in range(1, guesses + 2):
        await commit(island, proxies, [island.change("alice", live(v, 11 - v))])
        chain.entries.append(island.head)
    return island, proxies, chain


async def test_a_lost_site_is_replaced_at_the_committed_head_and_the_log_goes_on_in_the_new_set(tmp_path, admin):
    hsm = token(admin)
    island, (p0, p1, p2), chain = await fleet_with_history(tmp_path)
    order = ms.sign_freeze(1, admin)
    assert ms.verify_freeze(order, admin.public) == 1
    freezes = [wire(await p.freeze()) for p in (p0, p1)]  # hsm-2's state file is lost
    with pytest.raises(hlog.Frozen):
        p0.apply(island.head, [island.change("alice", live(4, 8))])  # frozen: nothing more in the old set
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    for name in THREE:
        identity = membership.change_members(hsm, KEY, tmp_path / f"new-{name}.state", name, new, freezes, chain)
        assert identity.epoch == 2
    assert membership.token_member_set(hsm).epoch == 2
    # The new set starts at the head all three old members had; hsm-2 (lost) starts there too.
    again = []
    for name in THREE:
        state, identity = nvram.open_state(tmp_path / f"new-{name}.state")
        assert state.heads()[ISLAND].mac == island.head.mac and not state.frozen
        again.append(hlog.IslandLog(KEY, name, list(identity.members), state, epoch=identity.epoch))
    answer = await commit(island, again, [island.change("alice", live(4, 8))], answer=b"guess 3")
    assert answer == b"guess 3"


async def test_a_statement_from_the_old_set_never_counts_in_the_new(tmp_path, admin):
    island, proxies, chain = await fleet_with_history(tmp_path)
    old_statement = await proxies[0].capture([island.head])  # a restatement in epoch 1
    hsm = token(admin)
    freezes = [wire(await p.freeze()) for p in proxies]
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    logs = []
    for name in THREE:
        membership.change_members(hsm, KEY, tmp_path / f"n-{name}", name, new, freezes, chain)
        state, identity = nvram.open_state(tmp_path / f"n-{name}")
        logs.append(hlog.IslandLog(KEY, name, list(identity.members), state, epoch=2))
    with pytest.raises(hlog.NoQuorum):
        logs[0].committed(island.head, [old_statement, await logs[0].capture([island.head])])
    logs[0].committed(island.head, [await logs[0].capture([island.head]), await logs[1].capture([island.head])])


async def test_too_few_freezes_are_refused_so_an_entry_the_old_set_committed_cannot_be_lost(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    freezes = [wire(await proxies[0].freeze())]  # one of three: 2 are needed
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    with pytest.raises(membership.ChangeRefused, match="needs 2"):
        membership.change_members(hsm, KEY, tmp_path / "x", "hsm-0", new, freezes, chain)
    assert membership.token_member_set(hsm).epoch == 1  # nothing changed


@pytest.mark.parametrize("n, needed", [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3)])
def test_a_change_needs_enough_freezes_that_any_old_quorum_meets_one_not_rolled_back(n, needed):
    q, f = hlog.quorum(n), hlog.tolerated(n)
    assert membership.freezes_needed(n) == needed
    assert q + needed - n >= 1 + f        # every committed entry is seen by a frozen member not rolled back
    assert n - needed + f < q             # the members left unfrozen (and f rolled back) make no quorum


async def test_a_set_taking_over_at_an_older_head_than_the_frozen_ones_is_refused(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    freezes = [wire(await p.freeze()) for p in proxies[:2]]
    older = {ISLAND: (chain.entries[0].index, chain.entries[0].mac)}  # a rollback the admin was shown
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, older), admin)
    with pytest.raises(membership.ChangeRefused, match="newest frozen heads"):
        membership.change_members(hsm, KEY, tmp_path / "x", "hsm-0", new, freezes, chain)


async def test_a_forged_freeze_statement_or_one_of_another_set_is_refused(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    good = [wire(await p.freeze()) for p in proxies[:2]]
    forged = good[1].model_copy(update={"heads": {ISLAND: good[1].heads[ISLAND].model_copy(update={"index": 1})}})
    stranger = good[1].model_copy(update={"hsm": "hsm-9"})
    for bad in (forged, stranger):
        freezes = [good[0], bad]
        new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
        with pytest.raises(membership.ChangeRefused):
            membership.change_members(hsm, KEY, tmp_path / "x", "hsm-0", new, freezes, chain)


async def test_frozen_heads_on_two_branches_are_refused(tmp_path, admin):
    """Two members froze on different branches (a fork an insider made):
    no set can take over until etcd holds one chain through both."""
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    fork = island.snapshot()
    entry_a = proxies[0].apply(island.head, [island.change("alice", live(4, 8))])
    entry_b = proxies[1].apply(fork.head, [fork.change("alice", live(4, 8))])
    await proxies[0].capture([entry_a])
    await proxies[1].capture([entry_b])
    chain.entries.append(entry_a)
    freezes = [wire(await p.freeze()) for p in proxies[:2]]
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    with pytest.raises(membership.ChangeRefused, match="fork"):
        membership.change_members(hsm, KEY, tmp_path / "x", "hsm-0", new, freezes, chain)


async def test_a_member_behind_the_others_is_checked_along_the_chain_and_the_set_takes_the_newest(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    change = island.change("alice", live(4, 8))
    entry = proxies[0].apply(island.head, [change])
    for p in proxies[:2]:
        await p.capture([entry])  # committed on 0 and 1; hsm-2 is one behind
    island.adopt(entry, [change])
    chain.entries.append(entry)
    freezes = [wire(await p.freeze()) for p in (proxies[0], proxies[2])]
    heads = membership.newest_frozen(freezes)
    assert heads[ISLAND] == (entry.index, entry.mac)
    new = ms.sign(ms.MemberSet.of(["hsm-0", "hsm-2", "hsm-3"], 2, heads), admin)  # hsm-1 leaves, hsm-3 joins
    membership.change_members(hsm, KEY, tmp_path / "h3", "hsm-3", new, freezes, chain)
    state, identity = nvram.open_state(tmp_path / "h3")
    assert state.heads()[ISLAND].index == entry.index and identity.members == ("hsm-0", "hsm-2", "hsm-3")
    # etcd without the link between them cannot show that hsm-2's head is on the chain.
    chain.entries.pop()
    with pytest.raises(membership.ChangeRefused, match="etcd"):
        membership.change_members(hsm, KEY, tmp_path / "h0", "hsm-0", new, freezes, chain)


async def test_the_change_is_idempotent_and_a_state_file_of_a_newer_set_is_never_replaced(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    freezes = [wire(await p.freeze()) for p in proxies]
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    path = tmp_path / "s"
    first = membership.change_members(hsm, KEY, path, "hsm-0", new, freezes, chain)
    assert membership.change_members(hsm, KEY, path, "hsm-0", new, freezes, chain) == first
    other = ms.sign(ms.MemberSet.of(["hsm-0", "hsm-1"], 2, membership.newest_frozen(freezes)), admin)
    with pytest.raises(membership.ChangeRefused, match="another set for epoch 2"):
        membership.change_members(hsm, KEY, path, "hsm-0", other, freezes, chain)


async def test_a_set_signed_by_another_key_or_skipping_an_epoch_is_refused(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    freezes = [wire(await p.freeze()) for p in proxies]
    heads = membership.newest_frozen(freezes)
    with pytest.raises(membership.MembersFixed, match="another admin key"):
        membership.change_members(hsm, KEY, tmp_path / "a", "hsm-0",
                                  ms.sign(ms.MemberSet.of(["hsm-0"], 2, heads), RootKey.generate()), freezes, chain)
    with pytest.raises(membership.ChangeRefused, match="next one is 2"):
        membership.change_members(hsm, KEY, tmp_path / "b", "hsm-0",
                                  ms.sign(ms.MemberSet.of(["hsm-0"], 3, heads), admin), freezes, chain)


def test_an_hsm_proxy_left_in_the_old_set_does_not_serve_once_the_token_holds_the_next(admin, tmp_path):
    hsm = token(admin)
    old = ms.MemberSet.of(list(THREE))
    hsm.store_blob(f"{membership.MEMBER_SET_LABEL}2",
                   ms.sign(ms.MemberSet.of(list(THREE), 2, {ISLAND: (3, bytes(32))}), admin).to_json().encode())
    with pytest.raises(membership.MembersFixed, match="change-members"):
        membership.check_members(hsm, nvram.Identity("hsm-0", old.members, 1, old.digest()))


async def test_the_state_file_of_a_running_hsm_proxy_is_not_replaced(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    freezes = [wire(await p.freeze()) for p in proxies]
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    serving = nvram.hold(tmp_path / "s")  # what `serve` holds while it runs
    try:
        with pytest.raises(nvram.StateFileBusy):
            membership.change_members(hsm, KEY, tmp_path / "s", "hsm-0", new, freezes, chain)
    finally:
        os.close(serving)
    assert membership.change_members(hsm, KEY, tmp_path / "s", "hsm-0", new, freezes, chain).epoch == 2


# -- the birth marker and `start` (what the chart's hsm-proxy runs); real tokens: tests/test_hsm_start.py ---------
def serves(hsm, path) -> nvram.Identity:
    """What ``serve`` checks before it serves: the token's set, then the state file's birth id."""
    identity = nvram.open_state(path)[1]
    membership.check_members(hsm, identity)
    membership.check_born(hsm, identity)
    return identity


def start(hsm, path, name: str, signed: ms.SignedMemberSet, freezes=(), chain=None) -> str:
    return membership.start(hsm, lambda: KEY, path, name, signed, list(freezes), chain or Chain())


def test_a_state_file_lost_and_made_again_in_the_first_set_does_not_serve_but_one_copied_back_does(tmp_path, admin):
    hsm, first = token(admin), ms.sign(ms.MemberSet.of(list(THREE)), admin)
    path = tmp_path / "hsm-2.state"
    assert start(hsm, path, "hsm-2", first) == "made"
    born = serves(hsm, path).born  # the first serve keeps the birth id in the token
    assert hsm.load_blob("bkv-hsm-state-born/hsm-2/1") == born
    old_copy = path.read_bytes()
    assert start(hsm, path, "hsm-2", first) == "kept" and serves(hsm, path).born == born  # a restart
    # The volume is lost: start makes nothing, and a file made by hand does not serve either.
    path.unlink()
    with pytest.raises(membership.StateRemade, match="made again after one was lost: replace the site with the "
                                                     "member-set ceremony"):
        start(hsm, path, "hsm-2", first)
    assert not path.exists()
    nvram.init_state(path, "hsm-2", first.set)
    with pytest.raises(membership.StateRemade, match="made again after one was lost"):
        serves(hsm, path)
    # An old copy put back keeps its birth id: the rollback the quorum tolerates, as before.
    path.write_bytes(old_copy)
    assert serves(hsm, path).born == born
    # Other hsm-proxies are not affected: each has its own marker.
    assert start(hsm, tmp_path / "hsm-0.state", "hsm-0", first) == "made"
    serves(hsm, tmp_path / "hsm-0.state")


async def test_start_adopts_the_next_set_with_its_freezes_and_a_replaced_site_serves_in_it(tmp_path, admin):
    hsm = token(admin)
    island, proxies, chain = await fleet_with_history(tmp_path)
    first = ms.sign(ms.MemberSet.of(list(THREE)), admin)
    kept = tmp_path / "hsm-0-kept.state"  # hsm-0's state file (its heads aside): it survives the change
    assert start(hsm, kept, "hsm-0", first) == "made"
    old_born = serves(hsm, kept).born
    for name in THREE[1:]:  # each served once in epoch 1
        membership.check_born(hsm, nvram.Identity(name, first.set.members, 1, first.set.digest()))
    freezes = [wire(await p.freeze()) for p in proxies[:2]]  # hsm-2's state file is lost
    new = ms.sign(ms.MemberSet.of(list(THREE), 2, membership.newest_frozen(freezes)), admin)
    # The admin's upgrade: fleet-init lets the next set through, the hsm-proxies store it when they adopt it.
    assert membership.fix_member_set(hsm, new) is False and membership.token_member_set(hsm).epoch == 1
    lost = tmp_path / "lost.state"
    serving = nvram.hold(lost)  # start holds the lock from before the change until it exits
    try:
        assert start(hsm, lost, "hsm-2", new, freezes, chain) == "adopted"
    finally:
        os.close(serving)
    assert membership.token_member_set(hsm).epoch == 2
    identity = serves(hsm, lost)
    assert identity.epoch == 2 and nvram.open_state(lost)[0].heads()[ISLAND].mac == island.head.mac
    # A member whose state file survived (epoch 1, frozen) adopts too: a new file, a new birth id.
    assert start(hsm, kept, "hsm-0", new, freezes, chain) == "adopted"
    assert serves(hsm, kept).born != old_born and not nvram.open_state(kept)[0].frozen
    assert start(hsm, kept, "hsm-0", new, freezes, chain) == "kept"
    # Lost again after serving in epoch 2: refused again; only the next change (epoch 3) brings it back.
    lost.unlink()
    with pytest.raises(membership.StateRemade, match="one served in epoch 2"):
        start(hsm, lost, "hsm-2", new, freezes, chain)
    # Without the freezes the set cannot be adopted: a committed entry could be lost.
    with pytest.raises(membership.ChangeRefused, match="needs 2"):
        start(hsm, tmp_path / "hsm-1-lost.state", "hsm-1", new, [], chain)


def test_fleet_init_stores_only_the_first_set_and_refuses_one_skipping_an_epoch(admin):
    hsm = token(admin)
    with pytest.raises(membership.MembersFixed, match="change ceremony"):
        membership.fix_member_set(hsm, ms.sign(ms.MemberSet.of(["hsm-0"], 3, {ISLAND: (3, bytes(32))}), admin))
    with pytest.raises(membership.MembersFixed, match="change ceremony"):
        membership.fix_member_set(hsm, ms.sign(ms.MemberSet.of(["hsm-0"]), admin))  # another first set
    assert membership.token_member_set(hsm).members == THREE
