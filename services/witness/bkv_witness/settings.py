"""Typed settings of the witness (env prefix ``BKV_WITNESS_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from bkv_server.settings import ServiceSettings


class WitnessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="BKV_WITNESS_", extra="ignore", frozen=True)

    port: int = 8300
    key_file: Path  # base64 Ed25519 private key, as `bkv-witness keygen` writes
    operator_public_key: str  # base64 Ed25519: only bundles this key signed are countersigned
    log_file: Path
