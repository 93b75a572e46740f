"""Typed settings of the frontend (env prefix ``BKV_FRONTEND_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bkv_server.settings import EtcdSettings


class FrontendSettings(EtcdSettings):
    model_config = SettingsConfigDict(env_prefix="BKV_FRONTEND_", extra="ignore", frozen=True)

    port: int = 8080
    token_issuer: str = "bkv-dev-issuer"
    token_audience: str = "bkv"
    token_public_key_file: Path
    # How often the island map and replica list are re-read from etcd.
    refresh_interval_s: float = 1.0
    # Tokens must name the device's Noise key (cnf), checked against the header
    # the edge sets. Off only for a dev fleet run with --plaintext.
    require_device_binding: bool = True
    # Published in /v1/fleet so clients can pin it (base64 X25519).
    edge_public_key: str = ""
    # Or read it from a file (in Kubernetes an init container derives it from
    # the edge's key Secret, so the frontend never sees the private key).
    edge_public_key_file: Path | None = None
    # Per-device rate limits (bkv_server.ratelimit; docs/api.md, "Rate limits"), per
    # replica: requests a minute sustained and at once per device key; per_minute 0
    # turns a budget off. Looser than the islands' per-account ones: a device may
    # hold several accounts.
    device_guess_per_minute: float = Field(60.0, ge=0)
    device_guess_burst: int = Field(120, ge=1)
    device_registration_per_minute: float = Field(30.0, ge=0)
    device_registration_burst: int = Field(60, ge=1)

    def edge_public_key_value(self) -> str:
        if self.edge_public_key_file is not None:
            return self.edge_public_key_file.read_text().strip()
        return self.edge_public_key
