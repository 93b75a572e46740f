"""``HsmBackend`` (bkv_hsm_proxy.hsm) with keys in process memory."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bkv_hsm_proxy import errors
from bkv_hsm_proxy.hsm import NONCE_LEN, OPAQUE_SETUP_LABEL, generation_label


class InMemoryHsmFake:
    """The same contract as ``Pkcs11Hsm``, nothing in a token."""

    def __init__(self) -> None:
        self._gens: dict[int, tuple[AESGCM, ec.EllipticCurvePrivateKey]] = {}
        self.generate_keys(0)
        self._blobs: dict[str, bytes] = {}

    def generations(self) -> list[int]:
        return sorted(self._gens)

    def generate_keys(self, gen: int = 0) -> None:
        self._gens[gen] = (AESGCM(AESGCM.generate_key(bit_length=256)), ec.generate_private_key(ec.SECP256R1()))

    def forget(self, gen: int) -> None:
        pass  # nothing cached apart from the keys themselves

    def destroy_keys(self, gen: int) -> None:
        self._gens.pop(gen, None)
        self._blobs.pop(generation_label(OPAQUE_SETUP_LABEL, gen), None)

    def _gen(self, gen: int):
        if gen not in self._gens:
            raise errors.HsmKeyMissing(f"no key generation {gen}")
        return self._gens[gen]

    def seal(self, aad: bytes, plaintext: bytes, gen: int = 0) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._gen(gen)[0].encrypt(nonce, plaintext, aad)

    def unseal(self, aad: bytes, blob: bytes, gen: int = 0) -> bytes:
        try:
            return self._gen(gen)[0].decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except (InvalidTag, ValueError):
            raise errors.HsmAuthTagMismatch("unseal") from None

    def sign(self, message: bytes, gen: int = 0) -> bytes:
        return self._gen(gen)[1].sign(message, ec.ECDSA(hashes.SHA256()))

    def public_key_der(self, gen: int = 0) -> bytes:
        return self._gen(gen)[1].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def store_blob(self, label: str, blob: bytes) -> None:
        self._blobs[label] = blob

    def load_blob(self, label: str) -> bytes | None:
        return self._blobs.get(label)


def with_island_set(hsm, islands=("island-a",), admin=None):
    """``hsm`` with an admin key (``admin``, else a new one, unless the token
    holds one) and the first island set, as fleet-init stores them; returns
    the admin key (None if the token already held another one)."""
    from bkv_hsm_proxy import islandset, membership
    from bkv_protocol import islands as isl
    from bkv_protocol.bundle import RootKey

    admin = admin or RootKey.generate()
    if membership.token_admin_key(hsm) is None:
        membership.fix_admin_key(hsm, admin.public)
    islandset.store_island_set(hsm, isl.sign(isl.IslandSet.of(list(islands)), admin))
    return admin
