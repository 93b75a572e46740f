"""Which island holds a user is the admin's signed island set
(bkv_protocol.islands), kept in the token (bkv_hsm_proxy/islandset.py), not
etcd's word: the boundary signs ``no_record``/``record_destroyed`` and makes
a new record only on the one island that set says the user's record can be
on. Unit tests with the in-memory fakes; the same through every real
process: tests/test_island_set_fleet.py."""

from __future__ import annotations

import os

import opaque_ke_py as opaque
import pytest

from bkv_hsm_proxy import errors as herr
from bkv_hsm_proxy import islandset
from bkv_hsm_proxy.membership import fix_admin_key
from bkv_island import errors as ierr
from bkv_protocol import hsm_api as hapi
from bkv_protocol import island_api as iapi
from bkv_protocol import islands as isl
from bkv_protocol.bundle import RootKey
from bkv_protocol.encoding import user_ref
from bkv_server import fleetmap
from bkv_server.http import UpstreamError
from fakes import InMemoryHsmFake
from test_unit_vault_logic import _register, _registered, parts, refused  # noqa: F401  (fixture)

AB = ["island-a", "island-b"]


@pytest.fixture
def admin() -> RootKey:
    return RootKey.generate()


def _token(admin: RootKey, islands=("island-a",)) -> InMemoryHsmFake:
    hsm = InMemoryHsmFake()
    fix_admin_key(hsm, admin.public)
    islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(list(islands)), admin))
    return hsm


def _users(home: str, islands=AB, n: int = 2) -> list[str]:
    """Users whose home under ``islands`` is ``home``."""
    out, i = [], 0
    while len(out) < n:
        if isl.rendezvous(f"user-{i}", islands) == home:
            out.append(f"user-{i}")
        i += 1
    return out


# -- the set, its signature and its file ---------------------------------------------------------------
def test_a_signed_island_set_survives_its_file_and_verifies_under_its_admin_key(admin):
    signed = isl.sign(isl.IslandSet.of(["island-b", "island-a", "island-c"], 3, ["island-b", "island-a"]), admin)
    again = isl.SignedIslandSet.from_json(signed.to_json())
    s = isl.verify(again, admin.public)
    assert (s.epoch, s.islands, s.previous) == (3, ("island-a", "island-b", "island-c"), ("island-a", "island-b"))


@pytest.mark.parametrize("change", ["islands", "epoch", "previous", "signature"])
def test_an_island_set_changed_after_signing_does_not_verify(admin, change):
    signed = isl.sign(isl.IslandSet.of(AB, 2, ["island-a"]), admin)
    s = signed.set
    forged = {
        "islands": isl.IslandSet(s.epoch, ("island-a", "island-c"), s.previous),
        "epoch": isl.IslandSet(3, s.islands, s.previous),
        "previous": isl.IslandSet(s.epoch, s.islands, None),
        "signature": s,
    }[change]
    sig = bytes(64) if change == "signature" else signed.signature
    with pytest.raises(isl.BadIslandSetSignature):
        isl.verify(isl.SignedIslandSet(forged, signed.admin_public_key, sig), admin.public)


def test_an_island_set_signed_by_another_key_is_refused_even_if_it_carries_that_key(admin):
    with pytest.raises(isl.BadIslandSetSignature, match="another admin key"):
        isl.verify(isl.sign(isl.IslandSet.of(AB), RootKey.generate()), admin.public)


def test_a_member_set_signature_is_no_island_set_signature(admin):
    from bkv_protocol import members as ms

    member_sig = ms.sign(ms.MemberSet.of(["island-a"]), admin).signature
    with pytest.raises(isl.BadIslandSetSignature):
        isl.verify(isl.SignedIslandSet(isl.IslandSet.of(["island-a"]), admin.public, member_sig), admin.public)


@pytest.mark.parametrize("islands,epoch,previous", [
    ([], 1, None), (["Island-A"], 1, None), (["island a"], 1, None), (["island-a"], 0, None),
    (["island-a"], 1, ["island-b"]),        # the first set moves nothing
    (AB, 2, AB),                            # previous only while the islands change
])
def test_an_island_set_names_plain_ids_a_positive_epoch_and_a_previous_only_mid_migration(islands, epoch, previous):
    with pytest.raises(isl.MalformedIslandSet):
        isl.IslandSet.of(islands, epoch, previous)


def test_an_island_set_file_with_an_extra_field_an_unsorted_list_or_a_bad_key_does_not_parse(admin):
    text = isl.sign(isl.IslandSet.of(AB), admin).to_json()
    for bad in (text.replace('"epoch"', '"quorum": 1, "epoch"'), text.replace('"format": 1', '"format": 2'),
                text.replace('"island-a",\n    "island-b"', '"island-b",\n    "island-a"'),
                text.replace('"previous": null', '"previous": "island-a"'),
                text.replace('"admin_public_key": "', '"admin_public_key": "AAAA'), "[]", "{", '{"format": 1}'):
        assert bad != text
        with pytest.raises(isl.MalformedIslandSet):
            isl.SignedIslandSet.from_json(bad)


# -- where a user's record can be ----------------------------------------------------------------------
def test_the_home_is_the_rendezvous_the_frontend_routes_by_and_the_old_import_still_works():
    s = isl.IslandSet.of(AB)
    for i in range(50):
        assert s.home(user_ref(f"u{i}")) == fleetmap.rendezvous(f"u{i}", AB) == fleetmap.rendezvous_ref(
            user_ref(f"u{i}"), AB)


def test_adding_an_island_moves_only_the_users_that_now_belong_on_it_and_unsettles_only_them():
    old = isl.IslandSet.of(AB)
    moving, final = isl.migration(old, "island-c")
    assert (moving.epoch, moving.previous, final.epoch, final.previous) == (2, tuple(AB), 3, None)
    for i in range(200):
        ref = user_ref(f"u{i}")
        new_home = final.home(ref)
        assert new_home in (old.home(ref), "island-c")
        if new_home == old.home(ref):
            assert moving.candidates(ref) == (new_home,) and moving.settled(ref, new_home)
        else:  # its record may be on either island while records move: absent on one proves nothing
            assert set(moving.candidates(ref)) == {new_home, old.home(ref)}
            assert not moving.settled(ref, new_home) and not moving.settled(ref, old.home(ref))
        assert final.settled(ref, new_home)


# -- the token stores the admin's sets, once per epoch, one migration step at a time ----------------------
def test_the_first_set_is_stored_once_and_the_same_set_again_changes_nothing(admin):
    hsm = _token(admin, AB)
    assert islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(list(reversed(AB))), admin)) is False
    assert islandset.token_island_set(hsm) == isl.IslandSet.of(AB)


def test_the_token_refuses_another_key_another_set_for_an_epoch_it_holds_and_a_skipped_epoch(admin):
    hsm = _token(admin, AB)
    with pytest.raises(herr.IslandSetRefused, match="another admin key"):
        islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(AB + ["island-c"], 2, AB), RootKey.generate()))
    with pytest.raises(herr.IslandSetRefused, match="another island set for epoch 1"):
        islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(["island-a"]), admin))
    with pytest.raises(herr.IslandSetRefused, match="the next one is 2"):
        islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(AB + ["island-c"], 3), admin))
    assert islandset.token_island_set(hsm) == isl.IslandSet.of(AB)


def test_the_islands_change_only_through_a_migration_that_starts_from_the_islands_the_token_holds(admin):
    hsm = _token(admin, AB)
    abc = AB + ["island-c"]
    for bad, why in ((isl.IslandSet.of(abc, 2), "only through a migration"),
                     (isl.IslandSet.of(abc, 2, ["island-a"]), "previous must name exactly")):
        with pytest.raises(herr.IslandSetRefused, match=why):
            islandset.store_island_set(hsm, isl.sign(bad, admin))
    moving, final = isl.migration(isl.IslandSet.of(AB), "island-c")
    assert islandset.store_island_set(hsm, isl.sign(moving, admin)) is True
    with pytest.raises(herr.IslandSetRefused, match="only through a migration"):
        islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(["island-c"], 3), admin))
    assert islandset.store_island_set(hsm, isl.sign(final, admin)) is True
    assert islandset.token_island_set(hsm) == final


def test_a_set_without_an_admin_key_in_the_token_is_not_stored(admin):
    with pytest.raises(herr.IslandSetRefused, match="no admin key"):
        islandset.store_island_set(InMemoryHsmFake(), isl.sign(isl.IslandSet.of(AB), admin))


def test_a_tampered_set_object_in_the_token_stops_the_boundary_instead_of_deciding(admin):
    hsm = _token(admin, AB)
    hsm.store_blob("bkv-island-set/2", isl.sign(isl.IslandSet.of(AB + ["island-c"], 2, AB),
                                                RootKey.generate()).to_json().encode())
    with pytest.raises(herr.HsmError):
        islandset.token_island_set(hsm)


# -- the boundary's refusal rule ------------------------------------------------------------------------
def _store(vault, admin: RootKey, s: isl.IslandSet) -> None:
    vault.store_island_set(hapi.IslandSetIn(island_set=isl.sign(s, admin).to_json()))


def _guess(user: str) -> iapi.RecoverStartIn:
    return iapi.RecoverStartIn(user_id=user, request_id=os.urandom(16),
                             credential_request=opaque.client_login_start(b"pw").get_message())


@pytest.fixture
def two_islands(parts):
    """The unit fleet (replicas of island-a), its token's set signed by the fleet's admin key."""
    vault, island, etcd, _ = parts
    return vault, island, etcd, vault._hsm.admin  # noqa: SLF001


async def test_no_record_is_signed_only_on_the_island_the_signed_set_says_and_etcds_map_has_no_say(two_islands):
    vault, island, _, admin = two_islands
    moving, final = isl.migration(isl.IslandSet.of(["island-a"]), "island-b")
    here, there = _users("island-a"), _users("island-b")
    with pytest.raises(ierr.NoRecord) as signed:
        await island.recover_start(_guess(there[0]))  # one island: every user's home
    assert signed.value.signature
    _store(vault, admin, moving)
    _store(vault, admin, final)
    with pytest.raises(ierr.NoRecord) as signed:
        await island.recover_start(_guess(here[0]))
    assert signed.value.signature
    for user in there:  # routed here by a lying map: the island truthfully lacks the record, and nothing is signed
        with pytest.raises(UpstreamError) as wrong:
            await island.recover_start(_guess(user))
        assert refused(wrong) == "wrong_island" and wrong.value.status == 409
        assert wrong.value.body.error.signature is None


async def test_while_records_move_only_users_whose_home_stays_get_a_signed_refusal(two_islands):
    vault, island, _, admin = two_islands
    moving, final = isl.migration(isl.IslandSet.of(["island-a"]), "island-b")
    _store(vault, admin, moving)
    stays, leaves = _users("island-a"), _users("island-b")
    with pytest.raises(ierr.NoRecord):
        await island.recover_start(_guess(stays[0]))
    with pytest.raises(UpstreamError) as wrong:  # its record may already be on island-b: absent here proves nothing
        await island.recover_start(_guess(leaves[0]))
    assert refused(wrong) == "wrong_island"


async def test_a_set_stored_by_another_process_is_in_force_at_the_next_refusal(two_islands):
    vault, island, _, admin = two_islands
    leaves = _users("island-b")[0]
    with pytest.raises(ierr.NoRecord):
        await island.recover_start(_guess(leaves))  # the set of epoch 1 is now what the vault read last
    moving, _ = isl.migration(isl.IslandSet.of(["island-a"]), "island-b")
    islandset.store_island_set(vault._hsm, isl.sign(moving, admin))  # noqa: SLF001 - the CLI, beside the server
    with pytest.raises(UpstreamError) as wrong:
        await island.recover_start(_guess(leaves))
    assert refused(wrong) == "wrong_island"


async def test_a_new_record_is_made_only_on_the_users_island_and_a_live_one_elsewhere_still_recovers(two_islands):
    vault, island, etcd, admin = two_islands
    there = _users("island-b")
    await _registered(island, there[1])  # while island-a was every user's home
    moving, final = isl.migration(isl.IslandSet.of(["island-a"]), "island-b")
    _store(vault, admin, moving)
    _store(vault, admin, final)
    with pytest.raises(UpstreamError) as wrong:
        await _register(island, there[0])
    assert refused(wrong) == "wrong_island"
    start, fin, finish = await _register(island, _users("island-a")[0])
    await island.registration_finish(finish)
    # A record that is live here is a fact the log proves: its user still recovers it here.
    login = opaque.client_login_start(b"pw")
    out = await island.recover_start(iapi.RecoverStartIn(user_id=there[1], request_id=os.urandom(16),
                                                     credential_request=login.get_message()))
    assert out.attempts_left == 2


def test_a_record_moves_only_to_its_home_under_the_tokens_set(two_islands):
    vault, _, _, admin = two_islands
    moving, _ = isl.migration(isl.IslandSet.of(["island-a"]), "island-b")
    _store(vault, admin, moving)
    ref = user_ref(_users("island-a")[0])
    live = hapi.Entry(state=hapi.EntryState.LIVE, version=1, sealed=os.urandom(60))
    with pytest.raises(herr.WrongIsland):
        vault.move_out(hapi.MoveOutIn(user_ref=ref, island="island-a", current=live, to_island="island-b"))


async def test_a_token_without_an_island_set_signs_no_refusal_and_makes_no_new_record(parts):
    vault, island, _, _ = parts
    vault._hsm._blobs = {k: v for k, v in vault._hsm._blobs.items()  # noqa: SLF001 - a token from before island sets
                         if not k.startswith(islandset.ISLAND_SET_LABEL)}
    vault._islands = None  # noqa: SLF001
    with pytest.raises(UpstreamError) as none:
        await island.recover_start(_guess("nobody"))
    assert refused(none) == "wrong_island" and "no island set" in none.value.body.error.message
    with pytest.raises(UpstreamError) as none:
        await _register(island, "newcomer")
    assert refused(none) == "wrong_island"


async def test_a_registration_started_before_a_migration_unsettled_its_user_is_not_finished(two_islands):
    vault, island, etcd, admin = two_islands
    leaves = _users("island-b")[0]
    _, _, finish = await _register(island, leaves)  # its challenge, while island-a was every user's home
    moving, _ = isl.migration(isl.IslandSet.of(["island-a"]), "island-b")
    _store(vault, admin, moving)
    with pytest.raises(UpstreamError) as wrong:
        await island.registration_finish(finish)
    assert refused(wrong) == "wrong_island" and wrong.value.status == 409
    assert not [k for k in etcd.kv if k.endswith(user_ref(leaves).encode())]  # no record was made
