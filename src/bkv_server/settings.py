"""Base of every service's typed settings (pydantic-settings).

Settings are validated at start-up; outside ``BKV_ENV=dev`` a placeholder
secret is refused, so a forgotten dev value never reaches production.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "dev", "dev-pin", "1234", "123456", "password", "secret"}


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    # One switch for every service, without the service prefix.
    env: Literal["dev", "prod"] = Field("prod", validation_alias="BKV_ENV")
    host: str = "127.0.0.1"
    port: int
    # A separate /metrics listener (0 = off; /metrics stays on the main port
    # too). In Kubernetes, NetworkPolicies let Prometheus reach only this
    # port, so a scraper can never call the service's API.
    metrics_port: int = 0

    @model_validator(mode="after")
    def _no_placeholder_secrets(self):
        if self.env == "dev":
            return self
        for name, value in self:
            if isinstance(value, SecretStr) and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError(f"{name} is a placeholder secret; set a real one (or BKV_ENV=dev)")
        return self


class EtcdSettings(ServiceSettings):
    """etcd, as every service that uses it names it (``<PREFIX>ETCD_ENDPOINTS``,
    ``<PREFIX>ETCD_PREFIX``): declared here once, with one default each."""

    etcd_endpoints: str = "127.0.0.1:2379"  # comma-separated host:port
    etcd_prefix: str = "/bkv"


def split_list(value: str | list[str]) -> list[str]:
    if isinstance(value, list):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]
