"""Typed settings of a vault island (env prefix ``BKV_ISLAND_``)."""

from __future__ import annotations

import re

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from bkv_island.ledger import RETAIN
from bkv_island.store import EVENTS_KEPT
from bkv_server.settings import EtcdSettings, split_list

ISLAND_ID = r"[a-z0-9][a-z0-9\-]{0,62}"
# A replica id is a pod name (DNS-1123 subdomain); it becomes an etcd key segment, so no "/" or newline.
REPLICA_ID = r"[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?"
ID_RULES = {"island_id": (ISLAND_ID, "island ids are lowercase letters, digits and dashes"),
            "replica_id": (REPLICA_ID, "replica ids are lowercase letters, digits, dots and dashes (a pod name)")}


class IslandAdminSettings(EtcdSettings):
    """What the admin subcommands read (set-map, add-island, migrate-fleet);
    a replica (serve) reads all of :class:`IslandSettings`, this part included."""

    model_config = SettingsConfigDict(env_prefix="BKV_ISLAND_", extra="ignore", frozen=True)

    port: int = 8200
    hsm_urls: str = ""

    @property
    def hsm_url_list(self) -> list[str]:
        return split_list(self.hsm_urls)


class IslandSettings(IslandAdminSettings):
    island_id: str
    replica_id: str
    advertise_url: str = ""
    hsm_urls: str  # a replica needs its hsm-proxies
    # Log entries kept in etcd behind the head at least (bkv_island.appender.Appender.compact).
    log_retain_entries: int = Field(RETAIN, ge=1_000)
    # Per-account rate limits (bkv_server.ratelimit; docs/api.md, "Rate limits"): requests
    # a minute sustained and at once, per account; per_minute 0 turns a budget off. A
    # user's whole attempt limit fits in one burst, so only a flood ever waits.
    account_guess_per_minute: float = Field(30.0, ge=0)
    account_guess_burst: int = Field(60, ge=1)
    account_registration_per_minute: float = Field(20.0, ge=0)
    account_registration_burst: int = Field(30, ge=1)
    # Events kept per account (its feed, POST /v1/events): older ones are deleted as new ones land.
    events_kept: int = Field(EVENTS_KEPT, ge=1, le=1024)

    @field_validator("island_id", "replica_id")
    @classmethod
    def _an_id(cls, v: str, info: ValidationInfo) -> str:
        pattern, what = ID_RULES[info.field_name]
        if not re.fullmatch(pattern, v):
            raise ValueError(what)
        return v

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"
