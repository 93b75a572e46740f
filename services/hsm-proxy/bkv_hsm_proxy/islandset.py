"""Which island holds a user, inside the boundary: the admin-signed island
set (``bkv_protocol.islands``) kept in the token, one read-only data object
per epoch (``bkv-island-set/<epoch>``), like the member set
(``bkv_hsm_proxy.membership``).

fleet-init stores the first set (epoch 1); each later one (an add-island
migration: the islands with the new one and the old ones as ``previous``,
then the islands alone) is delivered through ``POST /hsm/v1/islands/store``
or ``bkv-hsm-proxy store-island-set``: the admin's signature is its
authority, so anyone may deliver it. A set is stored only as the next epoch,
verified under the token's admin key, and only as a step a migration can
take: a set with ``previous`` names the islands the token's newest set has
(where the records are), and a set without one keeps the newest set's
islands (the migration's end) -- so the islands change only through a
migration the boundary saw start.

The boundary signs ``no_record`` and ``record_destroyed`` only on the one
island the newest set says the user's record can be on, and makes a new
record only there (``VaultHsm._settled``): an etcd writer who routes a user
elsewhere gets ``wrong_island``, never a signed refusal.
"""

from __future__ import annotations

from bkv_protocol import islands
from bkv_hsm_proxy import errors
from bkv_hsm_proxy.membership import token_admin_key

ISLAND_SET_LABEL = "bkv-island-set/"  # + epoch: each signed set its own read-only object


def _label(epoch: int) -> str:
    return f"{ISLAND_SET_LABEL}{epoch}"


def _verified(hsm, blob: bytes | islands.SignedIslandSet) -> islands.IslandSet:
    admin = token_admin_key(hsm)
    if admin is None:
        raise errors.IslandSetRefused("the token holds no admin key: run fleet-init with --admin-public-key")
    stored = isinstance(blob, bytes)
    try:
        return islands.verify(islands.SignedIslandSet.from_json(blob) if stored else blob, admin)
    except islands.IslandSetError as exc:
        if stored:  # the token's own object does not verify: refuse everything that depends on it
            raise errors.HsmError(f"the token's island set does not verify: {exc}") from None
        raise errors.IslandSetRefused(str(exc)) from None


def newest_after(hsm, known: islands.IslandSet | None) -> islands.IslandSet | None:
    """The token's newest island set, verified, looking only past ``known``
    (a set read before: sets are only ever added, one epoch at a time)."""
    newest, epoch = known, (known.epoch if known else 0) + 1
    while (blob := hsm.load_blob(_label(epoch))) is not None:
        newest = _verified(hsm, blob)
        if newest.epoch != epoch:
            raise errors.HsmError(f"the token's island set object {epoch} holds epoch {newest.epoch}")
        epoch += 1
    return newest


def token_island_set(hsm) -> islands.IslandSet | None:
    return newest_after(hsm, None)


def store_island_set(hsm, signed: islands.SignedIslandSet) -> bool:
    """Store ``signed`` as the token's next island set. True if stored now;
    the very set stored before changes nothing (a delivery run again);
    anything else raises IslandSetRefused, changing nothing."""
    new = _verified(hsm, signed)
    held = token_island_set(hsm)
    newest = held.epoch if held else 0
    if new.epoch <= newest:
        stored = _verified(hsm, hsm.load_blob(_label(new.epoch)))
        if stored.digest() != new.digest():
            raise errors.IslandSetRefused(f"the token holds another island set for epoch {new.epoch}")
        return False
    if new.epoch != newest + 1:
        raise errors.IslandSetRefused(f"the token's newest island set is epoch {newest}: the next one is "
                                      f"{newest + 1}")
    if held is not None:
        if new.previous is not None and new.previous != held.islands:
            raise errors.IslandSetRefused(f"a migration starts from the islands the records are on now "
                                          f"({','.join(held.islands)}): its previous must name exactly those")
        if new.previous is None and new.islands != held.islands:
            raise errors.IslandSetRefused("the islands change only through a migration: first a set with the "
                                          "current islands as previous, then the same islands without it")
    hsm.store_blob(_label(new.epoch), signed.to_json().encode())
    return True


def signed_blob(hsm, epoch: int) -> bytes | None:
    """The signed set of ``epoch`` as the token holds it (JSON), for whoever asks."""
    return hsm.load_blob(_label(epoch))
