"""The backup container: a clear header, then AES-256-GCM chunks.

Byte by byte (docs/backup-format.md)::

    header  = "BKV1" | u8 version=1 | u8 kind | u8 key_mode | u8 0 | u32 chunk_size
              | 16 backup_id | u64 created_ms | 16 key_check            (52 bytes)
    chunk i = AES-256-GCM(chunk_key, nonce_i, plaintext_i, aad = SHA-256(header))
    nonce_i = u64 i | 3 zero bytes | u8 final

* ``chunk_key = HKDF-SHA256(K, salt=backup_id, info="bkv/v1/backup/chunk-key")``:
  a key per backup, so chunks cannot move between backups.
* Every chunk but the last carries exactly ``chunk_size`` bytes; the last
  carries fewer (possibly none) and has ``final = 1``. A reader therefore
  knows the last chunk by its length, and the final flag inside the nonce
  makes truncation at a chunk boundary, dropped trailing chunks and
  appended bytes all fail authentication.
* The header's hash is every chunk's associated data: any changed header
  byte fails the first chunk.
* ``key_check = HKDF(K, salt=backup_id, info="bkv/v1/backup/key-check")[:16]``
  tells a wrong key from tampering before any decryption.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bkv.storage.errors import CorruptBackup, TruncatedBackup, WrongKey  # noqa: F401 - re-exported
from bkv_protocol.secrets import BackupKey

MAGIC = b"BKV1"
VERSION = 1
HEADER = struct.Struct(">4sBBBBI16sQ16s")
HEADER_LEN = HEADER.size  # 52
TAG = 16
DEFAULT_CHUNK = 1 << 20

KIND_TREE = 1   # a directory, as an archive stream (archive.py)
KIND_FILE = 2   # a single file, as an archive stream with one entry
KEY_MODE_VAULT = 0   # K is escrowed in the vault under a password
KEY_MODE_DIGITS = 1  # K comes from a 64-digit key the user keeps

CHUNK_KEY_INFO = b"bkv/v1/backup/chunk-key"
KEY_CHECK_INFO = b"bkv/v1/backup/key-check"


def _derive(key: BackupKey, backup_id: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=backup_id, info=info).derive(key.reveal())


def _nonce(index: int, final: bool) -> bytes:
    return struct.pack(">Q3xB", index, 1 if final else 0)


@dataclass(frozen=True)
class Header:
    kind: int
    key_mode: int
    chunk_size: int
    backup_id: bytes
    created: int  # unix milliseconds: orders backups made within one second
    key_check: bytes

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.kind, self.key_mode, 0, self.chunk_size, self.backup_id,
                           self.created, self.key_check)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) != HEADER_LEN:
            raise TruncatedBackup("the backup is shorter than its header")
        magic, version, kind, key_mode, _, chunk, bid, created, check = HEADER.unpack(raw)
        if magic != MAGIC or version != VERSION:
            raise CorruptBackup("not a bkv backup of a format this version reads")
        if kind not in (KIND_TREE, KIND_FILE) or key_mode not in (KEY_MODE_VAULT, KEY_MODE_DIGITS) \
                or not 4096 <= chunk <= 64 << 20:
            raise CorruptBackup("the backup header is damaged")
        return cls(kind, key_mode, chunk, bid, created, check)

    @property
    def id_hex(self) -> str:
        return self.backup_id.hex()


def new_header(key: BackupKey, kind: int, key_mode: int, chunk_size: int = DEFAULT_CHUNK) -> Header:
    backup_id = os.urandom(16)
    return Header(kind, key_mode, chunk_size, backup_id, time.time_ns() // 1_000_000,
                  _derive(key, backup_id, KEY_CHECK_INFO)[:16])


def encrypt_stream(key: BackupKey, header: Header, plaintext: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the header, then the chunks, re-blocking ``plaintext`` to the chunk size."""
    raw = header.pack()
    aad = hashlib.sha256(raw).digest()
    aead = AESGCM(_derive(key, header.backup_id, CHUNK_KEY_INFO))
    yield raw
    size, index, buf = header.chunk_size, 0, bytearray()
    for piece in plaintext:
        buf += piece
        while len(buf) >= size:
            yield aead.encrypt(_nonce(index, False), bytes(buf[:size]), aad)
            del buf[:size]
            index += 1
    yield aead.encrypt(_nonce(index, True), bytes(buf), aad)


def read_header(src: BinaryIO) -> Header:
    return Header.unpack(_read_exactly(src, HEADER_LEN))


def decrypt_stream(key: BackupKey, src: BinaryIO, header: Header | None = None) -> Iterator[bytes]:
    """Yield authenticated plaintext chunk by chunk. Raises at the first bad
    byte; the generator ends normally only after the final chunk verified."""
    if header is None:
        header = read_header(src)
    if not hmac.compare_digest(_derive(key, header.backup_id, KEY_CHECK_INFO)[:16], header.key_check):
        raise WrongKey("this key does not open this backup")
    aad = hashlib.sha256(header.pack()).digest()
    aead = AESGCM(_derive(key, header.backup_id, CHUNK_KEY_INFO))
    full = header.chunk_size + TAG
    index = 0
    while True:
        block = _read_exactly(src, full, allow_short=True)
        final = len(block) < full
        if final and not block:
            raise TruncatedBackup("the backup ends before its final chunk")
        try:
            yield aead.decrypt(_nonce(index, final), block, aad)
        except InvalidTag:
            raise CorruptBackup(f"chunk {index} failed authentication: the backup was altered, "
                                "truncated or reordered") from None
        if final:
            return
        index += 1


def _read_exactly(src: BinaryIO, n: int, allow_short: bool = False) -> bytes:
    parts, got = [], 0
    while got < n:
        part = src.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    data = b"".join(parts)
    if got < n and not allow_short:
        raise TruncatedBackup("the backup is shorter than its header")
    return data
