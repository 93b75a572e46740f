"""``bkv audit``: anyone can check a chain of validation bundles against the
witness log (docs/ota.md). Every failure names what is wrong."""

from __future__ import annotations

from bkv_common import bundle as bd


class AuditFailed(Exception):
    pass


def audit(bundles: list[str], witness_log: list[str], operator_root: bytes, witness_root: bytes) -> list[str]:
    """Check that the published bundles and the witness log are each a valid
    chain signed by both roots, and that every published bundle is in the log
    byte for byte. Returns lines of findings; raises :class:`AuditFailed`."""
    chain = _chain("published", bundles, operator_root, witness_root)
    log = _chain("witness log", witness_log, operator_root, witness_root)
    by_seq = {s.bundle.sequence: s for s in log}
    for s in chain:
        logged = by_seq.get(s.bundle.sequence)
        if logged is None or logged.to_json() != s.to_json():
            raise AuditFailed(f"bundle {s.bundle.sequence} is not in the witness log as published")
    return [f"{len(chain)} published bundle(s), {len(log)} in the witness log: both chains verify, "
            f"every published bundle is in the log"]


def _chain(what: str, texts: list[str], operator_root: bytes, witness_root: bytes) -> list[bd.SignedBundle]:
    out: list[bd.SignedBundle] = []
    for i, text in enumerate(texts):
        try:
            s = bd.SignedBundle.from_json(text)
            bd.verify(s, operator_root, witness_root)
        except bd.BundleError as exc:
            raise AuditFailed(f"{what}, entry {i + 1}: {exc}") from None
        # Byte-exact: published bundles and log entries are the canonical JSON,
        # so not even a byte the signatures do not cover can change unnoticed.
        if text.removesuffix("\n") != s.to_json():
            raise AuditFailed(f"{what}, entry {i + 1}: not in canonical form (altered?)")
        out.append(s)
    out.sort(key=lambda s: s.bundle.sequence)
    for prev, cur in zip(out, out[1:]):
        if cur.bundle.sequence != prev.bundle.sequence + 1 or cur.bundle.prev_hash != bd.bundle_hash(prev.bundle):
            raise AuditFailed(f"{what}: bundle {cur.bundle.sequence} does not follow bundle {prev.bundle.sequence}")
    if what == "witness log" and out and out[0].bundle.sequence != 1:
        raise AuditFailed("witness log: it does not start at bundle 1")
    return out
