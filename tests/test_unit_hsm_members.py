"""The fleet's hsm-proxies are a set the offline admin key signs
(bkv_protocol.members), fixed in the token at fleet-init with the admin's
public key (bkv_hsm_proxy/membership.py); an hsm-proxy serves only with a
state file naming that very set. Unit tests with the in-memory HSM fake; the
same through real processes: tests/test_hsm_boundary_forks.py."""

from __future__ import annotations

import pytest

from bkv_hsm_proxy import nvram
from bkv_hsm_proxy.membership import (MembersFixed, check_members, fix_admin_key, fix_member_set,
                                      token_member_set)
from bkv_protocol import members as ms
from bkv_protocol.bundle import RootKey
from fakes import InMemoryHsmFake

THREE = ["hsm-0", "hsm-1", "hsm-2"]


@pytest.fixture
def admin() -> RootKey:
    return RootKey.generate()


def _token(admin: RootKey, members=THREE) -> InMemoryHsmFake:
    hsm = InMemoryHsmFake()
    fix_admin_key(hsm, admin.public)
    fix_member_set(hsm, ms.sign(ms.MemberSet.of(members), admin))
    return hsm


def _identity(s: ms.MemberSet, hsm: str = "hsm-0") -> nvram.Identity:
    return nvram.Identity(hsm, s.members, s.epoch, s.digest())


def test_a_signed_member_set_survives_its_file_and_verifies_under_its_admin_key(admin):
    signed = ms.sign(ms.MemberSet.of(["hsm-2", "hsm-0", "hsm-1"]), admin)
    again = ms.SignedMemberSet.from_json(signed.to_json())
    assert ms.verify(again, admin.public).members == tuple(THREE)  # sorted, each once


@pytest.mark.parametrize("change", ["members", "epoch", "heads", "signature"])
def test_a_member_set_changed_after_signing_does_not_verify(admin, change):
    signed = ms.sign(ms.MemberSet.of(THREE, epoch=2, heads={"a": (7, bytes(32))}), admin)
    s = signed.set
    forged = {
        "members": ms.SignedMemberSet(ms.MemberSet(s.epoch, ("hsm-0",), s.heads), signed.admin_public_key,
                                      signed.signature),
        "epoch": ms.SignedMemberSet(ms.MemberSet(3, s.members, s.heads), signed.admin_public_key, signed.signature),
        "heads": ms.SignedMemberSet(ms.MemberSet(s.epoch, s.members, {"a": (6, bytes(32))}),
                                    signed.admin_public_key, signed.signature),
        "signature": ms.SignedMemberSet(s, signed.admin_public_key, bytes(64)),
    }[change]
    with pytest.raises(ms.BadMemberSignature):
        ms.verify(forged, admin.public)


def test_a_member_set_signed_by_another_key_is_refused_even_if_it_carries_that_key(admin):
    other = RootKey.generate()
    with pytest.raises(ms.BadMemberSignature, match="another admin key"):
        ms.verify(ms.sign(ms.MemberSet.of(["hsm-0"]), other), admin.public)


@pytest.mark.parametrize("members", [[], ["HSM-0"], ["hsm-0", "hsm 1"], [f"hsm-{i}" for i in range(17)]])
def test_a_member_set_names_one_to_sixteen_plain_ids(members):
    with pytest.raises(ms.MalformedMemberSet):
        ms.MemberSet.of(members)


def test_a_member_set_file_with_an_extra_field_or_a_bad_key_does_not_parse(admin):
    text = ms.sign(ms.MemberSet.of(THREE), admin).to_json()
    for bad in (text.replace('"epoch"', '"quorum": 1, "epoch"'), text.replace('"format": 1', '"format": 2'),
                "[]", "{", '{"format": 1}'):
        with pytest.raises(ms.MalformedMemberSet):
            ms.SignedMemberSet.from_json(bad)


def test_the_admin_key_and_the_first_set_are_stored_once_and_the_same_again_changes_nothing(admin):
    hsm = _token(admin)
    assert fix_admin_key(hsm, admin.public) is False
    assert fix_member_set(hsm, ms.sign(ms.MemberSet.of(list(reversed(THREE))), admin)) is False
    assert token_member_set(hsm).members == tuple(THREE)


def test_another_admin_key_or_another_set_is_refused_and_the_token_keeps_the_first(admin):
    hsm = _token(admin)
    with pytest.raises(MembersFixed, match="another admin key"):
        fix_admin_key(hsm, RootKey.generate().public)
    with pytest.raises(MembersFixed, match="change ceremony"):
        fix_member_set(hsm, ms.sign(ms.MemberSet.of(["hsm-2"]), admin))
    assert token_member_set(hsm).members == tuple(THREE)


def test_a_set_not_signed_by_the_tokens_admin_key_is_not_stored(admin):
    hsm = InMemoryHsmFake()
    fix_admin_key(hsm, admin.public)
    with pytest.raises(MembersFixed, match="another admin key"):
        fix_member_set(hsm, ms.sign(ms.MemberSet.of(["hsm-0"]), RootKey.generate()))
    assert token_member_set(hsm) is None


def test_a_set_without_an_admin_key_in_the_token_is_not_stored(admin):
    with pytest.raises(MembersFixed, match="no admin key"):
        fix_member_set(InMemoryHsmFake(), ms.sign(ms.MemberSet.of(THREE), admin))


def test_a_state_file_made_again_with_a_quorum_of_its_own_does_not_serve(admin):
    hsm = _token(admin)
    check_members(hsm, _identity(ms.MemberSet.of(THREE), "hsm-1"))  # the fleet's own set: serves
    for forged in (["hsm-2"], ["hsm-0", "hsm-1"], THREE + ["hsm-9"]):
        with pytest.raises(MembersFixed, match="made again with another set"):
            check_members(hsm, _identity(ms.MemberSet.of(forged), forged[0]))


def test_a_token_without_a_member_set_does_not_serve():
    with pytest.raises(MembersFixed, match="no member set"):
        check_members(InMemoryHsmFake(), _identity(ms.MemberSet.of(["hsm-0"])))


def test_a_freeze_order_survives_its_file_and_only_the_tokens_admin_key_makes_one(admin):
    order = ms.FreezeOrder.from_json(ms.sign_freeze(3, admin).to_json())
    assert ms.verify_freeze(order, admin.public) == 3
    with pytest.raises(ms.BadMemberSignature, match="another admin key"):
        ms.verify_freeze(ms.sign_freeze(3, RootKey.generate()), admin.public)
    with pytest.raises(ms.BadMemberSignature, match="does not verify"):
        ms.verify_freeze(ms.FreezeOrder(4, order.admin_public_key, order.signature), admin.public)  # another epoch
    for bad in ('{"format": 1, "freeze_epoch": 0}', "[]", ms.sign_freeze(3, admin).to_json().replace('"format"', '"f"')):
        with pytest.raises(ms.MalformedMemberSet):
            ms.FreezeOrder.from_json(bad)
