"""Typed settings of a vault island (env prefix ``BKV_ISLAND_``)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from bkv_island.ledger import RETAIN
from bkv_server.settings import ServiceSettings, split_list


class IslandSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="BKV_ISLAND_", extra="ignore", frozen=True)

    port: int = 8200
    island_id: str
    replica_id: str
    advertise_url: str = ""
    etcd_endpoints: str = "127.0.0.1:2379"
    etcd_prefix: str = "/bkv"
    hsm_urls: str
    # Log entries kept in etcd behind the head at least (bkv_island.ledger.Ledger.compact).
    log_retain_entries: int = Field(RETAIN, ge=1_000)

    @field_validator("island_id")
    @classmethod
    def _island_id(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9\-]{0,62}", v):
            raise ValueError("island ids are lowercase letters, digits and dashes")
        return v

    @field_validator("replica_id")
    @classmethod
    def _replica_id(cls, v: str) -> str:
        import re

        # A pod name (DNS-1123 subdomain); it becomes an etcd key segment, so no "/" or newline.
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?", v):
            raise ValueError("replica ids are lowercase letters, digits, dots and dashes (a pod name)")
        return v

    @property
    def hsm_url_list(self) -> list[str]:
        return split_list(self.hsm_urls)

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"
