"""Key mode: a 64-digit key the user writes down instead of a password.

64 decimal digits hold 212.6 bits -- not enough for a 256-bit K plus a
checksum -- so the digits carry a 60-digit secret (10^60 ≈ 2^199.3, above
the 192 bits asked for) and K is derived from it with HKDF
(``info="bkv/v1/backup/digits-k"``). The last 4 digits check the first 60:
3 digits of a SHA-256 of the secret (a random typo slips through 1 time in
1000) and a final Damm check digit over the 63 before it, which catches
*every* single wrong digit and *every* swap of two neighbours. A typo is
therefore caught before any decryption.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bkv.storage.errors import BadKeyDigits
from bkv_protocol.secrets import BackupKey, Secret

SECRET_DIGITS = 60
DIGITS_K_INFO = b"bkv/v1/backup/digits-k"
CHECK_LABEL = b"bkv/v1/backup/digits-check"

# The Damm algorithm's totally anti-symmetric quasigroup of order 10.
_DAMM = (
    (0, 3, 1, 7, 5, 9, 8, 6, 4, 2), (7, 0, 9, 2, 1, 5, 4, 8, 6, 3), (4, 2, 0, 6, 8, 7, 1, 3, 5, 9),
    (1, 7, 5, 0, 9, 8, 3, 4, 2, 6), (6, 1, 2, 3, 0, 4, 5, 9, 7, 8), (3, 6, 7, 4, 2, 0, 9, 5, 8, 1),
    (5, 8, 6, 9, 7, 2, 0, 1, 3, 4), (8, 9, 4, 5, 3, 6, 2, 0, 1, 7), (9, 4, 3, 8, 6, 1, 7, 2, 0, 5),
    (2, 5, 8, 1, 4, 3, 6, 7, 9, 0),
)


def _damm(digits: str) -> int:
    interim = 0
    for d in digits:
        interim = _DAMM[interim][int(d)]
    return interim


def _hash_digits(secret: str) -> str:
    n = int.from_bytes(hashlib.sha256(CHECK_LABEL + secret.encode()).digest()[:8], "big")
    return f"{n % 1000:03d}"


class KeyDigits(Secret):
    """The 64 digits. Printed once, in groups of four; otherwise redacted."""

    kind = "KeyDigits"

    @classmethod
    def generate(cls) -> KeyDigits:
        secret = f"{secrets.randbelow(10 ** SECRET_DIGITS):0{SECRET_DIGITS}d}"
        body = secret + _hash_digits(secret)
        return cls((body + str(_damm(body))).encode())

    @classmethod
    def parse(cls, text: str) -> KeyDigits:
        digits = re.sub(r"[\s\-]", "", text)
        if not re.fullmatch(r"\d{64}", digits):
            raise BadKeyDigits("a backup key is 64 digits (spaces and dashes are ignored)")
        if _damm(digits) != 0 or _hash_digits(digits[:SECRET_DIGITS]) != digits[SECRET_DIGITS:63]:
            raise BadKeyDigits("this key has a typo: the checksum does not match; check each group of four")
        return cls(digits.encode())

    def grouped(self) -> str:
        d = self.reveal().decode()
        return " ".join(d[i:i + 4] for i in range(0, 64, 4))

    def backup_key(self) -> BackupKey:
        secret = int(self.reveal()[:SECRET_DIGITS]).to_bytes(25, "big")
        return BackupKey(HKDF(hashes.SHA256(), 32, salt=None, info=DIGITS_K_INFO).derive(secret))
