"""``bkv audit``: anyone can check a chain of validation bundles against the
witness log (docs/ota.md). Every failure names what is wrong."""

from __future__ import annotations

from bkv_protocol import bundle as bd


class AuditFailed(Exception):
    pass


def audit(bundles: list[str], witness_log: list[str], operator_root: bytes, witness_root: bytes,
          evidence: list[str] = ()) -> list[str]:
    """Check that the published bundles and the witness log are each a valid
    chain signed by both roots, that every published bundle is in the log
    byte for byte, and that every evidence statement is signed by its fleet
    key and the operator, attests its keys, and matches the bundle it names.
    Returns lines of findings; raises :class:`AuditFailed`."""
    chain = _chain("published", bundles, operator_root, witness_root)
    log = _chain("witness log", witness_log, operator_root, witness_root)
    by_seq = {s.bundle.sequence: s for s in log}
    for s in chain:
        logged = by_seq.get(s.bundle.sequence)
        if logged is None or logged.to_json() != s.to_json():
            raise AuditFailed(f"bundle {s.bundle.sequence} is not in the witness log as published")
    for i, text in enumerate(evidence):
        _check_evidence(i + 1, text, by_seq, operator_root)
    return [f"{len(chain)} published bundle(s), {len(log)} in the witness log: both chains verify, "
            f"every published bundle is in the log"] + \
        ([f"{len(evidence)} evidence statement(s) verify and match the log"] if evidence else [])


def _check_evidence(n: int, text: str, by_seq: dict, operator_root: bytes) -> None:
    from bkv_protocol import evidence as ev
    from bkv_protocol.encoding import b64e

    try:
        e = ev.Evidence.from_json(text)
        ev.verify(e, operator_root)
    except ev.EvidenceError as exc:
        raise AuditFailed(f"evidence {n}: {exc}") from None
    if text.removesuffix("\n") != e.to_json():
        raise AuditFailed(f"evidence {n}: not in canonical form (altered?)")
    st = e.statement
    logged = by_seq.get(st.get("bundle_sequence"))
    if logged is None or bd.bundle_hash(logged.bundle).hex() != st.get("bundle_hash"):
        raise AuditFailed(f"evidence {n}: names a bundle that is not in the witness log")
    fleet = next((f for f in logged.bundle.fleets if f.fleet_id == st.get("fleet_id")), None)
    if fleet is None or b64e(fleet.fleet_public_key) != st.get("fleet_public_key") \
            or b64e(fleet.edge_public_key) != st.get("edge_public_key"):
        raise AuditFailed(f"evidence {n}: its keys are not the ones the bundle lists")


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
