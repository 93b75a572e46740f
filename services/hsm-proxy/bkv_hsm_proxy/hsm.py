"""The HSM seam: :class:`HsmBackend` and its two implementations.

``Pkcs11Hsm`` talks to a real PKCS#11 token (SoftHSM2 here). Every call goes
through one lock: SoftHSM2 crashed when called from several threads at once.
``InMemoryHsmFake`` keeps keys in process memory and exists only for unit
tests of the vault logic.

PKCS#11 failures become typed errors in :func:`_mapped` -- the one place
where return codes are translated.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from typing import Iterator, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bkv_common import metrics
from bkv_hsm_proxy import errors

NONCE_LEN = 12

# Object labels inside the token.
SIGNING_KEY_LABEL = "bkv-fleet-signing"
SEALING_KEY_LABEL = "bkv-record-sealing"
OPAQUE_SETUP_LABEL = "bkv-opaque-setup"


class HsmBackend(Protocol):
    """What the vault logic needs from an HSM."""

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """AES-256-GCM under the non-extractable sealing key: nonce || ct || tag."""

    def unseal(self, aad: bytes, blob: bytes) -> bytes:
        """Inverse of :meth:`seal`; raises ``HsmAuthTagMismatch`` on any change."""

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature of ``message``, DER encoded."""

    def public_key_der(self) -> bytes:
        """The fleet signing public key, SubjectPublicKeyInfo DER."""

    def load_blob(self, label: str) -> bytes | None:
        """A data object stored in the token (already sealed by the caller)."""


def _der_signature(raw: bytes) -> bytes:
    half = len(raw) // 2
    return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


@contextlib.contextmanager
def _mapped(operation: str) -> Iterator[None]:
    """Translate python-pkcs11 exceptions into ``errors.HsmError`` subclasses."""
    import pkcs11.exceptions as px

    try:
        yield
    except (px.EncryptedDataInvalid, px.EncryptedDataLenRange) as exc:
        raise errors.HsmAuthTagMismatch(operation) from exc
    except px.GeneralError as exc:
        # SoftHSM2 reports a failed GCM tag check as CKR_GENERAL_ERROR.
        if operation == "unseal":
            raise errors.HsmAuthTagMismatch(operation) from exc
        raise errors.HsmError(f"{operation}: token error") from exc
    except (px.PinIncorrect, px.PinLenRange, px.UserNotLoggedIn, px.NoSuchToken) as exc:
        raise errors.HsmLoginFailed(f"{operation}: {type(exc).__name__}") from exc
    except px.NoSuchKey as exc:
        raise errors.HsmKeyMissing(f"{operation}: key not found; run fleet-init") from exc
    except px.PKCS11Error as exc:
        raise errors.HsmError(f"{operation}: {type(exc).__name__}") from exc


class Pkcs11Hsm:
    """A logged-in session on one token, with the fleet's keys looked up once."""

    def __init__(self, module: str, token_label: str, user_pin: str) -> None:
        import pkcs11

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()
        with _mapped("open"):
            lib = pkcs11.lib(module)
            token = lib.get_token(token_label=token_label)
            self._session = token.open(rw=True, user_pin=user_pin)
        self.token_info = {
            "label": token.label,
            "manufacturer": token.manufacturer_id,
            "model": token.model,
            "serial": token.serial.decode() if isinstance(token.serial, bytes) else str(token.serial),
        }
        self._seal_key = None
        self._sign_key = None
        self._public_der: bytes | None = None

    # -- fleet-init -------------------------------------------------------
    def keys_present(self) -> bool:
        from pkcs11 import ObjectClass

        with self._lock:
            found = list(self._session.get_objects({
                self._pkcs11.Attribute.LABEL: SEALING_KEY_LABEL,
                self._pkcs11.Attribute.CLASS: ObjectClass.SECRET_KEY,
            }))
        return bool(found)

    def generate_keys(self) -> None:
        """Create both keys inside the token: sensitive, non-extractable."""
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        locked = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TOKEN: True}
        with self._lock, _mapped("generate"):
            self._session.generate_key(KeyType.AES, 256, label=SEALING_KEY_LABEL, store=True, template=locked)
            params = self._session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
            )
            params.generate_keypair(store=True, label=SIGNING_KEY_LABEL, private_template=locked)

    def store_blob(self, label: str, blob: bytes) -> None:
        from pkcs11 import Attribute, ObjectClass

        with self._lock, _mapped("store"):
            self._session.create_object({
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.LABEL: label,
                Attribute.VALUE: blob,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
            })

    def load_blob(self, label: str) -> bytes | None:
        from pkcs11 import Attribute, ObjectClass

        with self._lock, _mapped("load"):
            objs = list(self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}))
            return bytes(objs[0][Attribute.VALUE]) if objs else None

    def key_attributes(self) -> dict[str, dict[str, bool]]:
        """CKA_SENSITIVE / CKA_EXTRACTABLE / CKA_LOCAL / CKA_NEVER_EXTRACTABLE of both secret keys."""
        from pkcs11 import Attribute

        self._load_keys()
        out = {}
        with self._lock, _mapped("attributes"):
            for name, key in (("sealing", self._seal_key), ("signing", self._sign_key)):
                out[name] = {
                    "sensitive": bool(key[Attribute.SENSITIVE]),
                    "extractable": bool(key[Attribute.EXTRACTABLE]),
                    "local": bool(key[Attribute.LOCAL]),
                    "never_extractable": bool(key[Attribute.NEVER_EXTRACTABLE]),
                }
        return out

    # -- runtime ----------------------------------------------------------
    def _load_keys(self) -> None:
        if self._seal_key is not None:
            return
        from pkcs11 import KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        with self._lock, _mapped("find-keys"):
            self._seal_key = self._session.get_key(label=SEALING_KEY_LABEL, key_type=KeyType.AES)
            self._sign_key = self._session.get_key(
                label=SIGNING_KEY_LABEL, key_type=KeyType.EC, object_class=ObjectClass.PRIVATE_KEY
            )
            pub = self._session.get_key(label=SIGNING_KEY_LABEL, key_type=KeyType.EC, object_class=ObjectClass.PUBLIC_KEY)
            self._public_der = encode_ec_public_key(pub)

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism

        self._load_keys()
        nonce = os.urandom(NONCE_LEN)
        t = time.perf_counter()
        with self._lock, _mapped("seal"):
            ct = self._seal_key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, 128))
        metrics.HSM_OP.labels("seal").observe(time.perf_counter() - t)
        return nonce + bytes(ct)

    def unseal(self, aad: bytes, blob: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism

        self._load_keys()
        if len(blob) < NONCE_LEN + 16:
            raise errors.HsmAuthTagMismatch("unseal")
        t = time.perf_counter()
        with self._lock, _mapped("unseal"):
            pt = self._seal_key.decrypt(
                blob[NONCE_LEN:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(blob[:NONCE_LEN], aad, 128)
            )
        metrics.HSM_OP.labels("unseal").observe(time.perf_counter() - t)
        return bytes(pt)

    def sign(self, message: bytes) -> bytes:
        from pkcs11 import Mechanism

        self._load_keys()
        # SoftHSM2 has no CKM_ECDSA_SHA256: hash here, sign the digest in the token.
        digest = hashlib.sha256(message).digest()
        t = time.perf_counter()
        with self._lock, _mapped("sign"):
            raw = self._sign_key.sign(digest, mechanism=Mechanism.ECDSA)
        metrics.HSM_OP.labels("sign").observe(time.perf_counter() - t)
        return _der_signature(bytes(raw))

    def public_key_der(self) -> bytes:
        self._load_keys()
        assert self._public_der is not None
        return self._public_der

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            self._session.close()


class InMemoryHsmFake:
    """Unit tests only: the same contract with keys in process memory."""

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._priv = ec.generate_private_key(ec.SECP256R1())
        self._blobs: dict[str, bytes] = {}

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, aad: bytes, blob: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except (InvalidTag, ValueError):
            raise errors.HsmAuthTagMismatch("unseal") from None

    def sign(self, message: bytes) -> bytes:
        return self._priv.sign(message, ec.ECDSA(hashes.SHA256()))

    def public_key_der(self) -> bytes:
        return self._priv.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def store_blob(self, label: str, blob: bytes) -> None:
        self._blobs[label] = blob

    def load_blob(self, label: str) -> bytes | None:
        return self._blobs.get(label)
