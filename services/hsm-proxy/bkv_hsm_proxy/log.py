"""The HSM-held log of an island: what keeps "which entry is current" inside
the boundary (issue #17; after Juicebox's ``hsm_core``). Logic only: the
hsm-proxy's routes and the island's appender are wired to it separately.

Every change to an island's records is one *log entry*, chained and MAC'd by
the boundary::

    LogEntry(island, index, root, prev_mac, salt, mac)
    mac  = HMAC-SHA256(log key, canonical(LOG_ENTRY_MAC, island, u64 index, root, prev_mac, salt))
    root = the sparse Merkle trie (bkv_protocol.merkle) over the island's records,
           leaf value = entry_digest(the record's etcd entry)

The log key is derived inside the boundary from the OPAQUE server setup
(HKDF, ``labels.LOG_KEY_INFO``), so every hsm-proxy of the fleet holds it,
it survives key rotation (the setup is re-sealed, not replaced) and it never
leaves the process.

Three steps, each a rule the untrusted side cannot get around:

1. :meth:`IslandLog.apply` -- a batch of record changes, each with a proof
   against an authentic head that is not older than what this hsm-proxy
   captured, becomes the next entry. Nothing is persisted and nothing is
   released: what a client could use is *held* (sealed to the boundary,
   bound to the entry's index and mac).
2. :meth:`IslandLog.capture` -- an entry that extends this hsm-proxy's
   captured head by exactly one link (index + 1, prev_mac = head mac, valid
   mac) becomes its head, durably (the state file, ``nvram.py``, group
   committed), and the hsm-proxy MACs a *capture statement* for it. A fork
   -- a second entry at an index already captured -- is refused.
3. :meth:`IslandLog.release` -- held answers open only with capture
   statements for their very entry from a majority of the fleet's
   hsm-proxies (fixed and signed at fleet-init).

So the number of CredentialResponses that ever leave is bounded by the number
of entries a majority captured, and every captured entry is one link of one
chain whose records' counts only go down: applying the same request to an
old head 30 times yields 30 candidate entries of which at most one can ever
be captured by a majority, and a head older than a majority's capture can
never again be extended.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bkv_hsm_proxy.errors import Frozen, LogError, NoQuorum, NotAuthentic, NotNextEntry, ProofRefused, StaleHead
from bkv_hsm_proxy.nvram import Head, StateFile
from bkv_protocol import hsm_api as api
from bkv_protocol import labels, merkle
from bkv_protocol.encoding import canonical, u64
from bkv_protocol.secrets import Secret

NO_MAC = bytes(32)  # the genesis entry's prev_mac
NO_SALT = bytes(16)
RECENT_CAPTURES = 4096  # per island, in memory


class LogKey(Secret):
    kind = "LogKey"

    @classmethod
    def from_setup(cls, opaque_setup: bytes) -> LogKey:
        return cls(HKDF(hashes.SHA256(), 32, salt=None, info=labels.LOG_KEY_INFO).derive(opaque_setup))

    def mac(self, label: bytes, *fields: bytes) -> bytes:
        return hmac.new(self.reveal(), canonical(label, *fields), hashlib.sha256).digest()

    def held_key(self) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt=None, info=labels.HELD_ANSWER_INFO).derive(self.reveal())


@dataclass(frozen=True, slots=True)
class LogEntry:
    island: str
    index: int
    root: bytes
    prev_mac: bytes
    salt: bytes  # fresh for every apply: two candidates for one index are never one entry
    mac: bytes

    def __repr__(self) -> str:
        return f"LogEntry({self.island}#{self.index}, mac={self.mac.hex()[:12]}…)"

    def head(self) -> Head:
        return Head(self.index, self.mac, self.root)


def entry_mac(key: LogKey, island: str, index: int, root: bytes, prev_mac: bytes, salt: bytes) -> bytes:
    return key.mac(labels.LOG_ENTRY_MAC, island.encode(), u64(index), root, prev_mac, salt)


def made_by(key: LogKey, entry: LogEntry) -> bool:
    """``entry`` carries the MAC only the boundary can make."""
    return hmac.compare_digest(entry.mac, entry_mac(key, entry.island, entry.index, entry.root, entry.prev_mac,
                                                    entry.salt))


def check_proof(head: LogEntry, ref: bytes, proof: merkle.Proof, current: api.Entry | None) -> None:
    """``current`` is what ``head``'s root says the record ``ref`` is; else ProofRefused."""
    try:
        found = merkle.verify(head.root, ref, proof)
    except ValueError:  # merkle.ProofInvalid, or arguments of the wrong shape
        raise ProofRefused("the proof does not match the head's root") from None
    if found != entry_digest(current):
        raise ProofRefused("the record is not the one the log says is current")


def genesis(key: LogKey, island: str) -> LogEntry:
    """Index 0: the empty trie. Every island's chain starts here."""
    return LogEntry(island, 0, merkle.PLACEHOLDER, NO_MAC, NO_SALT,
                    entry_mac(key, island, 0, merkle.PLACEHOLDER, NO_MAC, NO_SALT))


entry_digest = api.entry_digest  # a record's leaf value (bkv_protocol.hsm_api)


@dataclass(frozen=True, slots=True)
class Change:
    """One record of a batch: the entry the island claims is current, its
    proof against the batch's head, and the entry the boundary computed next."""

    ref: bytes  # 32-byte user ref
    current: api.Entry | None
    proof: merkle.Proof
    new: api.Entry


@dataclass(frozen=True, slots=True)
class Statement:
    """``hsm`` captured ``(island, index, mac)``: MAC'd by the boundary."""

    hsm: str
    island: str
    index: int
    mac: bytes
    tag: bytes


def tolerated(members: int) -> int:
    """State files that may be rolled back without harm, by design: one from
    four hsm-proxies up (5 sites: 4 captures, one site may be down), else none."""
    return 1 if members >= 4 else 0


def quorum(members: int, rolled_back: int | None = None) -> int:
    """Captures needed to release. Two quorums must share more members than
    can have had their state file rolled back (SoftHSM2 and a host root can;
    an HSM's NVRAM cannot): ``2q - n > f``. A bare majority (f = 0) would let
    an insider who captures each entry on just a majority, then rolls one of
    those sites back, commit a second branch on the other sites. Default f: 1
    from four hsm-proxies up (5 sites: 4 captures, one site may be down), else 0."""
    f = tolerated(members) if rolled_back is None else rolled_back
    q = (members + f) // 2 + 1
    if not 1 <= q <= members:
        raise ValueError(f"{members} hsm-proxies cannot tolerate {f} rolled-back state files")
    return q


@dataclass(frozen=True)
class FreezeStatement:
    """``hsm``, a member of the set of ``epoch``, froze at ``heads``: it will
    capture nothing more in that set. MAC'd by the boundary."""

    hsm: str
    epoch: int
    heads: dict[str, Head]
    tag: bytes


def freeze_tag(key: LogKey, hsm: str, epoch: int, heads: dict[str, Head]) -> bytes:
    fields = [f for island, h in sorted(heads.items()) for f in (island.encode(), u64(h.index), h.mac, h.root)]
    return key.mac(labels.LOG_FREEZE_MAC, u64(epoch), hsm.encode(), u64(len(heads)), *fields)


class IslandLog:
    """One hsm-proxy's side of every island's log."""

    def __init__(self, key: LogKey, hsm_id: str, members: list[str], state: StateFile, *,
                 rolled_back: int | None = None, epoch: int = 1) -> None:
        if hsm_id not in members or len(set(members)) != len(members):
            raise ValueError("members must list every hsm-proxy once, this one included")
        self._key = key
        self.hsm_id = hsm_id
        self.members = frozenset(members)
        self.quorum = quorum(len(members), rolled_back)
        self.epoch = epoch  # of the member set: statements count only within their own set
        self._state = state
        self._held = AESGCM(key.held_key())
        # Links captured lately, in memory only: a statement about one may be asked
        # again after newer ones (a move's evidence). Lost on restart: then only the head.
        self._recent: dict[str, OrderedDict[int, bytes]] = {}

    def __repr__(self) -> str:
        return f"IslandLog({self.hsm_id}, quorum {self.quorum}/{len(self.members)}, key=(redacted))"

    @property
    def frozen(self) -> bool:
        return self._state.frozen

    def state_writes(self) -> int:
        return self._state.writes

    def heads(self) -> dict[str, Head]:
        return self._state.heads()

    # -- heads -------------------------------------------------------------------
    def captured(self, island: str) -> LogEntry:
        """This hsm-proxy's newest captured entry (genesis if none)."""
        head = self._state.head(island)
        if head is None:
            return genesis(self._key, island)
        # prev_mac is not kept (nor needed): the head is only ever extended or compared by mac.
        return LogEntry(island, head.index, head.root, NO_MAC, NO_SALT, head.mac)

    def authentic(self, entry: LogEntry) -> None:
        if not made_by(self._key, entry):
            raise NotAuthentic("this log entry was not made by the boundary")

    def check_head(self, head: LogEntry) -> None:
        """``head`` is authentic and no older than what we captured."""
        self.authentic(head)
        mine = self.captured(head.island)
        if head.index < mine.index or (head.index == mine.index and not hmac.compare_digest(head.mac, mine.mac)):
            raise StaleHead(f"island {head.island}: head #{head.index} is behind this hsm-proxy's #{mine.index}")

    # -- 1. apply ------------------------------------------------------------------
    def refuse_if_frozen(self) -> None:
        if self._state.frozen:
            raise Frozen("this hsm-proxy is frozen for a change of the member set: it takes part again once it "
                         "adopted the next set (bkv-hsm-proxy change-members)")

    def apply(self, head: LogEntry, changes: list[Change]) -> LogEntry:
        """The entry that follows ``head`` with ``changes`` applied. Every
        ``current`` must be what ``head.root`` says the record is."""
        self.refuse_if_frozen()
        self.check_head(head)
        refs = [c.ref for c in changes]
        if not changes or len(set(refs)) != len(refs):
            raise LogError("a batch changes each record once")
        items = []
        for c in changes:
            check_proof(head, c.ref, c.proof, c.current)
            if c.current is not None and c.new.version <= c.current.version and c.new != c.current:
                raise LogError("a change must move the record's version forward")  # a bug, not an attack
            items.append((c.ref, c.proof, entry_digest(c.new)))
        root = merkle.updated_root_many(head.root, items)
        index, salt = head.index + 1, os.urandom(16)
        return LogEntry(head.island, index, root, head.mac, salt,
                        entry_mac(self._key, head.island, index, root, head.mac, salt))

    def hold(self, entry: LogEntry, answer: bytes) -> bytes:
        """Seal an answer to the boundary until ``entry`` is committed."""
        nonce = os.urandom(12)
        return nonce + self._held.encrypt(nonce, answer, self._held_aad(entry.island, entry.index, entry.mac))

    @staticmethod
    def _held_aad(island: str, index: int, mac: bytes) -> bytes:
        return canonical(labels.HELD_ANSWER_AAD, island.encode(), u64(index), mac)

    # -- 2. capture ---------------------------------------------------------------
    async def capture(self, entries: list[LogEntry]) -> Statement:
        """Extend our head by ``entries`` (oldest first, each one link), persist,
        and state it. Capturing our current head again only restates it."""
        if not entries:
            raise LogError("nothing to capture")
        self.refuse_if_frozen()  # not even a restatement: a frozen member's word belongs to the old set
        island = entries[0].island
        head = self.captured(island)
        last = entries[-1]
        if len(entries) == 1 and last.index <= head.index:
            # Captured before (our head, or a recent link of our chain): restate it.
            known = head.mac if last.index == head.index else self._recent.get(island, {}).get(last.index)
            if known is not None and hmac.compare_digest(last.mac, known):
                return self._statement(island, last.index, last.mac)
        for e in entries:
            self.authentic(e)
            if e.island != island or e.index != head.index + 1 or not hmac.compare_digest(e.prev_mac, head.mac):
                raise NotNextEntry(f"island {island}: #{e.index} does not extend this hsm-proxy's #{head.index}")
            head = e
        await self._state.persist({island: last.head()})  # group-committed with every other capture
        recent = self._recent.setdefault(island, OrderedDict())
        for e in entries:
            recent[e.index] = e.mac
        while len(recent) > RECENT_CAPTURES:
            recent.popitem(last=False)
        return self._statement(island, last.index, last.mac)

    def _statement(self, island: str, index: int, mac: bytes) -> Statement:
        return Statement(self.hsm_id, island, index, mac, self._statement_tag(self.hsm_id, island, index, mac))

    def _statement_tag(self, hsm: str, island: str, index: int, mac: bytes) -> bytes:
        # Bound to the member set's epoch: a statement made in an older set (by a
        # member left behind, say) never counts towards a quorum of a newer one.
        return self._key.mac(labels.LOG_CAPTURE_MAC, u64(self.epoch), hsm.encode(), island.encode(), u64(index), mac)

    # -- a change of the member set (membership.py) ---------------------------------------
    async def freeze(self) -> FreezeStatement:
        """Capture nothing more in this set, durably; then say, MAC'd, which
        heads this hsm-proxy froze at (what the next set takes over from)."""
        await self._state.freeze()
        heads = self._state.durable_heads()
        return FreezeStatement(self.hsm_id, self.epoch, heads,
                               freeze_tag(self._key, self.hsm_id, self.epoch, heads))

    # -- 3. release -----------------------------------------------------------------
    def committed(self, entry: LogEntry, statements: list[Statement]) -> None:
        """Raise unless a majority of the members captured exactly ``entry``."""
        self.authentic(entry)
        voters = set()
        for s in statements:
            if (s.hsm in self.members and s.island == entry.island and s.index == entry.index
                    and hmac.compare_digest(s.mac, entry.mac)
                    and hmac.compare_digest(s.tag, self._statement_tag(s.hsm, s.island, s.index, s.mac))):
                voters.add(s.hsm)
        if len(voters) < self.quorum:
            raise NoQuorum(f"island {entry.island} #{entry.index}: captured by {len(voters)} of the "
                           f"{self.quorum} hsm-proxies needed")

    def release(self, entry: LogEntry, statements: list[Statement], held: list[bytes]) -> list[bytes]:
        """The held answers of ``entry``, once a majority captured it."""
        self.committed(entry, statements)
        aad = self._held_aad(entry.island, entry.index, entry.mac)
        out = []
        for blob in held:
            try:
                out.append(self._held.decrypt(blob[:12], blob[12:], aad))
            except Exception:  # noqa: BLE001 - InvalidTag or a short blob: held for another entry
                raise LogError("this answer was not held for this entry") from None
        return out
