"""Where an island's HSM-held log lives in etcd, for the one service that
writes it (``bkv_island.ledger``) and the ones that read it (the island, and
the hsm-proxy's ``change-members`` checking a chain)::

    <prefix>/log/<island>/head                   the newest LogEntry (JSON)
    <prefix>/log/<island>/entries/<index:020d>   {"entry": LogEntry, "refs": [user refs it changed]}
"""

from __future__ import annotations

import json

from bkv_protocol import hsm_api as hapi


def head_key(prefix: str, island: str) -> bytes:
    return f"{prefix}/log/{island}/head".encode()


def entry_key(prefix: str, island: str, index: int) -> bytes:
    return f"{prefix}/log/{island}/entries/{index:020d}".encode()


def entry_value(entry: hapi.LogEntry, refs: list[str]) -> bytes:
    return json.dumps({"entry": json.loads(entry.model_dump_json()), "refs": refs}).encode()


def entry_of(value: bytes) -> hapi.LogEntry:
    return hapi.LogEntry.model_validate(json.loads(value)["entry"])


def refs_of(value: bytes) -> list[str]:
    return json.loads(value)["refs"]
