"""Where backups live: any fsspec URL (a local path, ``file://``, ``s3://``...).

Layout: ``<store>/<backup-id>.bkv``, one object per backup; nothing else.
A backup is written as ``<store>/.partial-<backup-id>`` and renamed when
complete, so a crashed backup never looks like one. ``list`` reads only
the clear 52-byte headers.

S3 endpoints and credentials come from the usual places (``AWS_*``
variables) or fsspec's ``FSSPEC_S3_ENDPOINT_URL``-style variables.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

import fsspec

from bkv.storage import format as fmt
from bkv.storage.errors import NoBackup, StoreError

SUFFIX = ".bkv"


@dataclass(frozen=True)
class BackupInfo:
    backup_id: str
    created: int    # unix milliseconds
    kind: str       # "tree", "file", or "damaged" (the header does not parse)
    key_mode: str   # "vault", "digits", or "unknown"
    size: int       # bytes in the store

    def as_dict(self) -> dict:
        return {"backup_id": self.backup_id, "created": self.created, "kind": self.kind,
                "key_mode": self.key_mode, "size": self.size}


class Store:
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ValueError, ImportError) as exc:
            raise StoreError(f"cannot use store {url!r}: {exc}") from None
        self.root = self.root.rstrip("/")
        self.url = url

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (NoBackup, StoreError):
            raise
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types (botocore, ...)
            if isinstance(exc, fmt.CorruptBackup) or type(exc).__module__.startswith("bkv."):
                raise
            raise StoreError(f"{doing} in {self.url} failed: {type(exc).__name__}: {exc}") from exc

    def write(self, backup_id: str, blocks: Iterable[bytes]) -> int:
        partial, final = self._path(f".partial-{backup_id}"), self._path(backup_id + SUFFIX)
        with self._errors("writing the backup"):
            self.fs.makedirs(self.root, exist_ok=True)
            written = 0
            try:
                with self.fs.open(partial, "wb") as f:
                    for block in blocks:
                        f.write(block)
                        written += len(block)
                self.fs.mv(partial, final)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(partial)
                raise
        return written

    def list(self) -> list[BackupInfo]:
        with self._errors("listing backups"):
            if not self.fs.exists(self.root):
                return []
            out = []
            for entry in self.fs.ls(self.root, detail=True):
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if not name.endswith(SUFFIX) or entry.get("type") == "directory":
                    continue
                with self.fs.open(entry["name"], "rb") as f:
                    try:
                        h = fmt.read_header(f)
                    except fmt.CorruptBackup:
                        # Listed, not hidden: restoring it then says exactly what is wrong.
                        out.append(BackupInfo(name[: -len(SUFFIX)], 0, "damaged", "unknown",
                                              int(entry.get("size") or 0)))
                        continue
                out.append(BackupInfo(h.id_hex, h.created, "tree" if h.kind == fmt.KIND_TREE else "file",
                                      "vault" if h.key_mode == fmt.KEY_MODE_VAULT else "digits",
                                      int(entry.get("size") or 0)))
        return sorted(out, key=lambda b: (b.created, b.backup_id))

    def pick(self, backup_id: str | None) -> BackupInfo:
        backups = self.list()
        if not backups:
            raise NoBackup(f"no backups in {self.url}")
        if backup_id is None:
            return backups[-1]
        matches = [b for b in backups if b.backup_id.startswith(backup_id.lower())]
        if len(matches) != 1:
            raise NoBackup(f"{'no' if not matches else 'more than one'} backup matches {backup_id!r}")
        return matches[0]

    @contextlib.contextmanager
    def open(self, backup_id: str) -> Iterator[BinaryIO]:
        with self._errors("reading the backup"):
            with self.fs.open(self._path(backup_id + SUFFIX), "rb", block_size=1 << 20) as f:
                yield f

    def delete(self, backup_id: str) -> None:
        with self._errors("deleting the backup"):
            self.fs.rm(self._path(backup_id + SUFFIX))
