"""Where an island's records live in etcd: ``<prefix>/records/<island>/<user
ref>`` (``bkv_protocol.encoding.user_ref``: a hash of the user id), whose
value is the JSON of :class:`bkv_protocol.hsm_api.Entry`. They are written
only with the island's log, in one transaction with its entry and head
(``bkv_island.ledger``).

Each account's last events (its feed, ``bkv_protocol.v1.Event``) live beside
them, one key per version: ``<prefix>/events/<island>/<user ref>/<version,
20 digits>``, whose value is :class:`StoredEvent`; written in the same
transaction as the entry whose change they tell, so an event is stored iff
its change is, and the older ones beyond the kept number deleted there too."""

from __future__ import annotations

from bkv_protocol import v1
from bkv_protocol.encoding import user_ref
from bkv_protocol.wire import Frozen, fixed_b64

EVENTS_KEPT = 64  # events kept per account (BKV_ISLAND_EVENTS_KEPT)


class StoredEvent(Frozen):
    """An event and the account's chain head before it (what a device
    checks the first event it is shown from)."""

    event: v1.Event
    before: fixed_b64(32)


def ref_key(prefix: str, island: str, ref: str) -> bytes:
    return f"{prefix}/records/{island}/{ref}".encode()


def user_key(prefix: str, island: str, user_id: str) -> bytes:
    return ref_key(prefix, island, user_ref(user_id))


def events_prefix(prefix: str, island: str, ref: str) -> bytes:
    return f"{prefix}/events/{island}/{ref}/".encode()


def event_key(prefix: str, island: str, ref: str, version: int) -> bytes:
    return events_prefix(prefix, island, ref) + f"{version:020d}".encode()
