"""The backup format catches every way a stored backup can be changed."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from bkv.storage import create_backup, list_backups, restore_backup, verify_backup
from bkv.storage import format as fmt
from bkv.storage.errors import (CorruptBackup, DestinationNotEmpty, NoBackup, TruncatedBackup,
                                UnsupportedEntry, WrongKey)
from bkv_protocol.secrets import BackupKey
from support import procs

CHUNK = 4096  # small chunks, so small test files span many


def key() -> BackupKey:
    return BackupKey(os.urandom(32))


def make_tree(root: Path) -> Path:
    (root / "chats" / "2026" / "nov").mkdir(parents=True)
    (root / "chats" / "2026" / "nov" / "msgs.txt").write_bytes(os.urandom(CHUNK * 5 + 123))
    (root / "chats" / "empty.txt").write_bytes(b"")
    (root / "media").mkdir()
    (root / "media" / "photo.jpg").write_bytes(os.urandom(CHUNK * 2))  # an exact multiple of the chunk
    (root / "empty-dir").mkdir()
    os.chmod(root / "chats" / "empty.txt", 0o600)
    return root


def same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path):
        return sorted((p.relative_to(root).as_posix(), p.is_dir(), None if p.is_dir() else p.read_bytes(),
                       p.stat().st_mode & 0o777 if p.is_file() else None) for p in root.rglob("*"))

    return listing(a) == listing(b)


@pytest.fixture
def backed_up(tmp_path):
    src = make_tree(tmp_path / "src")
    k = key()
    store = str(tmp_path / "store")
    info = create_backup(src, store, k, chunk_size=CHUNK)
    return src, store, k, info, tmp_path / "store" / f"{info.backup_id}.bkv"


def test_a_directory_round_trips_byte_for_byte_with_empty_files_and_dirs(backed_up, tmp_path):
    src, store, k, info, _ = backed_up
    restore_backup(store, tmp_path / "dest", k)
    assert same_tree(src, tmp_path / "dest")


def test_a_sqlite_file_round_trips_and_still_opens(tmp_path):
    db = tmp_path / "chats.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table m (id integer primary key, body text)")
        conn.executemany("insert into m (body) values (?)", [(os.urandom(40).hex(),) for _ in range(2000)])
    k = key()
    create_backup(db, str(tmp_path / "store"), k, chunk_size=CHUNK)
    restore_backup(str(tmp_path / "store"), tmp_path / "dest", k)
    assert (tmp_path / "dest" / "chats.db").read_bytes() == db.read_bytes()
    with sqlite3.connect(tmp_path / "dest" / "chats.db") as conn:
        assert conn.execute("select count(*) from m").fetchone()[0] == 2000


def test_list_shows_the_backups_oldest_first(backed_up):
    _, store, k, info, _ = backed_up
    assert [b.backup_id for b in list_backups(store)] == [info.backup_id]
    assert list_backups(store)[0].kind == "tree" and list_backups(store)[0].key_mode == "vault"


def _tamper(path: Path, fn) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def _flip(offset):
    def fn(data):
        data[offset] ^= 0x40
        return data
    return fn


@pytest.mark.parametrize("case,fn,error", [
    ("a bit flip in the header", _flip(30), CorruptBackup),
    ("a bit flip in the first chunk", _flip(fmt.HEADER_LEN + 10), CorruptBackup),
    ("a bit flip in the last byte", lambda d: _flip(len(d) - 1)(d), CorruptBackup),
    ("truncation mid-chunk", lambda d: d[:-7], CorruptBackup),
    ("dropping the final chunk", lambda d: d[: fmt.HEADER_LEN + 3 * (CHUNK + 16)], TruncatedBackup),
    ("reordering two chunks", lambda d: d[:fmt.HEADER_LEN] + d[fmt.HEADER_LEN + CHUNK + 16: fmt.HEADER_LEN + 2 * (CHUNK + 16)]
     + d[fmt.HEADER_LEN: fmt.HEADER_LEN + CHUNK + 16] + d[fmt.HEADER_LEN + 2 * (CHUNK + 16):], CorruptBackup),
    ("appended bytes", lambda d: d + b"more", CorruptBackup),
    ("a header cut short", lambda d: d[:20], TruncatedBackup),
])
def test_every_tampering_is_rejected_and_nothing_is_restored(backed_up, tmp_path, case, fn, error):
    _, store, k, _, path = backed_up
    _tamper(path, fn)
    with pytest.raises(error):
        verify_backup(store, k)
    with pytest.raises(error):
        restore_backup(store, tmp_path / "dest", k)
    assert not (tmp_path / "dest").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest.")]  # no staging left behind


def test_a_chunk_swapped_in_from_another_backup_under_the_same_key_is_rejected(backed_up, tmp_path):
    src, store, k, info, path = backed_up
    other = create_backup(src, store, k, chunk_size=CHUNK)
    other_bytes = (tmp_path / "store" / f"{other.backup_id}.bkv").read_bytes()
    start = fmt.HEADER_LEN + CHUNK + 16
    _tamper(path, lambda d: d[:start] + other_bytes[start:start + CHUNK + 16] + d[start + CHUNK + 16:])
    with pytest.raises(CorruptBackup):
        verify_backup(store, k, info.backup_id)


def test_a_wrong_key_is_told_apart_before_any_decryption(backed_up, tmp_path):
    _, store, _, _, _ = backed_up
    with pytest.raises(WrongKey):
        restore_backup(store, tmp_path / "dest", key())


def test_a_failed_restore_leaves_an_existing_destination_exactly_as_it_was(backed_up, tmp_path):
    _, store, k, _, path = backed_up
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(DestinationNotEmpty):
        restore_backup(store, dest, k)
    _tamper(path, lambda d: _flip(len(d) - 1)(d))
    with pytest.raises(CorruptBackup):
        restore_backup(store, dest, k, replace=True)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "precious"


def test_replace_swaps_the_destination_only_after_success(backed_up, tmp_path):
    src, store, k, _, _ = backed_up
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    restore_backup(store, dest, k, replace=True)
    assert same_tree(src, dest)


def test_symlinks_are_refused_before_anything_is_written(tmp_path):
    src = make_tree(tmp_path / "src")
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(UnsupportedEntry):
        create_backup(src, str(tmp_path / "store"), key())
    assert not (tmp_path / "store").exists()


def test_an_empty_store_says_there_is_nothing(tmp_path):
    with pytest.raises(NoBackup):
        restore_backup(str(tmp_path / "nothing"), tmp_path / "d", key())


def test_memory_stays_flat_for_a_large_backup_and_restore(tmp_path):
    """A few hundred MiB through backup and restore in a child process whose
    peak RSS must stay far below the data size (the 2 GiB claim scales from
    this: nothing is buffered beyond one chunk)."""
    import subprocess
    import sys

    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(300):
            f.write(os.urandom(1 << 20))
    code = f"""
import os
from pathlib import Path
from bkv.storage import create_backup, restore_backup
from bkv_protocol.secrets import BackupKey
k = BackupKey(os.urandom(32))
create_backup(Path({str(big)!r}), {str(tmp_path / 'store')!r}, k)
restore_backup({str(tmp_path / 'store')!r}, Path({str(tmp_path / 'out')!r}), k)
# VmHWM, not ru_maxrss: after fork+exec ru_maxrss also counts the parent's image.
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""
    res = procs.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mib = int(res.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 128, f"peak RSS {peak_mib:.0f} MiB"
    assert os.path.getsize(tmp_path / "out" / "big.bin") == 300 << 20
