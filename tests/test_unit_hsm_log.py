"""Unit tests of the HSM-held log's rules (bkv_hsm_proxy/log.py) with the real
trie and real state files; the untrusted island is a small in-test fake
(``IslandFake``) that can lie the way islands and etcd can.

Each attack of issue #17 that the log logic alone decides is here; the same
attacks through the running fleet come with the wiring."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from bkv_hsm_proxy import log as hlog
from bkv_hsm_proxy.nvram import StateFile, StateWriteFailed
from bkv_protocol import hsm_api as api
from bkv_protocol import merkle

KEY = hlog.LogKey.from_setup(b"an OPAQUE server setup, for the test")
ISLAND = "island-a"


def ref(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def live(version: int, attempts: int) -> api.Entry:
    return api.Entry(state=api.EntryState.LIVE, version=version, sealed=f"record:{attempts}".encode())


class IslandFake:
    """The untrusted side: a full trie, the records, the log it shows."""

    def __init__(self) -> None:
        self.trie = merkle.Trie()
        self.records: dict[bytes, api.Entry] = {}
        self.head = hlog.genesis(KEY, ISLAND)

    def change(self, name: str, new: api.Entry) -> hlog.Change:
        r = ref(name)
        return hlog.Change(r, self.records.get(r), self.trie.prove(r), new)

    def adopt(self, entry: hlog.LogEntry, changes: list[hlog.Change]) -> None:
        for c in changes:
            self.records[c.ref] = c.new
            self.trie.set(c.ref, hlog.entry_digest(c.new))
        assert self.trie.root() == entry.root  # the boundary and the island agree on the trie
        self.head = entry

    def snapshot(self) -> IslandFake:
        copy = IslandFake()
        for r, e in self.records.items():
            copy.records[r] = e
            copy.trie.set(r, hlog.entry_digest(e))
        copy.head = self.head
        return copy


def hsm(tmp_path, name: str = "hsm-1", members: tuple[str, ...] = ("hsm-1",), **kw) -> hlog.IslandLog:
    state = StateFile(tmp_path / f"{name}.state")
    state.load()
    return hlog.IslandLog(KEY, name, list(members), state, **kw)


async def commit(island: IslandFake, proxies: list[hlog.IslandLog], changes, answer=b"answer"):
    """apply on the first proxy, capture on all given, release: the honest path."""
    entry = proxies[0].apply(island.head, changes)
    held = proxies[0].hold(entry, answer)
    stmts = [await p.capture([entry]) for p in proxies]
    island.adopt(entry, changes)
    return proxies[0].release(entry, stmts, [held])[0]


async def registered(tmp_path, proxies=None, attempts: int = 10):
    island = IslandFake()
    proxies = proxies or [hsm(tmp_path)]
    await commit(island, proxies, [island.change("alice", live(1, attempts))])
    return island, proxies


async def test_thirty_guesses_applied_to_one_head_release_at_most_one_answer(tmp_path):
    island, (p,) = await registered(tmp_path)
    head = island.head
    candidates = []
    for i in range(30):
        c = island.change("alice", live(2, 9))
        entry = p.apply(head, [c])
        candidates.append((entry, p.hold(entry, b"credential response %d" % i)))
    released = []
    for entry, held in candidates:
        try:
            stmt = await p.capture([entry])
        except hlog.NotNextEntry:
            continue
        released += p.release(entry, [stmt], [held])
    assert released == [b"credential response 0"]
    # and no statement of ours makes another candidate's answer open
    for entry, held in candidates[1:]:
        with pytest.raises(hlog.NoQuorum):
            p.release(entry, [await p.capture([candidates[0][0]])], [held])


async def test_an_old_head_is_refused_after_a_newer_one_was_captured(tmp_path):
    island, (p,) = await registered(tmp_path)
    old = island.snapshot()  # an etcd snapshot
    for v, left in ((2, 9), (3, 8), (4, 7)):
        await commit(island, [p], [island.change("alice", live(v, left))])
    with pytest.raises(hlog.StaleHead):
        p.apply(old.head, [old.change("alice", live(2, 9))])


async def test_one_record_rolled_back_under_the_newest_head_is_refused(tmp_path):
    island, (p,) = await registered(tmp_path)
    before = island.records[ref("alice")]
    stale_proof = island.trie.prove(ref("alice"))
    await commit(island, [p], [island.change("alice", live(2, 9))])
    # the older entry put back in etcd, with a fresh proof or with the one it had
    for proof in (island.trie.prove(ref("alice")), stale_proof):
        with pytest.raises(hlog.ProofRefused):
            p.apply(island.head, [hlog.Change(ref("alice"), before, proof, live(3, 9))])


async def test_two_users_records_swapped_are_refused(tmp_path):
    island, (p,) = await registered(tmp_path)
    await commit(island, [p], [island.change("bob", live(1, 10))])
    alice, bob = island.records[ref("alice")], island.records[ref("bob")]
    await commit(island, [p], [island.change("alice", live(2, 3))])
    with pytest.raises(hlog.ProofRefused):  # bob's fresh record shown as alice's
        p.apply(island.head, [hlog.Change(ref("alice"), bob, island.trie.prove(ref("alice")), live(3, 3))])
    assert alice != island.records[ref("alice")]


async def test_an_absent_record_cannot_be_claimed_for_a_registered_user(tmp_path):
    island, (p,) = await registered(tmp_path)
    proof_of_bob = island.trie.prove(ref("bob"))  # bob is absent: a valid absence proof, for bob
    with pytest.raises(hlog.ProofRefused):
        p.apply(island.head, [hlog.Change(ref("alice"), None, proof_of_bob, live(1, 10))])


async def test_a_head_from_another_island_or_forged_is_not_authentic(tmp_path):
    island, (p,) = await registered(tmp_path)
    forged = dataclasses.replace(island.head, index=island.head.index + 5)
    with pytest.raises(hlog.NotAuthentic):
        p.apply(forged, [island.change("alice", live(2, 9))])
    other = dataclasses.replace(island.head, island="island-b")
    with pytest.raises(hlog.NotAuthentic):
        p.apply(other, [island.change("alice", live(2, 9))])


async def test_a_fork_at_a_captured_index_is_never_captured_and_a_restart_keeps_the_head(tmp_path):
    island, (p,) = await registered(tmp_path)
    fork_base = island.snapshot()
    fork = p.apply(fork_base.head, [fork_base.change("alice", live(2, 9))])
    await commit(island, [p], [island.change("alice", live(2, 9))])
    with pytest.raises(hlog.NotNextEntry):
        await p.capture([fork])
    restarted = hsm(tmp_path)  # same state file, new process
    assert restarted.captured(ISLAND).mac == island.head.mac
    with pytest.raises(hlog.StaleHead):
        restarted.apply(fork_base.head, [fork_base.change("alice", live(2, 9))])


async def test_a_capture_that_was_not_persisted_gives_no_statement_and_releases_nothing(tmp_path, monkeypatch):
    island, (p,) = await registered(tmp_path)
    c = island.change("alice", live(2, 9))
    entry = p.apply(island.head, [c])
    held = p.hold(entry, b"credential response")

    def crash(*_a, **_k):
        raise OSError("killed between processing and persisting")

    monkeypatch.setattr("bkv_hsm_proxy.nvram.os.replace", crash)
    with pytest.raises(StateWriteFailed):
        await p.capture([entry])
    with pytest.raises(hlog.NoQuorum):
        p.release(entry, [], [held])


async def test_three_hsm_proxies_with_two_appenders_commit_at_most_one_branch(tmp_path):
    members = ("hsm-1", "hsm-2", "hsm-3")
    proxies = [hsm(tmp_path, m, members) for m in members]
    island, _ = await registered(tmp_path, proxies)
    a, b = island.snapshot(), island.snapshot()
    ea = proxies[0].apply(a.head, [a.change("alice", live(2, 9))])
    eb = proxies[1].apply(b.head, [b.change("alice", live(2, 9))])
    ha, hb = proxies[0].hold(ea, b"branch a"), proxies[1].hold(eb, b"branch b")
    # interleaved captures: each appender races to every proxy
    sa, sb = [], []
    for p, first, second in ((proxies[0], ea, eb), (proxies[1], eb, ea), (proxies[2], ea, eb)):
        for entry, stmts in ((first, sa if first is ea else sb), (second, sa if second is ea else sb)):
            try:
                stmts.append(await p.capture([entry]))
            except hlog.NotNextEntry:
                pass
    released = []
    for entry, stmts, held in ((ea, sa, ha), (eb, sb, hb)):
        try:
            released += proxies[0].release(entry, stmts, [held])
        except hlog.NoQuorum:
            pass
    assert released == [b"branch a"]


async def test_five_sites_with_one_state_file_rolled_back_cannot_commit_a_second_branch(tmp_path):
    members = tuple(f"hsm-{i}" for i in range(1, 6))
    proxies = [hsm(tmp_path, m, members) for m in members]
    assert proxies[0].quorum == 4
    island, _ = await registered(tmp_path, proxies)
    base = island.snapshot()
    saved = (tmp_path / "hsm-3.state").read_bytes()
    # the insider captures the next entry on a bare quorum only: sites 1-4
    entry = proxies[0].apply(island.head, [island.change("alice", live(2, 9))])
    held = proxies[0].hold(entry, b"first guess")
    stmts = [await p.capture([entry]) for p in proxies[:4]]
    assert proxies[0].release(entry, stmts, [held]) == [b"first guess"]
    # ... then rolls site 3's state file and etcd back and tries a second branch
    (tmp_path / "hsm-3.state").write_bytes(saved)
    site3 = hsm(tmp_path, "hsm-3", members)
    fork = site3.apply(base.head, [base.change("alice", live(2, 9))])
    fork_held = site3.hold(fork, b"second guess")
    votes = []
    for p in [site3, proxies[4], *proxies[:2]]:
        try:
            votes.append(await p.capture([fork]))
        except hlog.NotNextEntry:
            pass
    assert len(votes) == 2  # site 3 (rolled back) and site 5 (never saw the first branch)
    with pytest.raises(hlog.NoQuorum):
        site3.release(fork, votes, [fork_held])


async def test_statements_forged_or_from_outsiders_or_for_another_entry_do_not_count(tmp_path):
    members = ("hsm-1", "hsm-2", "hsm-3")
    proxies = [hsm(tmp_path, m, members) for m in members]
    island, _ = await registered(tmp_path, proxies)
    entry = proxies[0].apply(island.head, [island.change("alice", live(2, 9))])
    held = proxies[0].hold(entry, b"answer")
    own = await proxies[0].capture([entry])
    outsider = hsm(tmp_path, "hsm-9", ("hsm-9",))
    await outsider.capture([hlog.genesis(KEY, ISLAND)])
    bad = [own,
           dataclasses.replace(own, hsm="hsm-2"),                     # a statement relabelled
           hlog.Statement("hsm-9", ISLAND, entry.index, entry.mac, outsider._statement_tag(  # noqa: SLF001
               "hsm-9", ISLAND, entry.index, entry.mac)),              # a proxy outside the fleet
           dataclasses.replace(own, index=own.index + 1)]              # for another entry
    with pytest.raises(hlog.NoQuorum):
        proxies[0].release(entry, bad, [held])
    good = [own, await proxies[1].capture([entry])]
    assert proxies[0].release(entry, good, [held]) == [b"answer"]


async def test_an_answer_held_for_one_entry_does_not_open_for_another(tmp_path):
    island, (p,) = await registered(tmp_path)
    e1 = p.apply(island.head, [island.change("alice", live(2, 9))])
    held_for_e1 = p.hold(e1, b"one")
    e2 = p.apply(island.head, [island.change("alice", live(2, 9))])
    stmt = await p.capture([e2])
    with pytest.raises(hlog.LogError):
        p.release(e2, [stmt], [held_for_e1])


async def test_a_batch_is_one_entry_and_one_state_file_write(tmp_path):
    island, (p,) = await registered(tmp_path)
    writes = p._state.writes  # noqa: SLF001
    changes = [island.change(f"user-{i}", live(1, 10)) for i in range(50)]
    answers = await commit(island, [p], changes)
    assert answers == b"answer" and p._state.writes == writes + 1  # noqa: SLF001
    with pytest.raises(hlog.LogError):  # one record twice in a batch
        p.apply(island.head, [island.change("user-1", live(2, 9)), island.change("user-1", live(2, 9))])


def test_the_log_key_and_the_log_never_show_in_a_repr(tmp_path):
    state = StateFile(tmp_path / "s")
    state.load()
    text = repr(KEY) + repr(hlog.IslandLog(KEY, "hsm-1", ["hsm-1"], state))
    assert KEY.reveal().hex() not in text and "redacted" in text
