"""The dev fleet's admin key and the member sets it signs
(``bkv_protocol.members``). A real fleet keeps the admin key offline and
signs with ``bkv-hsm-proxy sign-members`` (docs/kubernetes.md, 'The member
set'); here it lives in the dev state dir, beside the dev issuer."""

from __future__ import annotations

from pathlib import Path

from bkv_protocol import bundle, members


def member_set_file(directory: Path, hsm_members: list[str]) -> Path:
    """A file holding ``hsm_members`` signed by the dev admin key (both made
    once; one file per set, so a chart with another replica count gets its own)."""
    key_file = directory / "admin.key"
    key = bundle.load_root_key(key_file) if key_file.exists() else bundle.new_root_key_file(key_file)
    s = members.MemberSet.of(hsm_members)
    out = directory / f"member-set-{s.digest().hex()[:16]}.json"
    if not out.exists():
        out.write_text(members.sign(s, key).to_json())
    return out


def chart_members(release: str, replicas: int) -> list[str]:
    """The hsm-proxies a chart install runs (the chart's ``bkv.hsmMembers``)."""
    full = release if ("backup-key-vault" in release or "bkv" in release) else f"{release}-bkv"
    full = full[:40].rstrip("-")
    return [f"{full}-hsm-proxy-{i}" for i in range(replicas)]
