"""Typed settings of the hsm-proxy (env prefix ``BKV_HSM_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from bkv_server.settings import ServiceSettings


class HsmProxySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="BKV_HSM_", extra="ignore", frozen=True)

    port: int = 8100
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "bkv-fleet"
    user_pin: SecretStr
    max_attempts: int = Field(10, ge=1, le=1000)
    # This hsm-proxy's log heads (bkv_hsm_proxy/nvram.py): made once by init-state, written only by
    # this process; serve refuses to start without it (a missing file would be a rolled-back HSM).
    state_file: str = "hsm-state.json"
    # Only fleet-init uses etcd: it publishes the fleet parameters there.
    etcd_endpoints: str = ""
    etcd_prefix: str = "/bkv"
