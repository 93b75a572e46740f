"""Where an island's records live in etcd: ``<prefix>/records/<island>/<user
ref>`` (``bkv_protocol.encoding.user_ref``: a hash of the user id), whose
value is the JSON of :class:`bkv_protocol.hsm_api.Entry`. They are written
only with the island's log, in one transaction with its entry and head
(``bkv_island.ledger``)."""

from __future__ import annotations

from bkv_protocol.encoding import user_ref


def ref_key(prefix: str, island: str, ref: str) -> bytes:
    return f"{prefix}/records/{island}/{ref}".encode()


def user_key(prefix: str, island: str, user_id: str) -> bytes:
    return ref_key(prefix, island, user_ref(user_id))
