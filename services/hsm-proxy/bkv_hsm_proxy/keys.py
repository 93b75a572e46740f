"""The token's key generations (fleets, docs/ota.md) and what the boundary
does with their keys: the OPAQUE server setup sealed in the token, records
and transient blobs (challenges, login states, change tickets) sealed and
opened, answers kept for resends sealed, answers signed: every use of the
fleet keys (``hsm.py``). Nothing here decides anything about a record.

A token may hold several fleets: each request names the fleet the client
pinned (``fleet_id``; none means the oldest), which signs the answer; a
record opens with the keys of the fleet that sealed it.
"""

from __future__ import annotations

import contextlib

import opaque_ke_py as opaque

from bkv_hsm_proxy import errors
from bkv_hsm_proxy.hsm import OPAQUE_SETUP_LABEL, HsmBackend, generation_label
from bkv_hsm_proxy.records import Record
from bkv_protocol import hsm_api as api
from bkv_protocol import labels
from bkv_protocol.encoding import canonical, fleet_id_for, u64


def record_aad(ref: str, island: str, version: int, fleet_id: str) -> bytes:
    """Binds the user (by ref, so records can be moved knowing only their
    keys), the island, the version and the sealing fleet."""
    return canonical(labels.RECORD_AAD, bytes.fromhex(ref), island.encode(), u64(version), fleet_id.encode())


def _setup_aad_for(fleet_id: str) -> bytes:
    return canonical(labels.OPAQUE_SETUP_AAD, fleet_id.encode())


def open_setup(hsm, gen: int) -> bytes:
    sealed_setup = hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, gen))
    if sealed_setup is None:
        raise errors.HsmKeyMissing("no OPAQUE server setup in the token; run fleet-init")
    try:
        return hsm.unseal(_setup_aad_for(fleet_id_for(hsm.public_key_der(gen))), sealed_setup, gen)
    except errors.HsmAuthTagMismatch:
        raise errors.HsmError("the sealed OPAQUE setup does not open with this token's key") from None


def create_opaque_setup(hsm, gen: int = 0) -> None:
    """Store the OPAQUE server setup sealed under generation ``gen``: a new
    setup for the first fleet; for a later one, the same setup re-sealed
    inside the boundary (registrations stay valid across fleets)."""
    if hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, gen)) is not None:
        return
    older = [g for g in hsm.generations() if g != gen and
             hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, g)) is not None]
    setup = open_setup(hsm, max(older)) if older else opaque.server_setup().to_bytes()
    fleet_id = fleet_id_for(hsm.public_key_der(gen))
    hsm.store_blob(generation_label(OPAQUE_SETUP_LABEL, gen),
                   hsm.seal(_setup_aad_for(fleet_id), setup, gen))


class Keys:
    """The token's fleets, and sealing and signing under them."""

    def __init__(self, hsm: HsmBackend) -> None:
        self._hsm = hsm
        self._fleets: dict[str, int] = {}  # fleet id -> key generation
        self._reload()

    def _reload(self) -> None:
        gens = self._hsm.generations()
        if not gens:
            raise errors.HsmKeyMissing("no fleet keys in the token; run fleet-init")
        self._fleets = {fleet_id_for(self._hsm.public_key_der(g)): g for g in gens}
        # The oldest fleet answers requests that name none (clients from before rotation).
        self.fleet_id = min(self._fleets, key=self._fleets.get)
        self.public_key_der = self._hsm.public_key_der(self._fleets[self.fleet_id])

    def __repr__(self) -> str:
        return f"Keys(fleets={sorted(self._fleets)})"

    def fleets(self) -> dict[str, int]:
        return dict(self._fleets)

    @contextlib.contextmanager
    def _fleet_may_be_gone(self, gen: int):
        """A fleet retired by another process has no keys any more: say so
        plainly (UnknownFleet) instead of failing as an unavailable HSM."""
        try:
            yield
        except errors.HsmKeyMissing:
            self._hsm.forget(gen)
            self._reload()
            if gen not in self._fleets.values():
                raise errors.UnknownFleet("this fleet was retired; fetch the current validation bundle") from None
            raise

    def gen(self, fleet_id: str | None) -> int:
        """The key generation of a fleet; an unknown one may be new in the
        token (rotation), so look once more before refusing."""
        if fleet_id is None:
            return self._fleets[self.fleet_id]
        if fleet_id not in self._fleets:
            self._reload()
            if fleet_id not in self._fleets:
                raise errors.UnknownFleet(f"this vault has no fleet {fleet_id}")
        return self._fleets[fleet_id]

    def sign(self, fleet: str | None, transcript) -> bytes:
        """``transcript(signing fleet id)``: one of ``bkv_protocol.transcripts``."""
        gen = self.gen(fleet)
        with self._fleet_may_be_gone(gen):
            return self._hsm.sign(transcript(fleet or self.fleet_id), gen)

    def seal_transient(self, fleet: str | None, label: bytes, uid: bytes, island: str, data: bytes) -> bytes:
        """Challenges and login states: sealed by the fleet the client talks to."""
        gen = self.gen(fleet)
        with self._fleet_may_be_gone(gen):
            return self._hsm.seal(canonical(label, uid, island.encode(), (fleet or self.fleet_id).encode()), data,
                                  gen)

    def unseal_transient(self, fleet: str | None, label: bytes, uid: bytes, island: str, blob: bytes) -> bytes:
        gen = self.gen(fleet)
        with self._fleet_may_be_gone(gen):
            return self._hsm.unseal(canonical(label, uid, island.encode(), (fleet or self.fleet_id).encode()),
                                    blob, gen)

    def seal_reply(self, aad: bytes, body: bytes, fleet: str | None) -> bytes:
        """An answer kept for resends (``transcripts.reply_aad``), by the fleet that sealed its record."""
        return self._hsm.seal(aad, body, self.gen(fleet or self.fleet_id))

    def open_reply(self, aad: bytes, sealed: bytes, fleet: str | None) -> bytes:
        return self._hsm.unseal(aad, sealed, self.gen(fleet or self.fleet_id))

    def open_record(self, ref: str, island: str, entry: api.Entry) -> Record:
        if entry.state is api.EntryState.ABSENT:
            raise errors.BadRequest("no record")
        if entry.state is api.EntryState.DESTROYED or entry.sealed is None:
            raise errors.RecordDestroyed("record destroyed")
        sealer = entry.fleet_id or self.fleet_id
        try:
            gen = self.gen(sealer)
        except errors.UnknownFleet:
            raise errors.RecordIntegrityFailure("the record was sealed by a fleet this vault no longer has") from None
        try:
            return Record.unpack(self._hsm.unseal(record_aad(ref, island, entry.version, sealer), entry.sealed, gen))
        except (errors.HsmAuthTagMismatch, ValueError):
            # Swapped, rolled to another island, or tampered with: refuse, say nothing.
            raise errors.RecordIntegrityFailure("the sealed record does not open for this user") from None

    def seal_record(self, ref: str, island: str, version: int, record: Record, fleet: str | None) -> api.Entry:
        fleet_id = fleet or self.fleet_id
        sealed = self._hsm.seal(record_aad(ref, island, version, fleet_id), record.pack(), self.gen(fleet_id))
        return api.Entry(state=api.EntryState.LIVE, version=version, sealed=sealed, fleet_id=fleet_id)
