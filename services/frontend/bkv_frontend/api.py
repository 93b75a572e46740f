"""Public v1 wire types (what the SDK sends and receives).

The user id never travels in a body: it comes from the verified account
token, so nobody can act on a stranger's record. Responses are the island's
answers, passed through unchanged; the client checks their fleet signatures.
"""

from __future__ import annotations

from pydantic import Field

from bkv_common.wire import B64, Frozen, RequestId, fixed_b64
from bkv_hsm_proxy.api import EK_LEN, K_NONCE_LEN, FleetId, FleetParams, RecordStatus
from bkv_island.api import (
    DeleteOut,
    RecoveryFinishOut,
    RecoveryStartOut,
    RegistrationFinishOut,
    RegistrationStartOut,
)

__all__ = [
    "FleetInfo", "RegistrationStartRequest", "RegistrationStartOut", "RegistrationFinishRequest",
    "RegistrationFinishOut", "RecoveryStartRequest", "RecoveryStartOut", "RecoveryFinishRequest",
    "RecoveryFinishOut", "DeleteOut", "RecordStatus", "FleetParams",
]


# Fixed sizes, refused here (400 invalid_request, as the hsm-proxy would
# refuse them) so that the published schema states them.
Ek = fixed_b64(EK_LEN)
KNonce = fixed_b64(K_NONCE_LEN)


class FleetInfo(Frozen):
    """``GET /v1/fleet``: what a client pins. Never the OPAQUE server setup."""

    fleet_id: str
    fleet_public_key: B64
    max_attempts: int = Field(ge=1, le=1000)
    opaque_suite: str
    signature_alg: str
    edge_public_key: str = ""  # base64 X25519 key of the Noise edge, if there is one
    api_version: str = "v1"


class _Pinned(Frozen):
    # The fleet the client pinned, which must sign the answer. Left out: the
    # vault's oldest fleet (clients from before keys rotated).
    fleet_id: FleetId | None = None


class RegistrationStartRequest(_Pinned):
    registration_request: B64


class _Identified(_Pinned):
    # Client-chosen, 16 random bytes, new for each request and the same on
    # every resend of it: a resend is answered from what was committed, so it
    # never spends an attempt (bkv_common.transcripts).
    request_id: RequestId


class RegistrationFinishRequest(_Identified):
    challenge: B64
    registration_upload: B64
    ek: Ek
    k_nonce: KNonce


class RecoveryStartRequest(_Identified):
    credential_request: B64


class RecoveryFinishRequest(_Identified):
    login_state: B64
    credential_finalization: B64
