"""The archive stream inside a backup: a directory tree (or one file) as a
sequence of entries, written and read with flat memory.

::

    entry = "D" | u16 len | path | u32 mode                       a directory
          | "F" | u16 len | path | u32 mode | u64 size | bytes     a regular file
    end   = "E"

Paths are relative, '/'-separated, never absolute, never with '..'.
Symlinks, devices and sockets are refused at backup time (a restore must not
be able to point outside DEST). Modes keep their permission bits only.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from bkv.storage.errors import CorruptBackup, UnsupportedEntry

PIECE = 1 << 20
_DIR, _FILE, _END = b"D", b"F", b"E"


def _path_bytes(rel: str) -> bytes:
    raw = rel.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise UnsupportedEntry(f"path too long: {rel[:80]}...")
    return struct.pack(">H", len(raw)) + raw


def plan(source: Path) -> tuple[list[tuple[str, Path, os.stat_result]], int]:
    """Every entry to back up, in a stable order, and the total file bytes."""
    source = Path(source)
    st = source.lstat()
    if stat.S_ISREG(st.st_mode):
        return [(source.name, source, st)], st.st_size
    if not stat.S_ISDIR(st.st_mode):
        raise UnsupportedEntry(f"{source} is neither a regular file nor a directory")
    entries, total = [], 0
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = Path(root) / name
            est = path.lstat()
            rel = path.relative_to(source).as_posix()
            if stat.S_ISLNK(est.st_mode):
                raise UnsupportedEntry(f"symlinks are not backed up: {rel}")
            if not (stat.S_ISDIR(est.st_mode) or stat.S_ISREG(est.st_mode)):
                raise UnsupportedEntry(f"only files and directories are backed up: {rel}")
            entries.append((rel, path, est))
            if stat.S_ISREG(est.st_mode):
                total += est.st_size
    entries.sort(key=lambda e: e[0])
    return entries, total


def pack(entries: list[tuple[str, Path, os.stat_result]], progress: Callable[[int], None] | None = None
         ) -> Iterator[bytes]:
    for rel, path, st in entries:
        mode = struct.pack(">I", stat.S_IMODE(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            yield _DIR + _path_bytes(rel) + mode
            continue
        yield _FILE + _path_bytes(rel) + mode + struct.pack(">Q", st.st_size)
        sent = 0
        with open(path, "rb") as f:
            while sent < st.st_size:
                piece = f.read(min(PIECE, st.st_size - sent))
                if not piece:
                    raise UnsupportedEntry(f"{rel} shrank while it was being backed up; try again")
                sent += len(piece)
                if progress:
                    progress(len(piece))
                yield piece
            if f.read(1):
                raise UnsupportedEntry(f"{rel} grew while it was being backed up; try again")
    yield _END


class _Reader:
    """Exact reads over an iterator of chunks, holding at most one chunk."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self._pos >= len(self._buf):
                try:
                    self._buf, self._pos = next(self._it), 0
                except StopIteration:
                    raise CorruptBackup("the archive ends in the middle of an entry") from None
                continue
            take = min(n - len(out), len(self._buf) - self._pos)
            out += self._buf[self._pos:self._pos + take]
            self._pos += take
        return bytes(out)

    def drain(self) -> bytes:
        rest = self._buf[self._pos:] + b"".join(self._it)  # the iterator verifies the final chunk
        self._buf, self._pos = b"", 0
        return rest


def _safe_relpath(raw: bytes) -> PurePosixPath:
    try:
        rel = PurePosixPath(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptBackup("an entry name is not UTF-8") from None
    if rel.is_absolute() or not rel.parts or any(p in ("..", ".", "") for p in rel.parts) or "\\" in str(rel):
        raise CorruptBackup(f"an entry has an unsafe path: {str(rel)[:80]!r}")
    return rel


def unpack(chunks: Iterable[bytes], dest: Path, progress: Callable[[int], None] | None = None,
           sink: bool = False) -> int:
    """Write the archive under ``dest`` (an empty directory). Returns files
    written. With ``sink``, parse and check everything but write nothing."""
    r = _Reader(chunks)
    seen: set[PurePosixPath] = set()
    files = 0
    while True:
        kind = r.read(1)
        if kind == _END:
            break
        if kind not in (_DIR, _FILE):
            raise CorruptBackup("unknown entry type in the archive")
        (length,) = struct.unpack(">H", r.read(2))
        rel = _safe_relpath(r.read(length))
        if rel in seen:
            raise CorruptBackup(f"duplicate entry {rel}")
        seen.add(rel)
        (mode,) = struct.unpack(">I", r.read(4))
        target = dest.joinpath(*rel.parts)
        if kind == _DIR:
            if not sink:
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, (mode & 0o7777) | 0o700)  # we must still be able to write into it
            continue
        (size,) = struct.unpack(">Q", r.read(8))
        if sink:
            left = size
            while left:
                left -= len(r.read(min(PIECE, left)))
            files += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            left = size
            while left:
                piece = r.read(min(PIECE, left))
                f.write(piece)
                left -= len(piece)
                if progress:
                    progress(len(piece))
        os.chmod(target, mode & 0o7777)
        files += 1
    if r.drain():
        raise CorruptBackup("bytes after the end of the archive")
    return files
