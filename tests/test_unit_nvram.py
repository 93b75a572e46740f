"""Unit tests of the hsm-proxy's persistent head state (bkv_hsm_proxy/nvram.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat
import threading

import pytest

from bkv_hsm_proxy.nvram import (
    FleetMismatch, Head, HeadRegression, StateFile, StateFileCorrupt, StateWriteFailed,
)
from support import procs


def head(index: int, tag: int = 0) -> Head:
    return Head(index, bytes([index % 256, tag]) * 16, bytes([tag, index % 256]) * 16)


def loaded(path, fleet: str = "fleet-a") -> StateFile:
    sf = StateFile(path, fleet)
    sf.load()
    return sf


async def test_heads_survive_a_round_trip_through_the_file(tmp_path):
    path = tmp_path / "heads.json"
    sf = loaded(path)
    assert sf.heads() == {} and sf.head("a") is None and not path.exists()
    await sf.persist({"a": head(1), "b": head(7)})
    await sf.persist({"a": head(2)})
    again = loaded(path)
    assert again.heads() == sf.heads() == {"a": head(2), "b": head(7)}
    assert again.head("b") == head(7) and again.durable_heads() == again.heads()
    assert (sf.writes, sf.heads_written, sf.persist_calls) == (2, 3, 2)
    assert json.loads(path.read_text())["fleet"] == "fleet-a"


async def test_many_concurrent_callers_share_few_writes_and_all_are_durable(tmp_path):
    path = tmp_path / "heads.json"
    sf = loaded(path)
    rng = random.Random(1)

    async def caller(i: int) -> None:
        for _ in range(rng.randrange(30)):  # arrive at different moments
            await asyncio.sleep(0)
        await sf.persist({f"island-{i}": head(i)})
        assert loaded(path).head(f"island-{i}") == head(i)  # on disk when persist returns

    await asyncio.gather(*(caller(i) for i in range(200)))
    assert 1 <= sf.writes < 20
    assert loaded(path).heads() == {f"island-{i}": head(i) for i in range(200)}
    assert sf.heads_written == 200 and sf.waiting == 0


async def test_updates_arriving_during_a_write_go_out_together_in_the_next_one(tmp_path, monkeypatch):
    sf = loaded(tmp_path / "heads.json")
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def blocking_fsync(fd):
        if not release.is_set():
            entered.set()
            release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", blocking_fsync)
    first = asyncio.create_task(sf.persist({"island-0": head(0)}))
    assert await asyncio.to_thread(entered.wait, 10)  # the first write is in flight
    rest = [asyncio.create_task(sf.persist({f"island-{i}": head(i)})) for i in range(1, 200)]
    while sf.waiting < 200:
        await asyncio.sleep(0)
    assert sf.writes == 0 and not first.done()
    release.set()
    await asyncio.gather(first, *rest)
    assert sf.writes == 2 and len(loaded(tmp_path / "heads.json").heads()) == 200


async def test_a_caller_superseded_by_a_newer_head_returns_once_the_newer_one_is_durable(tmp_path):
    sf = loaded(tmp_path / "heads.json")
    await asyncio.gather(sf.persist({"a": head(1)}), sf.persist({"a": head(2)}))
    assert sf.writes == 1 and loaded(tmp_path / "heads.json").head("a") == head(2)


async def test_a_failed_rename_keeps_the_old_file_and_fails_every_caller_of_that_write(tmp_path, monkeypatch):
    path = tmp_path / "heads.json"
    sf = loaded(path)
    await sf.persist({"a": head(1)})
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    results = await asyncio.gather(*(sf.persist({"a": head(2), f"b{i}": head(i)}) if i == 0 else
                                     sf.persist({f"b{i}": head(i)}) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, StateWriteFailed) and isinstance(r.__cause__, OSError) for r in results)
    assert path.read_bytes() == before and loaded(path).heads() == {"a": head(1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json"]  # no temp file left
    assert sf.write_failures == 1 and sf.durable_heads() == {"a": head(1)}
    # The failed heads stay accepted (no going back to 1) and go out with the next write.
    with pytest.raises(HeadRegression):
        await sf.persist({"a": head(1, tag=9)})
    monkeypatch.undo()
    await sf.persist({"c": head(3)})
    assert loaded(path).head("a") == head(2) and len(loaded(path).heads()) == 7


@pytest.mark.parametrize("content", [
    b"", b"{", b"\xff\xfe", b"[]", b"null", b"[" * 100_000,
    b'{"format":3,"fleet":"fleet-a","frozen":false,"heads":{}}',  # no checksum
])
def test_an_unreadable_file_is_refused_rather_than_taken_as_empty(tmp_path, content):
    path = tmp_path / "heads.json"
    path.write_bytes(content)
    with pytest.raises(StateFileCorrupt):
        loaded(path)


async def test_a_file_changed_on_disk_is_refused(tmp_path):
    path = tmp_path / "heads.json"
    await loaded(path).persist({"a": head(17)})
    good = path.read_text()
    assert '"index":17' in good
    for bad in (good.replace('"index":17', '"index":16'),   # checksum catches a plausible older head
                good[: len(good) // 2],                       # truncated
                good.replace('"format":3', '"format":4'),
                good.replace('"frozen":false', '"frozen":true')):  # a freeze cannot be forged past the checksum
        path.write_text(bad)
        with pytest.raises(StateFileCorrupt):
            loaded(path)
    path.write_text(good)
    with pytest.raises(FleetMismatch):
        loaded(path, fleet="fleet-b")
    assert loaded(path).head("a") == head(17)


async def test_heads_never_go_backwards_or_fork(tmp_path):
    sf = loaded(tmp_path / "heads.json")
    await sf.persist({"a": head(5)})
    for bad in (head(4), head(5, tag=1), Head(5, head(5).mac, bytes(32))):
        with pytest.raises(HeadRegression):
            await sf.persist({"a": bad})
    # Nothing of a refused batch is applied, not even its good part.
    with pytest.raises(HeadRegression):
        await sf.persist({"b": head(1), "a": head(3)})
    assert sf.head("b") is None
    writes = sf.writes
    await sf.persist({"a": head(5)})  # a repeat: already durable, no write
    assert sf.writes == writes
    # Against a head still pending too: the second caller is refused at once.
    results = await asyncio.gather(sf.persist({"a": head(9)}), sf.persist({"a": head(8)}),
                                   return_exceptions=True)
    assert results[0] is None and isinstance(results[1], HeadRegression)
    assert loaded(tmp_path / "heads.json").head("a") == head(9)


async def test_the_file_is_private_to_its_owner_whatever_the_umask(tmp_path):
    path = tmp_path / "heads.json"
    old = os.umask(0)
    try:
        await loaded(path).persist({"a": head(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    path = tmp_path / "heads.json"
    sf = loaded(path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await sf.persist({"a": head(1)})
    ino = path.stat().st_ino
    assert events == [("fsync-file", ino), ("replace", ino), ("fsync-dir", tmp_path.stat().st_ino)]


async def test_persisting_before_load_is_refused_and_heads_are_validated(tmp_path):
    with pytest.raises(RuntimeError):
        await StateFile(tmp_path / "heads.json").persist({"a": head(1)})
    for bad in ((-1, bytes(32), bytes(32)), (1, b"short", bytes(32)), (True, bytes(32), bytes(32))):
        with pytest.raises(ValueError):
            Head(*bad)
    assert "Head(index=3, mac=03000300" in repr(head(3))


async def test_a_cancelled_caller_does_not_cancel_the_write_others_wait_for(tmp_path):
    sf = loaded(tmp_path / "heads.json")
    t1 = asyncio.create_task(sf.persist({"a": head(1)}))
    t2 = asyncio.create_task(sf.persist({"b": head(1)}))
    while sf.waiting < 2:
        await asyncio.sleep(0)
    t1.cancel()
    await t2
    with pytest.raises(asyncio.CancelledError):
        await t1
    assert loaded(tmp_path / "heads.json").heads() == {"a": head(1), "b": head(1)}


async def test_a_frozen_file_stays_frozen_with_its_heads_and_a_file_never_unfreezes(tmp_path):
    path = tmp_path / "heads.json"
    sf = loaded(path)
    await sf.persist({"a": head(3)})
    assert not loaded(path).frozen
    await sf.freeze()
    again = loaded(path)
    assert again.frozen and again.heads() == {"a": head(3)}
    await again.persist({"a": head(4)})  # what the file holds is still written whole...
    assert loaded(path).frozen  # ...and frozen stays


def test_init_state_makes_the_file_once_and_serve_refuses_to_start_without_one(tmp_path):
    import subprocess
    import sys

    from bkv_hsm_proxy import nvram
    from bkv_protocol.members import MemberSet

    path = tmp_path / "hsm" / "state.json"
    three = MemberSet.of(["hsm-0", "hsm-1", "hsm-2"])
    with pytest.raises(nvram.StateFileError, match="init-state"):
        nvram.open_state(path)  # missing: a rolled-back (or never made) hsm-proxy, never an empty start
    nvram.init_state(path, "hsm-1", three)
    state, identity = nvram.open_state(path)
    assert (identity.hsm, identity.members, identity.epoch, identity.set_digest, state.heads()) == (
        "hsm-1", ("hsm-0", "hsm-1", "hsm-2"), 1, three.digest(), {})
    with pytest.raises(nvram.StateFileError, match="never replaced"):
        nvram.init_state(path, "hsm-1", MemberSet.of(["hsm-1"]))
    with pytest.raises(ValueError):
        nvram.init_state(tmp_path / "other.json", "hsm-9", MemberSet.of(["hsm-0"]))  # not a member of its own fleet
    cli = procs.run([sys.executable, "-m", "bkv_hsm_proxy", "log-heads", "--state-file", str(path)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0 and '"members": ["hsm-0", "hsm-1", "hsm-2"]' in cli.stdout, cli.stderr


def test_every_state_file_made_gets_a_birth_id_of_its_own_kept_by_every_write(tmp_path):
    from bkv_hsm_proxy import nvram
    from bkv_protocol.members import MemberSet

    three = MemberSet.of(["hsm-0", "hsm-1", "hsm-2"])
    a, b = nvram.init_state(tmp_path / "a", "hsm-1", three), nvram.init_state(tmp_path / "b", "hsm-1", three)
    assert a == b and a.born != b.born and len(a.born) == 16  # the same identity, made twice
    state, identity = nvram.open_state(tmp_path / "a")
    asyncio.run(state.persist({"x": head(1)}))
    assert nvram.open_state(tmp_path / "a")[1].born == a.born


def _format_2(tmp_path, heads: dict | None = None, frozen: bool = False):
    """A state file as the build before birth ids wrote it."""
    import hashlib

    from bkv_hsm_proxy import nvram
    from bkv_protocol.members import MemberSet

    three = MemberSet.of(["hsm-0", "hsm-1", "hsm-2"])
    made = nvram.init_state(tmp_path / "new", "hsm-1", three)
    old_identity = json.loads(made.encode())
    del old_identity["born"]
    body = {"format": 2, "fleet": json.dumps(old_identity, sort_keys=True, separators=(",", ":")), "frozen": frozen,
            "heads": heads or {}}
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "old").write_text(json.dumps(body, sort_keys=True, separators=(",", ":")))
    return tmp_path / "old", made


def test_a_state_file_of_the_format_before_birth_ids_is_refused_saying_so(tmp_path):
    from bkv_hsm_proxy import nvram

    old, _ = _format_2(tmp_path)
    with pytest.raises(StateFileCorrupt, match="format 2, made by an older build .*upgrade a format-2 file"):
        nvram.open_state(old)


def test_serve_upgrades_a_format_2_file_with_its_heads_frozen_flag_and_a_new_birth_id(tmp_path):
    from bkv_hsm_proxy import nvram

    h = {"island-a": {"index": 7, "mac": "ab" * 32, "root": "cd" * 32}}
    old, made = _format_2(tmp_path, heads=h, frozen=True)
    assert nvram.upgrade_state(old) is True
    state, identity = nvram.open_state(old)
    assert identity == made and len(identity.born) == nvram.BORN_BYTES  # same hsm-proxy and set, born now
    assert state.heads() == {"island-a": Head(7, bytes.fromhex("ab" * 32), bytes.fromhex("cd" * 32))}
    assert state.frozen is True
    assert nvram.upgrade_state(old) is False  # once: a format-3 file is left as it is
    assert nvram.open_state(old)[1].born == identity.born


def test_a_format_2_file_that_does_not_check_out_is_not_upgraded(tmp_path):
    from bkv_hsm_proxy import nvram

    old, _ = _format_2(tmp_path, heads={"island-a": {"index": 7, "mac": "ab" * 32, "root": "cd" * 32}})
    old.write_text(old.read_text().replace('"index":7', '"index":9'))  # the checksum no longer matches
    assert nvram.upgrade_state(old) is False
    with pytest.raises(StateFileCorrupt):
        nvram.open_state(old)
    assert nvram.upgrade_state(tmp_path / "missing") is False
