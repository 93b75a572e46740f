"""Client-side encrypted backups: pack, encrypt, store; fetch, authenticate,
restore. K never leaves this module except to the vault SDK (escrow).

Public API: :func:`create_backup`, :func:`list_backups`, :func:`verify_backup`,
:func:`restore_backup`, :func:`delete_backups`. Format: docs/backup-format.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from bkv.storage import archive
from bkv.storage import format as fmt
from bkv.storage.errors import BackupError, DestinationNotEmpty  # noqa: F401
from bkv.storage.store import BackupInfo, Store
from bkv_protocol.secrets import BackupKey

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def _counter(total: int, progress: Progress | None):
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    return tick


def create_backup(source: Path, store_url: str, key: BackupKey, *, key_mode: int = fmt.KEY_MODE_VAULT,
                  progress: Progress | None = None, storage_options: dict | None = None,
                  chunk_size: int = fmt.DEFAULT_CHUNK) -> BackupInfo:
    source = Path(source)
    entries, total = archive.plan(source)  # refuses symlinks before anything is written
    kind = fmt.KIND_FILE if source.is_file() else fmt.KIND_TREE
    header = fmt.new_header(key, kind, key_mode, chunk_size)
    store = Store(store_url, storage_options)
    size = store.write(header.id_hex, fmt.encrypt_stream(key, header, archive.pack(entries, _counter(total, progress))))
    return BackupInfo(header.id_hex, header.created, "file" if kind == fmt.KIND_FILE else "tree",
                      "vault" if key_mode == fmt.KEY_MODE_VAULT else "digits", size)


def list_backups(store_url: str, *, storage_options: dict | None = None) -> list[BackupInfo]:
    return Store(store_url, storage_options).list()


def latest_info(store_url: str, backup_id: str | None = None, *, storage_options: dict | None = None) -> BackupInfo:
    return Store(store_url, storage_options).pick(backup_id)


def verify_backup(store_url: str, key: BackupKey, backup_id: str | None = None, *,
                  progress: Progress | None = None, storage_options: dict | None = None) -> BackupInfo:
    """Authenticate every byte (chunks and archive structure); write nothing."""
    store = Store(store_url, storage_options)
    info = store.pick(backup_id)
    tick = _counter(info.size, progress)
    with store.open(info.backup_id) as f:
        def chunks():
            for chunk in fmt.decrypt_stream(key, f):
                tick(len(chunk) + fmt.TAG)
                yield chunk

        _walk_archive(chunks())
    return info


def _walk_archive(chunks) -> None:
    """Parse the archive without writing: the same checks as a restore."""
    archive.unpack(chunks, Path("/nonexistent"), sink=True)


def restore_backup(store_url: str, dest: Path, key: BackupKey, backup_id: str | None = None, *,
                   replace: bool = False, progress: Progress | None = None,
                   storage_options: dict | None = None) -> BackupInfo:
    """Restore into ``dest`` (absent or empty, or any directory with
    ``replace``). Everything is written to a private directory beside
    ``dest`` and moved into place only after the whole backup authenticated;
    on any failure ``dest`` is left exactly as it was."""
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise DestinationNotEmpty(f"{dest} exists and is not a directory")
    if dest.exists() and any(dest.iterdir()) and not replace:
        raise DestinationNotEmpty(f"{dest} is not empty; restore into a new directory or pass replace")
    store = Store(store_url, storage_options)
    info = store.pick(backup_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.bkv-restore-", dir=dest.parent))
    try:
        with store.open(info.backup_id) as f:
            header = fmt.read_header(f)
            tick = _counter(info.size, progress)

            def chunks():
                for chunk in fmt.decrypt_stream(key, f, header):
                    tick(len(chunk) + fmt.TAG)
                    yield chunk

            archive.unpack(chunks(), staging)
        _swap_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _swap_into_place(staging: Path, dest: Path) -> None:
    os.chmod(staging, 0o755)
    if not dest.exists():
        os.rename(staging, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.bkv-old-", dir=dest.parent))
    os.rmdir(old)
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def delete_backups(store_url: str, backup_ids: list[str] | None = None, *,
                   storage_options: dict | None = None) -> int:
    """Delete the given backups, or all of them. Returns how many."""
    store = Store(store_url, storage_options)
    targets = backup_ids or [b.backup_id for b in store.list()]
    for bid in targets:
        store.delete(bid)
    return len(targets)
