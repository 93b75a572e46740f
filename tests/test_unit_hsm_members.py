"""The fleet's hsm-proxies are fixed in the token at fleet-init
(bkv_hsm_proxy/fleet_init.py); an hsm-proxy serves only with a state file
naming that very set. Unit tests with the in-memory HSM fake; the same
through real processes: tests/test_hsm_boundary_forks.py."""

from __future__ import annotations

import pytest

from bkv_hsm_proxy.fleet_init import MembersFixed, check_members, fix_members, token_members
from fakes import InMemoryHsmFake


def test_the_member_set_is_stored_once_and_the_same_set_again_changes_nothing():
    hsm = InMemoryHsmFake()
    assert token_members(hsm) is None
    assert fix_members(hsm, ["hsm-2", "hsm-0", "hsm-1"]) is True
    assert fix_members(hsm, ["hsm-0", "hsm-1", "hsm-2"]) is False  # order does not matter
    assert token_members(hsm) == ["hsm-0", "hsm-1", "hsm-2"]


def test_another_member_set_is_refused_and_the_token_keeps_the_first():
    hsm = InMemoryHsmFake()
    fix_members(hsm, ["hsm-0", "hsm-1", "hsm-2"])
    with pytest.raises(MembersFixed, match="cannot be changed"):
        fix_members(hsm, ["hsm-2"])
    assert token_members(hsm) == ["hsm-0", "hsm-1", "hsm-2"]


def test_a_state_file_made_again_with_a_quorum_of_its_own_does_not_serve():
    hsm = InMemoryHsmFake()
    fix_members(hsm, ["hsm-0", "hsm-1", "hsm-2"])
    check_members(hsm, ["hsm-1", "hsm-0", "hsm-2"])  # the fleet's own set: serves
    for forged in (["hsm-2"], ["hsm-0", "hsm-1"], ["hsm-0", "hsm-1", "hsm-2", "hsm-9"]):
        with pytest.raises(MembersFixed, match="made again with another set"):
            check_members(hsm, forged)


def test_a_token_without_a_member_set_does_not_serve():
    with pytest.raises(MembersFixed, match="fleet-init --hsm-members"):
        check_members(InMemoryHsmFake(), ["hsm-0"])
