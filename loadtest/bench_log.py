"""What the HSM-held log (bkv_hsm_proxy/log.py, issue #17) will cost per
state change, before it is wired: the island's trie work, the boundary's
apply (proofs, trie update, MAC), hold, capture (state file, fsync, group
commit) and release, at batch sizes 1, 8 and 32, against a trie of N records.

    .venv/bin/python loadtest/bench_log.py [--records 10000] [--ops 2000]

The baseline, measured in the same run: the boundary's own OPAQUE work for
one guess (``server_login_start`` on a real password file). Ratios, not
absolute times, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import opaque_ke_py as opaque

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "loadtest")]

from bench import machine  # noqa: E402
from bkv_hsm_proxy import log as hlog  # noqa: E402
from bkv_hsm_proxy.nvram import StateFile  # noqa: E402
from bkv_protocol import hsm_api as api  # noqa: E402
from bkv_protocol import merkle  # noqa: E402


def _opaque_guess_us(n: int) -> float:
    setup = opaque.server_setup()
    start = opaque.client_registration_start(b"password")
    resp = opaque.server_registration_start(setup, start.get_message(), b"user").get_message()
    upload = opaque.client_registration_finish(b"password", start.get_state(), resp).get_message()
    pf = opaque.server_registration_finish(upload).get_password_file()
    req = opaque.client_login_start(b"guess").get_message()
    t = time.perf_counter()
    for _ in range(n):
        opaque.server_login_start(setup, pf, req, b"user")
    return (time.perf_counter() - t) / n * 1e6


def _entry(v: int) -> api.Entry:
    return api.Entry(state=api.EntryState.LIVE, version=v, sealed=hashlib.sha256(b"%d" % v).digest() * 8)


async def _run(records: int, ops: int, batch: int, workdir: Path) -> dict:
    key = hlog.LogKey.from_setup(b"bench setup")
    state = StateFile(workdir / f"state-{batch}")
    state.load()
    hsm = hlog.IslandLog(key, "hsm-1", ["hsm-1"], state)
    trie, current, head = merkle.Trie(), {}, hlog.genesis(key, "bench")
    refs = [hashlib.sha256(b"user %d" % i).digest() for i in range(records)]
    # registration of every record, in big batches (not timed)
    for i in range(0, records, 256):
        changes = [hlog.Change(r, None, trie.prove(r), _entry(1)) for r in refs[i:i + 256]]
        head = hsm.apply(head, changes)
        await hsm.capture([head])
        for c in changes:
            trie.set(c.ref, hlog.entry_digest(c.new))
            current[c.ref] = c.new
    island_s = boundary_s = capture_s = 0.0
    writes0 = state.writes
    for i in range(0, ops, batch):
        picked = refs[i % records:i % records + batch]
        t0 = time.perf_counter()
        changes = [hlog.Change(r, current[r], trie.prove(r), _entry(current[r].version + 1)) for r in picked]
        t1 = time.perf_counter()
        entry = hsm.apply(head, changes)
        held = [hsm.hold(entry, b"x" * 300) for _ in changes]
        tc = time.perf_counter()
        stmt = await hsm.capture([entry])
        capture_s += time.perf_counter() - tc
        hsm.release(entry, [stmt], held)
        t2 = time.perf_counter()
        for c in changes:
            trie.set(c.ref, hlog.entry_digest(c.new))
            current[c.ref] = c.new
        assert trie.root() == entry.root
        t3 = time.perf_counter()
        head = entry
        island_s += (t1 - t0) + (t3 - t2)
        boundary_s += t2 - t1
    return {"batch": batch, "island_us_per_op": island_s / ops * 1e6, "boundary_us_per_op": boundary_s / ops * 1e6,
            "capture_us_per_op": capture_s / ops * 1e6,
            "state_writes_per_op": (state.writes - writes0) / ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--ops", type=int, default=2_000)
    args = ap.parse_args()
    print(machine())
    base = _opaque_guess_us(300)
    print(f"baseline: OPAQUE server_login_start {base:.0f} us per guess (the boundary's own work)")
    with tempfile.TemporaryDirectory() as d:
        for batch in (1, 8, 32):
            r = asyncio.run(_run(args.records, args.ops, batch, Path(d)))
            print(f"batch {batch:>2}: boundary {r['boundary_us_per_op']:6.0f} us/op "
                  f"(x{r['boundary_us_per_op'] / base:.2f} of the OPAQUE step; of it capture with fsync "
                  f"{r['capture_us_per_op']:.0f}), island {r['island_us_per_op']:5.0f} "
                  f"us/op, state-file writes {r['state_writes_per_op']:.3f}/op")


if __name__ == "__main__":
    main()
