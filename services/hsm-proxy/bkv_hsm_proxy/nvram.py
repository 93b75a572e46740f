"""The hsm-proxy's small persistent state: per island, the newest log head it
captured (a stand-in for HSM NVRAM).

Why: etcd and the islands are untrusted and may roll back or fork an island's
log. The hsm-proxy remembers, per island, the ``(index, mac, root)`` of the
newest log entry it emitted, in a file only it writes, and answers a request
only after the head that request produced is on disk. After a restart it
therefore never accepts an older log than one whose effects a client may
have seen.

Rules this file keeps:

- Heads never go backwards: ``persist`` refuses (``HeadRegression``) a lower
  index than the newest head accepted for that island (on disk or pending),
  and the same index with a different mac or root (a fork).
- Writes are atomic: temp file in the same directory, fsync, rename over,
  fsync the directory. A failed write leaves the previous file intact.
- Group commit: callers await ``persist``; while one write runs (in a thread,
  since fsync blocks), later updates gather and go out together in the next
  single write. A caller returns once a write containing its head (or a newer
  one for the same island) is durable.
- A missing file is an empty state (first start); an unreadable one is an
  error (``StateFileCorrupt``), never silently empty: forgetting heads is a
  rollback. The file carries a SHA-256 checksum so a flipped digit in an
  index cannot pass as a valid older head.

- *Frozen* (``freeze``): for a change of the member set
  (``bkv_hsm_proxy.membership``) the file says this hsm-proxy captures
  nothing more in its set, durably, before it says which heads it froze at.

- *Born* once: the identity carries a random birth id, so a file made again
  (after one was lost) is told from the one that served, even though it
  names the same hsm-proxy and set (``membership.check_born``).

File (JSON, canonical: sorted keys, no spaces; ``fleet`` is the ``Identity``)::

    {"fleet": "...", "format": 3, "frozen": false,
     "heads": {"<island>": {"index": 7, "mac": "<64 hex>", "root": "<64 hex>"}},
     "sha256": "<hex of SHA-256 over the same object without this field>"}
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Head", "StateFile", "StateFileError", "StateFileCorrupt", "FleetMismatch",
           "HeadRegression", "StateWriteFailed", "FORMAT", "Identity", "init_state", "open_state", "hold",
           "StateFileBusy", "new_born", "upgrade_state"]

FORMAT = 3  # 2: the frozen flag; 3: the identity's birth id
BORN_BYTES = 16


class StateFileError(Exception):
    """The state file cannot be used; the hsm-proxy must not start."""


class StateFileCorrupt(StateFileError):
    pass


class FleetMismatch(StateFileError):
    """The file belongs to another fleet."""


class StateFileBusy(StateFileError):
    """Another process (a serving hsm-proxy) holds the state file."""


def hold(path: str | os.PathLike[str]) -> int:
    """Take the state file's lock (``<file>.lock``, flock) for as long as the
    returned descriptor stays open: one writer, so ``change-members`` cannot
    replace a file under a running hsm-proxy, nor two of them serve on one."""
    import fcntl

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p.with_name(p.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateFileBusy(f"{p} is in use by another process (a running hsm-proxy? stop it first)") from None
    return fd


class HeadRegression(ValueError):
    """An update would move an island's head backwards or fork it."""


class StateWriteFailed(OSError):
    """The write carrying this caller's update failed; ``__cause__`` says why.
    The update may still reach disk with a later write."""


@dataclass(frozen=True, slots=True)
class Head:
    index: int
    mac: bytes
    root: bytes

    def __post_init__(self) -> None:
        if type(self.index) is not int or self.index < 0:
            raise ValueError("index must be a non-negative int")
        for name in ("mac", "root"):
            v = getattr(self, name)
            if type(v) is not bytes or len(v) != 32:
                raise ValueError(f"{name} must be 32 bytes")

    def __repr__(self) -> str:
        return f"Head(index={self.index}, mac={self.mac.hex()[:12]}.., root={self.root.hex()[:12]}..)"


def _canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _encode(fleet: str, heads: dict[str, Head], frozen: bool = False) -> bytes:
    body = {"format": FORMAT, "fleet": fleet, "frozen": frozen, "heads": {
        i: {"index": h.index, "mac": h.mac.hex(), "root": h.root.hex()} for i, h in heads.items()}}
    body["sha256"] = hashlib.sha256(_canonical_json(body)).hexdigest()
    return _canonical_json(body) + b"\n"


def _hex32(v: object) -> bytes:
    if type(v) is not str or len(v) != 64 or v != v.lower():
        raise ValueError("not 64 lowercase hex digits")
    return bytes.fromhex(v)


def _decode(data: bytes, fmt: int = FORMAT) -> tuple[str, dict[str, Head], bool]:
    """Strict: anything but a file this module wrote (in format ``fmt``) raises StateFileCorrupt."""
    try:
        obj = json.loads(data)
        if type(obj) is dict and type(obj.get("format")) is int and obj["format"] != fmt:
            raise ValueError(f"format {obj['format']}, " + (_OLDER if obj["format"] < fmt else f"expected {fmt}"))
        if type(obj) is not dict or set(obj) != {"format", "fleet", "frozen", "heads", "sha256"}:
            raise ValueError("unexpected fields")
        check = obj.pop("sha256")
        if check != hashlib.sha256(_canonical_json(obj)).hexdigest():
            raise ValueError("checksum mismatch")
        if type(obj["fleet"]) is not str or type(obj["heads"]) is not dict or type(obj["frozen"]) is not bool:
            raise ValueError("bad fleet, heads or frozen flag")
        heads = {}
        for island, h in obj["heads"].items():
            if type(h) is not dict or set(h) != {"index", "mac", "root"}:
                raise ValueError(f"bad head for {island!r}")
            heads[island] = Head(h["index"], _hex32(h["mac"]), _hex32(h["root"]))
        return obj["fleet"], heads, obj["frozen"]
    except (ValueError, TypeError, KeyError, RecursionError) as e:  # JSON/Unicode errors are ValueErrors
        raise StateFileCorrupt(f"state file unreadable: {e}") from e


_OLDER = (f"made by an older build (this one reads format {FORMAT}: a birth id in the identity, docs/protocol.md, "
          "'State file'); `serve` and `start` upgrade a format-2 file, older ones are made again")


class StateFile:
    """Per-island log heads, persisted with group commit. One writer: only
    this object (in one process) may write ``path``."""

    def __init__(self, path: str | os.PathLike[str], fleet: str = "") -> None:
        self.path = Path(path)
        self.fleet = fleet
        self._loaded = False
        self._durable: dict[str, Head] = {}  # what the file holds
        self._newest: dict[str, Head] = {}   # accepted by persist: durable or pending
        self.frozen = False                  # accepted by freeze (durable once freeze returns)
        self._next: asyncio.Future[None] | None = None  # the write the next callers join
        self._writer: asyncio.Task[None] | None = None
        # For metrics.
        self.persist_calls = 0
        self.writes = 0           # successful file writes
        self.write_failures = 0
        self.heads_written = 0    # heads that changed, summed over writes
        self.waiting = 0          # callers waiting for a write now

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.tmp")

    def load(self) -> None:
        """Read the file (missing = empty). Raises StateFileCorrupt or FleetMismatch."""
        if self._writer is not None and not self._writer.done():
            raise RuntimeError("load() while a write is in flight")
        frozen = False
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            heads: dict[str, Head] = {}
        else:
            fleet, heads, frozen = _decode(data)
            if fleet != self.fleet:
                raise FleetMismatch(f"state file {self.path} is for fleet {fleet!r}, not {self.fleet!r}")
        self._durable, self._newest, self._loaded, self.frozen = heads, dict(heads), True, frozen

    def heads(self) -> dict[str, Head]:
        """The newest head accepted per island: on disk, or being written.
        (They differ only while a write is pending, or after one failed.)"""
        return dict(self._newest)

    def head(self, island: str) -> Head | None:
        return self._newest.get(island)

    def durable_heads(self) -> dict[str, Head]:
        """The heads the file holds."""
        return dict(self._durable)

    async def persist(self, updates: dict[str, Head]) -> None:
        """Return once every update (or a newer head for its island) is on
        disk. Raises HeadRegression (nothing applied) or StateWriteFailed."""
        if not self._loaded:
            raise RuntimeError("load() the state file before persisting")
        self.persist_calls += 1
        for island, h in updates.items():
            if type(island) is not str or not isinstance(h, Head):
                raise TypeError("updates map island ids (str) to Heads")
            cur = self._newest.get(island)
            if cur is not None and (h.index < cur.index or (h.index == cur.index and h != cur)):
                raise HeadRegression(f"island {island!r}: {h!r} does not extend {cur!r}")
        self._newest.update(updates)
        if all(island in self._durable and self._durable[island].index >= h.index
               for island, h in updates.items()):
            return  # already on disk (a repeat)
        await self._written()

    async def freeze(self) -> None:
        """Return once the file says frozen (for good: nothing unfreezes a
        file; the next member set comes with a new file)."""
        if not self._loaded:
            raise RuntimeError("load() the state file before freezing")
        self.frozen = True
        await self._written()

    async def _written(self) -> None:
        """Join the next write (starting one if none runs) and wait for it."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop())
        self.waiting += 1
        try:
            await asyncio.shield(fut)  # a cancelled caller must not cancel the shared write
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise StateWriteFailed(f"writing {self.path} failed: {e}") from e
        finally:
            self.waiting -= 1

    async def _write_loop(self) -> None:
        while self._next is not None:
            fut, self._next = self._next, None
            snapshot, frozen = dict(self._newest), self.frozen  # everything accepted so far
            try:
                await asyncio.to_thread(self._write_file, snapshot, frozen)
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception as e:
                self.write_failures += 1
                fut.set_exception(e)
                fut.exception()  # retrieved: no "never retrieved" noise if every caller left
            else:
                self.writes += 1
                self.heads_written += sum(self._durable.get(i) != h for i, h in snapshot.items())
                self._durable = snapshot
                fut.set_result(None)

    def _write_file(self, heads: dict[str, Head], frozen: bool = False) -> None:
        # A temp file left by a crash is simply truncated here; load() leaves it
        # alone, so reading the state (e.g. from a tool) never disturbs a write.
        data, tmp = _encode(self.fleet, heads, frozen), self._tmp
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask, and if a stale temp file had another mode
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)  # the rename itself durable
        finally:
            os.close(dfd)


# -- the file as the hsm-proxy uses it ---------------------------------------------------
def new_born() -> bytes:
    return os.urandom(BORN_BYTES)


@dataclass(frozen=True)
class Identity:
    """Which hsm-proxy this file belongs to, and the admin-signed member set
    (``bkv_protocol.members``) it serves in, named by its digest: the token
    must hold that very set for ``serve`` to start (membership.check_members).
    ``born``: this file's random birth id, new whenever a file is made; the
    token keeps the one that first served per hsm-proxy and epoch
    (membership.check_born). Not part of equality: two files of one
    hsm-proxy in one set are the same identity, made at different times."""

    hsm: str
    members: tuple[str, ...]
    epoch: int
    set_digest: bytes
    born: bytes = field(default_factory=new_born, compare=False)

    def __post_init__(self) -> None:
        if self.hsm not in self.members or len(set(self.members)) != len(self.members) or not all(self.members):
            raise ValueError("the member set must list every hsm-proxy once, this one included")
        if type(self.epoch) is not int or self.epoch < 1 or type(self.set_digest) is not bytes \
                or len(self.set_digest) != 32 or type(self.born) is not bytes or len(self.born) != BORN_BYTES:
            raise ValueError(f"an epoch from 1, a 32-byte set digest and a {BORN_BYTES}-byte birth id")

    def encode(self) -> str:
        return json.dumps({"hsm": self.hsm, "members": list(self.members), "epoch": self.epoch,
                           "set": self.set_digest.hex(), "born": self.born.hex()}, sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> Identity:
        obj = json.loads(text)
        if type(obj) is not dict or set(obj) != {"hsm", "members", "epoch", "set", "born"} \
                or type(obj["members"]) is not list or type(obj["born"]) is not str \
                or len(obj["born"]) != 2 * BORN_BYTES or obj["born"] != obj["born"].lower():
            raise ValueError("not this build's identity (re-make the state file from a signed member set)")
        return cls(obj["hsm"], tuple(obj["members"]), obj["epoch"], _hex32(obj["set"]), bytes.fromhex(obj["born"]))


def init_state(path: str | os.PathLike[str], hsm_id: str, member_set) -> Identity:
    """Create the state file: no heads yet, a new birth id, and the member set
    (a ``bkv_protocol.members.MemberSet``) this hsm-proxy serves in. The set's
    signature and the birth id are checked against the token by ``serve``,
    not here (no PIN)."""
    if member_set.heads:
        raise ValueError("this set takes over from a running log (epoch > 1): a state file starts at genesis")
    p = Path(path)
    if p.exists():
        raise StateFileError(f"{p} exists: a state file is never replaced (that would roll the HSM back)")
    if hsm_id not in member_set.members:
        raise ValueError(f"{hsm_id} is not one of the member set's hsm-proxies ({','.join(member_set.members)})")
    identity = Identity(hsm_id, member_set.members, member_set.epoch, member_set.digest())
    state = StateFile(p, identity.encode())
    p.parent.mkdir(parents=True, exist_ok=True)
    state._write_file({})  # noqa: SLF001 - the first write, before any caller
    return identity


def upgrade_state(path: str | os.PathLike[str]) -> bool:
    """Rewrite a format-2 file (no birth id) as this format, with its heads
    and frozen flag and a new birth id; True if it did. Only under the state
    file's lock (``hold``), by the process that will serve on it: the token
    keeps that birth id at its first serve, as for any file not yet served
    on (``membership.check_born``). Anything but an intact format-2 file is
    left for ``open_state`` to judge."""
    p = Path(path)
    try:
        data = p.read_bytes()
        if json.loads(data).get("format") != 2:
            return False
        fleet, heads, frozen = _decode(data, 2)
        old = json.loads(fleet)
        if type(old) is not dict or set(old) != {"hsm", "members", "epoch", "set"}:
            return False
        identity = Identity.decode(json.dumps({**old, "born": new_born().hex()}))
    except (OSError, ValueError, AttributeError, StateFileCorrupt):
        return False
    StateFile(p, identity.encode())._write_file(heads, frozen)  # noqa: SLF001 - atomic replace, under the lock
    return True


def open_state(path: str | os.PathLike[str]) -> tuple[StateFile, Identity]:
    """The state file and this hsm-proxy's identity; a missing file is refused."""
    p = Path(path)
    if not p.exists():
        raise StateFileError(f"no state file at {p}: run `bkv-hsm-proxy init-state` once; if it was lost, "
                             "this hsm-proxy was rolled back (docs/reliability.md, 'Restoring etcd')")
    try:
        identity = Identity.decode(_decode(p.read_bytes())[0])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFileCorrupt(f"{p}: the hsm-proxy's identity does not parse: {exc}") from None
    state = StateFile(p, identity.encode())
    state.load()
    return state, identity
