"""Compacting an island's log against real etcd (bkv_island.appender.Appender.compact):
old entries go, records and the head stay, and a replica reads the island
whole afterwards. The boundary is the in-process VaultHsm (the logic's own
unit tests: test_unit_vault_logic.py)."""

from __future__ import annotations

import os

from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.nvram import StateFile
from bkv_island.core import Island
from bkv_island.ledger import Ledger
from fakes import InMemoryHsmFake, InProcessHsmFake, with_island_set
from test_unit_vault_logic import _registered


async def test_old_log_entries_are_deleted_from_etcd_and_a_new_replica_still_loads_the_island(etcd, tmp_path):
    hsm = InMemoryHsmFake()
    VaultHsm.create_opaque_setup(hsm)
    with_island_set(hsm)
    vault = VaultHsm(hsm, max_attempts=3)
    state = StateFile(tmp_path / "state")
    state.load()
    vault.attach_log(state, "hsm-0", ["hsm-0"])
    prefix = f"/bkv-compaction-{os.urandom(4).hex()}"
    port = InProcessHsmFake(vault)
    island = Island("island-a", Ledger("island-a", etcd, prefix, port, retain=4, compact_every=4), port)
    for i in range(12):
        await _registered(island, f"u{i}")
    entries = f"{prefix}/log/island-a/entries/".encode()

    async def kept() -> list[int]:
        return sorted(int(kv.key[len(entries):]) for kv in await etcd.get_prefix(entries))

    got: list[int] = []

    async def compacted() -> bool:
        got[:] = await kept()
        return got[0] == 8

    await until_async(compacted)
    assert got == [8, 9, 10, 11, 12]
    fresh = Ledger("island-a", etcd, prefix, InProcessHsmFake(vault))
    await fresh.load()  # the records add up to the head without the old entries
    assert fresh.head.index == 12 and len(fresh.records) == 12
    await etcd.delete_prefix(prefix.encode())


async def until_async(predicate, deadline_s: float = 10.0) -> None:
    import asyncio

    end = asyncio.get_running_loop().time() + deadline_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < end, "not within the deadline"
        await asyncio.sleep(0.05)
