"""Issue #17's attacks 5 and 7 through real processes (etcd, SoftHSM2,
hsm-proxies with their state files, island, frontend): an insider who plays
the island -- shows the hsm-proxies whatever log it likes -- and who can
roll back one site's state file together with etcd never gets a second
branch of the log committed, so never an answer the log did not pay for.

The same rules on the log alone: tests/test_unit_hsm_log.py; attack 6 (an
hsm-proxy killed mid-load, then restarted) runs in tests/test_faults.py."""

from __future__ import annotations

import contextlib
import os
import sys

import opaque_ke_py as opaque
import pytest

from bkv_dev.fleet import start_fleet
from bkv_island.hsm_client import HsmHttpClient
from bkv_island.ledger import Ledger
from bkv_protocol import hsm_api as hapi
from bkv_protocol import members
from bkv_protocol.bundle import RootKey
from bkv_protocol.encoding import user_ref
from bkv_server.etcd import connect
from bkv_server.http import ServiceClient, UpstreamError
from test_hsm_boundary_attacks import ISLAND, PW, device, fails_closed, registered, restart_island
from support import procs


def fleet_with(tmp_path_factory, n: int):
    return start_fleet(tmp_path_factory.mktemp(f"forks{n}"), islands=[ISLAND], replicas_per_island=1,
                       hsm_proxies=n)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    f = fleet_with(tmp_path_factory, 3)
    yield f
    f.down()


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    f = fleet_with(tmp_path_factory, 5)
    yield f
    f.down()


class Insider:
    """Reaches every hsm-proxy as an island does, one by one."""

    def __init__(self, fleet) -> None:
        self.urls = [f"http://127.0.0.1:{fleet.ports.hsm_proxy(i)}" for i in range(fleet.spec.hsm_proxies)]
        self.one = [ServiceClient(f"hsm-proxy-{i}", [u]) for i, u in enumerate(self.urls)]

    async def guess(self, i: int, head: hapi.LogEntry, user: str, current: hapi.Entry, proof: bytes,
                    password: str = PW) -> hapi.ApplyOut:
        """hsm-proxy ``i`` applies one guess against ``head``: a candidate entry and a held answer."""
        out = await self.one[i].call("POST", "/hsm/v1/log/apply", hapi.ApplyIn(head=head, ops=[hapi.Op(
            kind=hapi.OpKind.RECOVER_START, proof=proof, recover_start=hapi.RecoverStartIn(
                user_id=user, island=ISLAND, request_id=os.urandom(16), current=current,
                credential_request=opaque.client_login_start(password.encode()).get_message()))]),
            hapi.ApplyOut, idempotent=True)
        assert out.entry is not None and out.results[0].held is not None
        return out

    async def capture(self, i: int, entry: hapi.LogEntry) -> hapi.Statement | str:
        """The statement, or the code of the refusal."""
        try:
            return (await self.one[i].call("POST", "/hsm/v1/log/capture", hapi.CaptureIn(entries=[entry]),
                                           hapi.CaptureOut, idempotent=True)).statement
        except UpstreamError as exc:
            return exc.body.error.code.value

    async def release(self, i: int, out: hapi.ApplyOut, statements: list[hapi.Statement]) -> list[bytes] | str:
        try:
            return (await self.one[i].call("POST", "/hsm/v1/log/release", hapi.ReleaseIn(
                entry=out.entry, statements=statements, held=[out.results[0].held]), hapi.ReleaseOut,
                idempotent=True)).answers
        except UpstreamError as exc:
            return exc.body.error.code.value

    async def heads(self, i: int) -> hapi.LogHeadsOut:
        return await self.one[i].call("GET", "/hsm/v1/log/heads", None, hapi.LogHeadsOut, idempotent=True)

    async def aclose(self) -> None:
        for c in self.one:
            await c.aclose()


async def island_view(fleet, etcd, user: str) -> tuple[hapi.LogEntry, hapi.Entry, bytes]:
    """What the island reads from etcd: the head, the user's record and its proof."""
    hsm = HsmHttpClient([f"http://127.0.0.1:{fleet.ports.hsm_proxy(0)}"])
    try:
        ledger = Ledger(ISLAND, etcd, "/bkv", hsm)
        await ledger.load()
        ref = user_ref(user)
        return ledger.head, ledger.current(ref), ledger.trie.prove(bytes.fromhex(ref)).to_bytes()
    finally:
        await hsm.aclose()


@contextlib.asynccontextmanager
async def attacked(fleet):
    """A fresh user on ``fleet``; an etcd client and an insider, closed after."""
    user, k = await registered(fleet)
    etcd = await connect(fleet.etcd_endpoints)
    insider = Insider(fleet)
    try:
        yield user, k, etcd, insider
    finally:
        await insider.aclose()
        await etcd.close()


async def test_three_hsm_proxies_capture_everywhere_and_release_in_a_call_of_its_own(three):
    from test_hsm_log_release_on_capture import releases

    user, k = await registered(three)
    before = releases(three)
    async with device(three, user) as phone:
        assert (await phone.recover(PW)).key == k
    assert releases(three) >= before + 2  # no capture alone is a quorum of 2: login start and finish released apart


async def test_an_hsm_proxy_killed_after_apply_and_before_persisting_a_capture_releases_nothing(three):
    async with attacked(three) as (user, k, etcd, insider):
        head, current, proof = await island_view(three, etcd, user)
        before = [(await insider.heads(i)).heads[ISLAND] for i in range(3)]
        processed = await insider.guess(0, head, user, current, proof)  # the right password, held
        three.kill("hsm-proxy0")  # dies before any capture is persisted
        three.start("hsm-proxy0")
        assert [(await insider.heads(i)).heads[ISLAND] for i in range(3)] == before  # nothing persisted
        for i in range(3):
            assert await insider.release(i, processed, []) == "no_quorum"  # so nothing leaves
        # The island never saw that candidate: the next recovery works, counted from the log.
        async with device(three, user) as phone:
            assert (await phone.recover(PW)).key == k


async def test_a_fork_shown_to_three_hsm_proxies_commits_at_most_one_branch(three):
    async with attacked(three) as (user, _, etcd, insider):
        head, current, proof = await island_view(three, etcd, user)
        # Two appenders at once: two candidates for the same next index, each with the right password.
        a = await insider.guess(0, head, user, current, proof)
        b = await insider.guess(1, head, user, current, proof)
        assert a.entry.index == b.entry.index == head.index + 1 and a.entry.mac != b.entry.mac
        # Branch a shown to hsm-proxy 0, branch b to hsm-proxies 1 and 2.
        sa = await insider.capture(0, a.entry)
        sb = [await insider.capture(i, b.entry) for i in (1, 2)]
        assert all(isinstance(s, hapi.Statement) for s in (sa, *sb))
        # Each refuses the other branch at that index: a fork is never captured.
        assert await insider.capture(0, b.entry) == "not_next_entry"
        assert [await insider.capture(i, a.entry) for i in (1, 2)] == ["not_next_entry"] * 2
        # b has a quorum (2 of 3) and is released once; a never is, even with b's statements beside it.
        assert (await insider.heads(0)).quorum == 2
        assert len(await insider.release(2, b, sb)) == 1
        for i in range(3):
            assert await insider.release(i, a, [sa]) == "no_quorum"
            assert await insider.release(i, a, [sa, *sb]) == "no_quorum"
        # The insider never appended b to etcd: the island finds the boundary ahead of etcd and closes.
        restart_island(three)
        await fails_closed(three, user)


async def test_one_sites_state_file_rolled_back_cannot_commit_a_second_branch_among_five(five):
    async with attacked(five) as (user, k, etcd, insider):
        assert (await insider.heads(0)).quorum == 4  # 4 of 5: two quorums share more than one site
        async with device(five, user) as phone:  # a working fleet, before the attack
            assert (await phone.recover(PW)).key == k
        head, current, proof = await island_view(five, etcd, user)
        saved = five.hsm_state_file(3).read_bytes()  # site 3's state file before the guess (etcd: never written)
        # The first guess, captured on a bare quorum only: sites 0-3; site 4 never sees it.
        first = await insider.guess(0, head, user, current, proof)
        votes = [await insider.capture(i, first.entry) for i in range(4)]
        assert len(await insider.release(0, first, votes)) == 1
        # Site 3's state file rolled back (the hsm-proxy restarted on the old copy), and etcd
        # still shows the old head: a second branch from the same head...
        five.kill("hsm-proxy3")
        five.hsm_state_file(3).write_bytes(saved)
        five.start("hsm-proxy3")
        assert (await insider.heads(3)).heads[ISLAND].index == head.index  # really rolled back
        fork = await insider.guess(3, head, user, current, proof)
        fork_votes = [s for i in range(5) if isinstance(s := await insider.capture(i, fork.entry), hapi.Statement)]
        # ...is captured by site 3 (rolled back) and site 4 (never saw the first branch) only.
        assert sorted(s.hsm for s in fork_votes) == ["hsm-3", "hsm-4"]
        for i in range(5):
            assert await insider.release(i, fork, fork_votes) == "no_quorum"
        # Nor does the vault answer from this state; K does not come back for the right password.
        restart_island(five)
        await fails_closed(five, user)



def test_a_state_file_wiped_and_made_again_with_a_quorum_of_one_does_not_serve(three):
    """Root on one host wipes an hsm-proxy's state file and makes it again
    naming that hsm-proxy alone (it would then be a quorum by itself), the
    set signed by an admin key of its own: it has not the fleet's."""
    three.kill("hsm-proxy2")
    path = three.hsm_state_file(2)
    saved = path.read_bytes()
    proc = three.procs["hsm-proxy2"]
    forged = path.with_name("forged-set.json")
    forged.write_text(members.sign(members.MemberSet.of(["hsm-2"]), RootKey.generate()).to_json())
    try:
        path.unlink()
        made = procs.run([sys.executable, "-m", "bkv_hsm_proxy", "init-state", "--hsm-id", "hsm-2",
                               "--member-set", str(forged), "--state-file", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr  # the file is made: nothing stops root doing that...
        served = procs.run(proc.argv, env={**os.environ, **proc.env}, capture_output=True, text=True,
                                timeout=60)
        # ...but the hsm-proxy does not serve on it: the token holds the fleet's set.
        assert served.returncode == 4, served.stderr
        assert "made again with another set" in served.stderr
    finally:
        path.write_bytes(saved)
        three.start("hsm-proxy2")
