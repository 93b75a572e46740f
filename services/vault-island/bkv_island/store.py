"""Where an island's records live in etcd: ``<prefix>/records/<island>/<user
ref>`` (``bkv_protocol.encoding.user_ref``: a hash of the user id), whose
value is the JSON of :class:`bkv_protocol.hsm_api.Entry`. They are written
only with the island's log, in one transaction with its entry and head
(``bkv_island.ledger``).

Each account's last events (its feed, ``bkv_protocol.v1.Event``) live beside
them, one key per version: ``<prefix>/events/<island>/<user ref>/<version,
20 digits>``, whose value is :class:`StoredEvent`; written in the same
transaction as the entry whose change they tell, so an event is stored iff
its change is, and the older ones beyond the kept number deleted there too.
A move carries them to the record's new island (:func:`carried`), which
stores them once the record has arrived; the old island then drops its copy."""

from __future__ import annotations

from bkv_protocol import transcripts
from bkv_protocol.encoding import user_ref
from bkv_protocol.island_api import StoredEvent

EVENTS_KEPT = 64  # events kept per account (BKV_ISLAND_EVENTS_KEPT)


def ref_key(prefix: str, island: str, ref: str) -> bytes:
    return f"{prefix}/records/{island}/{ref}".encode()


def user_key(prefix: str, island: str, user_id: str) -> bytes:
    return ref_key(prefix, island, user_ref(user_id))


def events_prefix(prefix: str, island: str, ref: str) -> bytes:
    return f"{prefix}/events/{island}/{ref}/".encode()


def event_key(prefix: str, island: str, ref: str, version: int) -> bytes:
    return events_prefix(prefix, island, ref) + f"{version:020d}".encode()


def carried(events: list[StoredEvent], head: bytes | None, upto: int, kept: int) -> list[StoredEvent]:
    """The events a move brought that the new island keeps: the last ``kept``
    of a run of consecutive versions ending at ``upto`` that chains to the
    moved entry's events ``head``; none if they do not (whatever the old
    island sent, a device checks the chain again: this only keeps an island
    from storing what no device would accept)."""
    run = sorted(events, key=lambda e: e.event.version)
    if not run or head is None or run[-1].event.version != upto:
        return []
    h = run[0].before
    for i, stored in enumerate(run):
        if stored.before != h or (i and stored.event.version != run[i - 1].event.version + 1):
            return []
        e = stored.event
        h = transcripts.event_chain(h, transcripts.event_bytes(e.version, e.kind.value, e.attempts_left, e.at_ms))
    return run[-kept:] if h == head else []
