"""``bkv-hsm-proxy evidence``: the deployment evidence statement of the fleet
in this token, signed by the fleet key in the token, then by the operator."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from bkv_protocol import bundle as bd
from bkv_protocol import evidence as ev
from bkv_protocol.encoding import b64e
from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.hsm import open_token
from bkv_hsm_proxy.settings import HsmProxySettings


def make_evidence(settings: HsmProxySettings, bundle_text: str, operator_key: bd.RootKey) -> ev.Evidence:
    signed = bd.SignedBundle.from_json(bundle_text)
    hsm = open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        vault = VaultHsm(hsm, max_attempts=settings.max_attempts)
        params = vault.params()
        listed = next((f for f in signed.bundle.fleets if f.fleet_id == params.fleet_id), None)
        if listed is None:
            raise ValueError(f"the bundle does not list this token's fleet {params.fleet_id}")
        statement = {
            "format_version": 1,
            "fleet_id": params.fleet_id,
            "fleet_public_key": b64e(params.fleet_public_key),
            "edge_public_key": b64e(listed.edge_public_key),
            "token": hsm.token_info,
            "key_attributes": hsm.key_attributes(),
            "software_version": version("backup-key-vault"),
            "bundle_sequence": signed.bundle.sequence,
            "bundle_hash": bd.bundle_hash(signed.bundle).hex(),
        }
        fleet_signature = hsm.sign(ev.fleet_message(statement))
    finally:
        hsm.close()
    return ev.operator_sign(statement, fleet_signature, operator_key)


def write(evidence: ev.Evidence, out: Path | None) -> None:
    text = evidence.to_json()
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n")
    json.loads(text)  # always valid JSON
