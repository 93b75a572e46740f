"""The fleet's hsm-proxies inside the boundary: the admin-signed member set
in the token (``bkv_protocol.members``), the check ``serve`` makes, and the
ceremony that changes the set (docs/protocol.md, "Changing the member set").

The token holds the admin's public key (once, at fleet-init) and each set
the admin signed, one read-only data object per epoch; the newest is the
one that serves. A change goes:

1. the admin signs a *freeze order* for the current epoch (offline);
2. each reachable member is frozen with it (``POST /hsm/v1/members/freeze``):
   durably, it captures nothing more in the old set, then it says, MAC'd,
   which heads it froze at (``log.FreezeStatement``);
3. the admin signs the next set (epoch + 1) taking over at the newest of
   the frozen heads;
4. on every member of the next set, with the hsm-proxy stopped,
   :func:`change_members` checks the set against the token's admin key and
   the freezes against the log key and the chain in etcd, stores the set in
   the token, and writes that hsm-proxy's state file for the new set, at
   those heads.

Why that is safe -- no entry committed by the old set is lost, and no
second branch can commit: with ``n`` old members, quorum ``q`` and up to
``f`` state files rolled back (``log.quorum``), at least ``n - q + 1 + f``
freezes are required (:func:`freezes_needed`). Then (a) any old quorum
shares at least ``1 + f`` members with the frozen ones, so even with ``f``
rolled back one frozen member captured every committed entry, and each
frozen head lies on the chain to the heads taken over; and (b) fewer than
``q`` old members are left unfrozen, even counting ``f`` rolled-back
files, so the old set can commit nothing more. Capture statements carry
their set's epoch, so a statement from the old set never counts in the new.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Callable

from bkv_protocol import hsm_api as api
from bkv_protocol import members
from bkv_hsm_proxy import log as hlog
from bkv_hsm_proxy import nvram

ADMIN_KEY_LABEL = "bkv-admin-key"        # the offline admin key's public half, fixed once
MEMBER_SET_LABEL = "bkv-hsm-member-set/"  # + epoch: each signed set its own read-only object
BORN_LABEL = "bkv-hsm-state-born/"        # + <hsm-id>/<epoch>: the birth id of the state file that served first
REMADE = ("this site's state file was made again after one was lost: replace the site with the member-set "
          "ceremony (docs/kubernetes.md, 'Replacing a lost state volume'; docs/reliability.md, "
          "'Replacing an hsm-proxy')")


class MembersFixed(Exception):
    """The token holds another admin key or member set, or the set is not
    the token's: nothing was changed, and ``serve`` does not start."""


class ChangeRefused(MembersFixed):
    """The member-set change was refused (the message says why); nothing was changed."""


class StateRemade(MembersFixed):
    """The token holds another birth id for this hsm-proxy and epoch: its
    state file is not the one that served (lost and made again); ``serve``
    and ``start`` refuse (exit 4) rather than serve rolled back to the
    set's start."""


def token_admin_key(hsm) -> bytes | None:
    return hsm.load_blob(ADMIN_KEY_LABEL)


def fix_admin_key(hsm, public_key: bytes) -> bool:
    """Put the admin's public key into the token, once. True if stored now."""
    if len(public_key) != 32:
        raise MembersFixed("the admin public key is a 32-byte Ed25519 key (base64)")
    held = token_admin_key(hsm)
    if held is None:
        hsm.store_blob(ADMIN_KEY_LABEL, public_key)
        return True
    if held != public_key:
        raise MembersFixed("the token holds another admin key; it is fixed at the first fleet-init")
    return False


def _token_sets(hsm) -> dict[int, bytes]:
    out, epoch = {}, 1
    while (blob := hsm.load_blob(f"{MEMBER_SET_LABEL}{epoch}")) is not None:
        out[epoch], epoch = blob, epoch + 1
    return out


def _verified(hsm, signed: members.SignedMemberSet | bytes) -> members.MemberSet:
    """A set (or one the token stored, as its blob) verified under the token's admin key."""
    admin = token_admin_key(hsm)
    if admin is None:
        raise MembersFixed("the token holds no admin key: run fleet-init with --admin-public-key")
    try:
        stored = isinstance(signed, bytes)
        return members.verify(members.SignedMemberSet.from_json(signed) if stored else signed, admin)
    except members.MemberSetError as exc:
        raise MembersFixed(f"the token's member set does not verify: {exc}" if stored else str(exc)) from None


def token_member_set(hsm) -> members.MemberSet | None:
    """The token's newest member set (the one that serves), verified under
    the token's admin key."""
    sets = _token_sets(hsm)
    return _verified(hsm, sets[max(sets)]) if sets else None


def fix_member_set(hsm, signed: members.SignedMemberSet) -> bool:
    """Store the fleet's first member set, signed by the token's admin key
    (a read-only data object). True if stored now; the same set again, or
    the next one (epoch + 1, which each hsm-proxy stores when it adopts it
    with the freezes: :func:`change_members`), changes nothing; any other
    set is refused."""
    new = _verified(hsm, signed)
    held = token_member_set(hsm)
    if held is None:
        if new.epoch != 1:
            raise MembersFixed("the first member set of a fleet is epoch 1")
        hsm.store_blob(f"{MEMBER_SET_LABEL}1", signed.to_json().encode())
        return True
    if new.epoch == held.epoch + 1:
        return False  # the next set of a change: the hsm-proxies store it, checked with the freezes (start)
    if held.digest() != new.digest():
        raise MembersFixed(f"the token's hsm-proxies are {','.join(held.members)} (epoch {held.epoch}); "
                           "a set is changed only by the change ceremony (bkv-hsm-proxy change-members)")
    return False


def check_members(hsm, identity: nvram.Identity) -> None:
    """Refuse to serve unless the state file's set (``nvram.Identity``) is
    the newest one the token holds, signed by the token's admin key."""
    held = token_member_set(hsm)
    if held is None:
        raise MembersFixed("the token holds no member set: run `bkv-hsm-proxy fleet-init --admin-public-key K "
                           "--member-set FILE` (docs/kubernetes.md, 'The member set')")
    if identity.epoch < held.epoch:
        raise MembersFixed(f"the state file serves in the member set of epoch {identity.epoch}, the token's newest is "
                           f"{held.epoch}: adopt it with `bkv-hsm-proxy change-members` (docs/reliability.md)")
    if identity.set_digest != held.digest() or identity.epoch != held.epoch:
        raise MembersFixed(f"the state file names the hsm-proxies {','.join(identity.members)} (epoch "
                           f"{identity.epoch}) but the token {','.join(held.members)} (epoch {held.epoch}): the state "
                           "file was made again with another set; refusing to serve")


def _born_label(hsm_id: str, epoch: int) -> str:
    return f"{BORN_LABEL}{hsm_id}/{epoch}"


def check_born(hsm, identity: nvram.Identity) -> None:
    """On the first serve of an hsm-proxy in an epoch, keep its state file's
    birth id in the token; on every later one, refuse (StateRemade) a file
    with another: one lost and made again, which would serve rolled back to
    the set's start (in the first set, genesis). A file rolled back by
    copying an old one keeps its birth id: that is the rollback the quorum
    tolerates (docs/protocol.md, 'State file'). SoftHSM2 does not fsync its
    objects: a marker lost in a host crash is simply stored again."""
    label = _born_label(identity.hsm, identity.epoch)
    held = hsm.load_blob(label)
    if held is None:
        hsm.store_blob(label, identity.born)
    elif not hmac.compare_digest(held, identity.born):
        raise StateRemade(REMADE)


def start(hsm, log_key: Callable[[], hlog.LogKey], state_path: str | Path, hsm_id: str,
          signed: members.SignedMemberSet, freezes: list[api.FreezeOut], chain: Chain) -> str:
    """What ``bkv-hsm-proxy start`` does before it serves, from the mounted
    (signed) set and freeze statements; the caller holds the state file's
    lock. Returns what was done: "made" (no state file, the first set, and
    the token never saw one served: a first start), "adopted" (the mounted
    set is newer than the state file, or the file is missing in a later set
    this hsm-proxy never served in: :func:`change_members`), or "kept".
    A file missing where the token says one served is refused
    (StateRemade): only the change ceremony brings that site back."""
    mounted = _verified(hsm, signed)
    path = Path(state_path)
    if path.exists():
        if nvram.open_state(path)[1].epoch >= mounted.epoch:
            return "kept"  # serve checks it against the token's newest set
    elif hsm.load_blob(_born_label(hsm_id, mounted.epoch)) is not None:
        raise StateRemade(f"no state file at {path}, but one served in epoch {mounted.epoch}: {REMADE}")
    elif mounted.epoch == 1:
        nvram.init_state(path, hsm_id, mounted)
        return "made"
    change_members(hsm, log_key(), path, hsm_id, signed, freezes, chain, locked=True)
    return "adopted"


# -- the change ceremony -------------------------------------------------------------------
def freezes_needed(old_members: int) -> int:
    """Freeze statements a change needs from the old set (module docstring)."""
    return old_members - hlog.quorum(old_members) + 1 + hlog.tolerated(old_members)


def newest_frozen(freezes: list[api.FreezeOut]) -> dict[str, tuple[int, bytes]]:
    """The heads a next set takes over at: per island, the newest frozen head
    (what ``sign-members --freezes`` signs; change_members checks the rest)."""
    out: dict[str, tuple[int, bytes]] = {}
    for fz in freezes:
        for island, h in fz.heads.items():
            if island not in out or h.index > out[island][0]:
                out[island] = (h.index, h.mac)
    return out


Chain = Callable[[str, int, int], list[api.LogEntry]]  # (island, after, upto): the entries, oldest first


def change_members(hsm, log_key: hlog.LogKey, state_path: str | Path, hsm_id: str,
                   signed: members.SignedMemberSet, freezes: list[api.FreezeOut], chain: Chain,
                   locked: bool = False) -> nvram.Identity:
    """Adopt the next member set on one hsm-proxy (stopped: this writes its
    state file): check it, store it in the token (once per token), and make
    the state file for it at the heads it takes over, with a new birth id.
    Idempotent; raises ChangeRefused with the reason, changing nothing.
    ``locked``: the caller holds the state file's lock (``start``)."""
    new = _verified(hsm, signed)
    if hsm_id not in new.members:
        raise ChangeRefused(f"{hsm_id} is not one of the next set's hsm-proxies ({','.join(new.members)})")
    sets = _token_sets(hsm)
    newest = max(sets) if sets else 0
    if new.epoch == 1 or new.epoch not in (newest, newest + 1):
        raise ChangeRefused(f"the token's newest set is epoch {newest}: the next one is {newest + 1}")
    if new.epoch == newest and _verified(hsm, sets[newest]).digest() != new.digest():
        raise ChangeRefused(f"the token holds another set for epoch {new.epoch}")
    old = _verified(hsm, sets[new.epoch - 1])
    heads = _taken_over(log_key, old, new, freezes, chain)

    path = Path(state_path)
    identity = nvram.Identity(hsm_id, new.members, new.epoch, new.digest())
    if locked:
        return _adopt(hsm, path, identity, signed, heads, new.epoch == newest + 1)
    lock = nvram.hold(path)  # no hsm-proxy serving on it meanwhile
    try:
        return _adopt(hsm, path, identity, signed, heads, new.epoch == newest + 1)
    finally:
        os.close(lock)


def _adopt(hsm, path: Path, identity: nvram.Identity, signed: members.SignedMemberSet,
           heads: dict[str, nvram.Head], store: bool) -> nvram.Identity:
    new = signed.set
    if path.exists():
        _, mine = nvram.open_state(path)
        if mine == identity:  # birth ids aside
            if store:
                hsm.store_blob(f"{MEMBER_SET_LABEL}{new.epoch}", signed.to_json().encode())
            return mine  # done before (a rerun)
        if mine.epoch >= new.epoch:
            raise ChangeRefused(f"{path} already serves in epoch {mine.epoch}")
    if store:
        hsm.store_blob(f"{MEMBER_SET_LABEL}{new.epoch}", signed.to_json().encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    nvram.StateFile(path, identity.encode())._write_file(heads)  # noqa: SLF001 - atomic replace, no server running
    return identity


def _taken_over(log_key: hlog.LogKey, old: members.MemberSet, new: members.MemberSet,
                freezes: list[api.FreezeOut], chain: Chain) -> dict[str, nvram.Head]:
    """The heads the next set starts at, each checked: enough authentic
    freezes of the old set, the signed heads the newest frozen ones, and
    every frozen head on the chain to them."""
    frozen: dict[str, api.FreezeOut] = {}
    for fz in freezes:
        heads = {i: nvram.Head(h.index, h.mac, h.root) for i, h in fz.heads.items()}
        if fz.hsm not in old.members or fz.epoch != old.epoch or fz.hsm in frozen:
            raise ChangeRefused(f"a freeze statement of {fz.hsm} (epoch {fz.epoch}) is not one of the old set's "
                                f"(epoch {old.epoch}: {','.join(old.members)}), or is given twice")
        if not hmac.compare_digest(fz.tag, hlog.freeze_tag(log_key, fz.hsm, fz.epoch, heads)):
            raise ChangeRefused(f"the freeze statement of {fz.hsm} was not made by the boundary")
        frozen[fz.hsm] = fz
    need = freezes_needed(len(old.members))
    if len(frozen) < need:
        raise ChangeRefused(f"{len(frozen)} of the old set's {len(old.members)} hsm-proxies froze; a change needs "
                            f"{need}, or an entry it committed could be lost")
    top = newest_frozen(list(frozen.values()))
    if new.heads != top:
        raise ChangeRefused("the next set does not take over at the newest frozen heads")
    out = {}
    for island, (index, mac) in top.items():
        seen = {(fz.heads[island].index, fz.heads[island].mac) for fz in frozen.values() if island in fz.heads}
        root = next(fz.heads[island].root for fz in frozen.values()
                    if island in fz.heads and fz.heads[island].index == index)
        low = min(i for i, _ in seen)
        links = chain(island, low, index) if low < index else []
        by_index = {index: mac}
        prev = None
        for e in links:  # low + 1 .. index, each one link of one chain the boundary made
            entry = hlog.LogEntry(e.island, e.index, e.root, e.prev_mac, e.salt, e.mac)
            if e.island != island or not hlog.made_by(log_key, entry) or (prev and (
                    e.index != prev.index + 1 or e.prev_mac != prev.mac)):
                raise ChangeRefused(f"island {island}: the log in etcd is not one chain from #{low} to #{index}")
            by_index[e.index - 1] = e.prev_mac
            by_index[e.index] = e.mac
            prev = entry
        if links and (links[0].index != low + 1 or links[-1].index != index or links[-1].mac != mac):
            raise ChangeRefused(f"island {island}: etcd does not hold the entries from #{low} to #{index}")
        for i, m in seen:
            if by_index.get(i) != m:
                raise ChangeRefused(f"island {island}: the frozen heads are not all on one chain (a fork): "
                                    "restore the log in etcd first (docs/reliability.md)")
        out[island] = nvram.Head(index, mac, root)
    return out


def read_chain(endpoints: str, prefix: str) -> Chain:
    """The island's log entries from etcd (``bkv_server.log_keys``)."""
    import asyncio

    from bkv_server import log_keys
    from bkv_server.etcd import RETRYABLE, connect

    def chain(island: str, after: int, upto: int) -> list[api.LogEntry]:
        if not endpoints:
            raise ChangeRefused("the frozen heads differ: BKV_HSM_ETCD_ENDPOINTS is needed to check the chain")

        async def read() -> list[api.LogEntry]:
            client = await connect(endpoints)
            try:
                got = await client.get_range(log_keys.entry_key(prefix, island, after + 1),
                                             log_keys.entry_key(prefix, island, upto + 1))
                return [log_keys.entry_of(kv.value) for kv in got]
            finally:
                await client.close()

        try:
            return asyncio.run(read())
        except RETRYABLE as exc:
            raise ChangeRefused(f"etcd unreachable while checking the chain: {type(exc).__name__}") from None

    return chain
