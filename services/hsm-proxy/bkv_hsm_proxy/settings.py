"""Typed settings of the hsm-proxy (env prefix ``BKV_HSM_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from bkv_hsm_proxy import records
from bkv_server.settings import EtcdSettings


class HsmAdminSettings(EtcdSettings):
    """What the admin subcommands that open no token read (log-heads,
    init-state, publish-bundle, resign-bundle); serve and the token's
    commands read all of :class:`HsmProxySettings`, this part included."""

    model_config = SettingsConfigDict(env_prefix="BKV_HSM_", extra="ignore", frozen=True)

    port: int = 8100
    # The hsm-proxy's etcd is optional: fleet-init publishes the fleet parameters there if it is set;
    # retire-fleet, publish-bundle, resign-bundle and a member change over differing heads need it.
    etcd_endpoints: str = ""
    # This hsm-proxy's log heads (bkv_hsm_proxy/nvram.py): made once by init-state, written only by
    # this process; serve refuses to start without it (a missing file would be a rolled-back HSM).
    state_file: str = "hsm-state.json"


class HsmProxySettings(HsmAdminSettings):
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "bkv-fleet"
    user_pin: SecretStr
    max_attempts: int = Field(10, ge=1, le=1000)
    # The wait after each wrong guess, in seconds, by attempts spent since the last right password
    # (records.DEFAULT_GUESS_DELAYS_S: after iOS's passcode delays, ten wrong guesses take about a
    # day); a JSON list, e.g. BKV_HSM_GUESS_DELAYS_S='[0, 0, 60]'; [] for none (the dev fleet's default).
    guess_delays_s: tuple[int, ...] = records.DEFAULT_GUESS_DELAYS_S

    @field_validator("guess_delays_s")
    @classmethod
    def _delays(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return records.check_guess_delays(v)
