"""The dev fleet's admin key and the member sets and island sets it signs
(``bkv_protocol.members``, ``bkv_protocol.islands``). A real fleet keeps the
admin key offline and signs with ``bkv-hsm-proxy sign-members`` and
``sign-islands`` (docs/kubernetes.md, 'The member set', 'The island set');
here it lives in the dev state dir, beside the dev issuer."""

from __future__ import annotations

from pathlib import Path

from bkv_protocol import bundle, islands, members


def admin_key(directory: Path) -> bundle.RootKey:
    """The dev admin key (made once)."""
    key_file = directory / "admin.key"
    return bundle.load_root_key(key_file) if key_file.exists() else bundle.new_root_key_file(key_file)


def member_set_file(directory: Path, hsm_members: list[str]) -> Path:
    """A file holding ``hsm_members`` signed by the dev admin key (both made
    once; one file per set, so a chart with another replica count gets its own)."""
    key = admin_key(directory)
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


def island_set_file(directory: Path, s: islands.IslandSet) -> Path:
    """A file holding the island set ``s`` signed by the dev admin key (one
    file per set; made once)."""
    out = directory / f"island-set-{s.epoch}-{s.digest().hex()[:16]}.json"
    if not out.exists():
        out.write_text(islands.sign(s, admin_key(directory)).to_json())
    return out


def first_island_set_file(directory: Path, island_ids: list[str]) -> Path:
    """The fleet's first island set (epoch 1), fixed the first time it is
    asked for: later calls return that file whatever ``island_ids`` are now
    (islands added since are in later sets, stored by add-island)."""
    fixed = directory / "island-set-first"
    if fixed.exists():
        return directory / fixed.read_text().strip()
    out = island_set_file(directory, islands.IslandSet.of(island_ids))
    fixed.write_text(out.name + "\n")
    return out


def migration_files(directory: Path, current: islands.IslandSet, new_island: str) -> tuple[Path, Path]:
    """The two signed sets adding ``new_island`` to ``current`` (``bkv-island add-island --island-sets``)."""
    moving, final = islands.migration(current, new_island)
    return island_set_file(directory, moving), island_set_file(directory, final)
