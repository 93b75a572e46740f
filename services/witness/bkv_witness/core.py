"""The witness's rules (the Cloudflare role in Meta's 2025 design).

It countersigns a bundle only if the operator signed it and it extends the
log: sequence = last + 1 and prev_hash = hash of the last logged bundle.
So the operator cannot show two different bundles with the same sequence
(a fork) to different clients: the witness refuses the second, and anyone
can read the log to see every bundle that was ever valid.

Time only moves forward in the log: a bundle's ``issued_at`` is never below
the last one's and never more than ``MAX_CLOCK_SKEW_S`` ahead of the
witness's clock, so nobody -- not even a thief of the operator key -- can get
a bundle countersigned that stays fresh for clients longer than the operator
meant (bundles carry a freshness window, docs/ota.md).

Its exceptions are in ``bkv_witness.errors``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bkv_protocol import bundle as bd
from bkv_witness.errors import WitnessRefused


MAX_CLOCK_SKEW_S = 600


class Witness:
    def __init__(self, key: bd.RootKey, operator_root: bytes, log_path: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock
        self._operator_root = operator_root
        self._log_path = log_path
        self._lock = threading.Lock()
        self._entries: list[bd.SignedBundle] = []
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                if line.strip():
                    self._entries.append(bd.SignedBundle.from_json(line))

    @property
    def public_key(self) -> bytes:
        return self._key.public

    def log(self) -> list[str]:
        return [e.to_json() for e in self._entries]

    def countersign(self, signed: bd.SignedBundle) -> bd.SignedBundle:
        try:
            bd.verify_operator(signed, self._operator_root)
        except bd.BundleError as exc:
            raise WitnessRefused(f"not countersigned: {exc}") from None
        with self._lock:
            last = self._entries[-1] if self._entries else None
            seq = signed.bundle.sequence
            if last is not None and seq <= last.bundle.sequence:
                logged = self._entries[seq - 1]
                if logged.bundle == signed.bundle and logged.operator_signature == signed.operator_signature:
                    return logged  # the same bundle again: the same answer
                raise WitnessRefused(f"not countersigned: the log already holds a different bundle {seq} (a fork)")
            want = last.bundle.sequence + 1 if last else 1
            prev = bd.bundle_hash(last.bundle) if last else bd.GENESIS
            if seq != want or signed.bundle.prev_hash != prev:
                raise WitnessRefused(f"not countersigned: bundle {seq} does not extend the log "
                                     f"(next is {want}, after hash {prev.hex()[:16]}...)")
            if last is not None and signed.bundle.issued_at < last.bundle.issued_at:
                raise WitnessRefused(f"not countersigned: bundle {seq} is issued before bundle {seq - 1}")
            if signed.bundle.issued_at > self._clock() + MAX_CLOCK_SKEW_S:
                raise WitnessRefused(f"not countersigned: bundle {seq} is issued in the future "
                                     f"(more than {MAX_CLOCK_SKEW_S} s ahead of the witness's clock)")
            out = signed.with_witness(bd.witness_countersign(signed, self._key))
            # Logged durably before the countersignature leaves.
            with open(self._log_path, "a") as f:
                f.write(out.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._entries.append(out)
            return out
