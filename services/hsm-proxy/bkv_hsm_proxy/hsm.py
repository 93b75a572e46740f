"""The HSM seam: :class:`HsmBackend` and its implementation.

``Pkcs11Hsm`` talks to a real PKCS#11 token (SoftHSM2 here). Every call goes
through one lock: SoftHSM2 crashed when called from several threads at once.
Unit tests of the vault logic use ``tests/fakes/hsm.py`` instead.

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

from cryptography.hazmat.primitives.asymmetric import utils

from bkv_server import metrics
from bkv_protocol.retry import Backoff, retry_sync
from bkv_hsm_proxy import errors

NONCE_LEN = 12

# Object labels inside the token. A token holds one or more key
# generations -- one per fleet (docs/ota.md, rotation): generation 0 uses the
# plain labels, generation n the labels with "-g<n>".
SIGNING_KEY_LABEL = "bkv-fleet-signing"
SEALING_KEY_LABEL = "bkv-record-sealing"
OPAQUE_SETUP_LABEL = "bkv-opaque-setup"


def generation_label(base: str, gen: int) -> str:
    return base if gen == 0 else f"{base}-g{gen}"


def label_generation(base: str, label: str) -> int | None:
    if label == base:
        return 0
    if label.startswith(base + "-g") and label[len(base) + 2:].isdigit():
        return int(label[len(base) + 2:])
    return None


class HsmBackend(Protocol):
    """What the vault logic needs from an HSM. ``gen`` picks the key
    generation (one per fleet)."""

    def generations(self) -> list[int]:
        """The key generations present in the token, ascending."""

    def seal(self, aad: bytes, plaintext: bytes, gen: int = 0) -> bytes:
        """AES-256-GCM under the non-extractable sealing key: nonce || ct || tag."""

    def unseal(self, aad: bytes, blob: bytes, gen: int = 0) -> bytes:
        """Inverse of :meth:`seal`; raises ``HsmAuthTagMismatch`` on any change."""

    def sign(self, message: bytes, gen: int = 0) -> bytes:
        """ECDSA P-256 / SHA-256 signature of ``message``, DER encoded."""

    def public_key_der(self, gen: int = 0) -> bytes:
        """The fleet signing public key, SubjectPublicKeyInfo DER."""

    def forget(self, gen: int) -> None:
        """Drop anything cached about a generation (its keys may be gone)."""

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
    except (px.PinIncorrect, px.PinInvalid, px.PinLenRange, px.PinLocked, px.PinExpired, px.UserNotLoggedIn) as exc:
        raise errors.HsmLoginFailed(f"{operation}: {type(exc).__name__}") from exc
    except (px.NoSuchKey, px.ObjectHandleInvalid, px.KeyHandleInvalid) as exc:
        # Also a key destroyed by another process (a retired fleet).
        raise errors.HsmKeyMissing(f"{operation}: key not found") from exc
    except px.PKCS11Error as exc:
        if operation == "open":
            # Anything else while opening: SoftHSM2 processes that open one token at
            # once read each other's half-written token file and report no token,
            # a general error, or an uninitialized PIN (all seen here); each passes.
            raise errors.HsmTokenUnavailable(f"{operation}: {type(exc).__name__}") from exc
        if isinstance(exc, px.GeneralError):
            # SoftHSM2 reports a failed GCM tag check as CKR_GENERAL_ERROR.
            if operation == "unseal":
                raise errors.HsmAuthTagMismatch(operation) from exc
            raise errors.HsmError(f"{operation}: token error") from exc
        raise errors.HsmError(f"{operation}: {type(exc).__name__}") from exc


# Opening the token at start-up: long enough for the other processes opening it to finish.
OPEN_BACKOFF = Backoff(deadline_s=10.0, first_delay_s=0.1, max_delay_s=1.0)


def open_token(module: str, token_label: str, user_pin: str, *, backoff: Backoff = OPEN_BACKOFF,
               rescan: bool = False) -> "Pkcs11Hsm":
    """A :class:`Pkcs11Hsm` for ``token_label``, tried again while the token is
    unavailable (``HsmTokenUnavailable``: SoftHSM2 processes opening one token
    directory at once see no token, a general error or no user PIN now and
    then). A wrong PIN is never tried again: a real HSM locks the PIN after a few.
    ``rescan``: read the tokens again from the first try (another process wrote one)."""
    # Each retry rescans: SoftHSM2 reads its tokens once, when the library is
    # initialized, and keeps what it read (a token missing because another process
    # was rewriting its files, an uninitialized PIN) until it is initialized again.
    return retry_sync(lambda attempt: Pkcs11Hsm(module, token_label, user_pin, rescan=rescan or attempt > 0),
                      retry_on=lambda e: isinstance(e, errors.HsmTokenUnavailable), backoff=backoff)


class Pkcs11Hsm:
    """A logged-in session on one token, with the fleet's keys looked up once."""

    def __init__(self, module: str, token_label: str, user_pin: str, *, rescan: bool = False) -> None:
        import pkcs11

        self._pkcs11 = pkcs11
        self._lock = threading.Lock()
        with _mapped("open"):
            lib = pkcs11.lib(module)
            if rescan:
                lib.reinitialize()
            token = lib.get_token(token_label=token_label)
            self._session = token.open(rw=True, user_pin=user_pin)
        self.token_info = {
            "label": token.label,
            "manufacturer": token.manufacturer_id,
            "model": token.model,
            "serial": token.serial.decode() if isinstance(token.serial, bytes) else str(token.serial),
        }
        # generation -> (sealing key, signing private key, signing public key DER)
        self._keys: dict[int, tuple] = {}

    # -- fleet-init and rotation ------------------------------------------
    def generations(self) -> list[int]:
        from pkcs11 import Attribute, ObjectClass

        with self._lock, _mapped("generations"):
            labels = [o[Attribute.LABEL] for o in self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})]
        return sorted(g for g in (label_generation(SEALING_KEY_LABEL, lb) for lb in labels) if g is not None)

    def generate_keys(self, gen: int = 0) -> None:
        """Create both keys of a generation inside the token: sensitive, non-extractable."""
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        locked = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TOKEN: True}
        with self._lock, _mapped("generate"):
            self._session.generate_key(KeyType.AES, 256, label=generation_label(SEALING_KEY_LABEL, gen), store=True,
                                       template=locked)
            params = self._session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
            )
            params.generate_keypair(store=True, label=generation_label(SIGNING_KEY_LABEL, gen),
                                    private_template=locked)

    def destroy_keys(self, gen: int) -> None:
        """Retire a generation: its keys and its sealed OPAQUE setup leave the token for good."""
        from pkcs11 import Attribute

        with self._lock, _mapped("destroy"):
            for base in (SEALING_KEY_LABEL, SIGNING_KEY_LABEL, OPAQUE_SETUP_LABEL):
                for obj in list(self._session.get_objects({Attribute.LABEL: generation_label(base, gen)})):
                    obj.destroy()
            self._keys.pop(gen, None)

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

    def key_attributes(self, gen: int = 0) -> dict[str, dict[str, bool]]:
        """CKA_SENSITIVE / CKA_EXTRACTABLE / CKA_LOCAL / CKA_NEVER_EXTRACTABLE of both secret keys."""
        from pkcs11 import Attribute

        seal_key, sign_key, _ = self._load_keys(gen)
        out = {}
        with self._lock, _mapped("attributes"):
            for name, key in (("sealing", seal_key), ("signing", sign_key)):
                out[name] = {
                    "sensitive": bool(key[Attribute.SENSITIVE]),
                    "extractable": bool(key[Attribute.EXTRACTABLE]),
                    "local": bool(key[Attribute.LOCAL]),
                    "never_extractable": bool(key[Attribute.NEVER_EXTRACTABLE]),
                }
        return out

    # -- runtime ----------------------------------------------------------
    def forget(self, gen: int) -> None:
        """Drop cached handles of a generation (its keys may be gone)."""
        self._keys.pop(gen, None)

    def _load_keys(self, gen: int = 0) -> tuple:
        keys = self._keys.get(gen)
        if keys is not None:
            return keys
        from pkcs11 import KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        with self._lock, _mapped("find-keys"):
            seal_key = self._session.get_key(label=generation_label(SEALING_KEY_LABEL, gen), key_type=KeyType.AES)
            label = generation_label(SIGNING_KEY_LABEL, gen)
            sign_key = self._session.get_key(label=label, key_type=KeyType.EC, object_class=ObjectClass.PRIVATE_KEY)
            pub = self._session.get_key(label=label, key_type=KeyType.EC, object_class=ObjectClass.PUBLIC_KEY)
            keys = self._keys[gen] = (seal_key, sign_key, encode_ec_public_key(pub))
        return keys

    def seal(self, aad: bytes, plaintext: bytes, gen: int = 0) -> bytes:
        from pkcs11 import GCMParams, Mechanism

        seal_key = self._load_keys(gen)[0]
        nonce = os.urandom(NONCE_LEN)
        t = time.perf_counter()
        with self._lock, _mapped("seal"):
            ct = seal_key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, 128))
        metrics.child(metrics.HSM_OP, "seal").observe(time.perf_counter() - t)
        return nonce + bytes(ct)

    def unseal(self, aad: bytes, blob: bytes, gen: int = 0) -> bytes:
        from pkcs11 import GCMParams, Mechanism

        seal_key = self._load_keys(gen)[0]
        if len(blob) < NONCE_LEN + 16:
            raise errors.HsmAuthTagMismatch("unseal")
        t = time.perf_counter()
        with self._lock, _mapped("unseal"):
            pt = seal_key.decrypt(
                blob[NONCE_LEN:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(blob[:NONCE_LEN], aad, 128)
            )
        metrics.child(metrics.HSM_OP, "unseal").observe(time.perf_counter() - t)
        return bytes(pt)

    def sign(self, message: bytes, gen: int = 0) -> bytes:
        from pkcs11 import Mechanism

        sign_key = self._load_keys(gen)[1]
        # SoftHSM2 has no CKM_ECDSA_SHA256: hash here, sign the digest in the token.
        digest = hashlib.sha256(message).digest()
        t = time.perf_counter()
        with self._lock, _mapped("sign"):
            raw = sign_key.sign(digest, mechanism=Mechanism.ECDSA)
        metrics.child(metrics.HSM_OP, "sign").observe(time.perf_counter() - t)
        return _der_signature(bytes(raw))

    def public_key_der(self, gen: int = 0) -> bytes:
        return self._load_keys(gen)[2]

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            self._session.close()

