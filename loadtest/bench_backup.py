"""Backup encryption/decryption throughput against `age`, same file, same run.

    apt-get install age && .venv/bin/python loadtest/bench_backup.py [--mib 1024]

Times `bkv`'s create_backup and restore_backup (local store) and
`age -e -r` / `age -d -i` (X25519 recipient) on one random file, each in a
child process so peak RSS can be read from getrusage. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtest"))


def timed(argv: list[str], **kw) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024  # ru_maxrss of children is the max over all of them


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    if not shutil.which("age"):
        print("age is not installed: apt-get install age", file=sys.stderr)
        return 2
    from bench import machine

    with tempfile.TemporaryDirectory(prefix="bkv-bench-backup-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        t = Path(tmp)
        src = t / "data.bin"
        with open(src, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        key_hex = os.urandom(32).hex()
        bkv_enc = ("import os,sys; from pathlib import Path; from bkv.storage import create_backup; "
                   "from bkv_protocol.secrets import BackupKey; "
                   f"create_backup(Path({str(src)!r}), {str(t / 'store')!r}, BackupKey(bytes.fromhex({key_hex!r})))")
        bkv_dec = ("from pathlib import Path; from bkv.storage import restore_backup; "
                   "from bkv_protocol.secrets import BackupKey; "
                   f"restore_backup({str(t / 'store')!r}, Path({str(t / 'out')!r}), BackupKey(bytes.fromhex({key_hex!r})))")
        rows = []
        # age first: the RSS read from RUSAGE_CHILDREN is a running max, so measure the smaller first.
        subprocess.run(["age-keygen", "-o", str(t / "age.key")], check=True, capture_output=True)
        recipient = [line.split(": ")[1] for line in (t / "age.key").read_text().splitlines()
                     if line.startswith("# public key")][0]
        rows.append(("age encrypt", *timed(["age", "-e", "-r", recipient, "-o", str(t / "data.age"), str(src)])))
        rows.append(("age decrypt", *timed(["age", "-d", "-i", str(t / "age.key"), "-o", str(t / "data.out"),
                                            str(t / "data.age")])))
        (t / "data.age").unlink()
        (t / "data.out").unlink()
        rows.append(("bkv backup", *timed([sys.executable, "-c", bkv_enc])))
        rows.append(("bkv restore", *timed([sys.executable, "-c", bkv_dec])))
        assert (t / "out" / "data.bin").stat().st_size == src.stat().st_size
    m = machine()
    print(f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['date']}; {args.mib} MiB file "
          "on local disk (includes reading and writing it).\n")
    print("| operation | seconds | MiB/s | peak RSS so far, MiB |\n|---|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.2f} | {args.mib / wall:.0f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
