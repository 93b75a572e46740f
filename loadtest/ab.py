"""A/B of server CPU across commits, alternated in one sitting.

    .venv/bin/python loadtest/ab.py --rounds 3 6ff3a88 HEAD~1 HEAD -- hotpath --ops 400
    .venv/bin/python loadtest/ab.py --rounds 2 HEAD~1 HEAD -- bench --plaintext --duration 15 \\
        --scenarios guess,recovery --no-half --users 4

Each commit is checked out into a worktree of its own (``git worktree add
--detach``, removed at the end) and run from its own sources through
``PYTHONPATH`` in this venv, so only the code differs. Rounds alternate the
commits (A B C A B C ...): a machine that gets busier or quieter in the
middle moves every commit alike. Prints, per commit and measurement, the
median server CPU per operation, every run's figure, the median per
process and the ratio to the first commit. Read ratios, not milliseconds,
on a shared machine; say what else ran.

``hotpath`` runs loadtest/hotpath.py (guesses at concurrency 1 and 8, no
Locust); ``bench`` runs loadtest/bench.py (Locust scenarios) and reads its
bench.json; ``flood`` runs this tree's loadtest/flood.py (a guess flood at
dead accounts) against each commit's sources.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["protocol/src", "client/src", "src", "services/frontend", "services/vault-island",
           "services/hsm-proxy", "services/edge", "services/witness"]
HOTPATH_LINE = re.compile(r"concurrency (\d+): .*?server ([\d.]+) ms/op (\{.*\})")
FLOOD_LINE = re.compile(r"flood (\w+): .*?server ([\d.]+) ms/req (\{.*\})")


def process_kind(name: str) -> str:
    """island-a-0 -> island, hsm-proxy0 -> hsm-proxy, etcd0 -> etcd."""
    return "island" if name.startswith("island") else re.sub(r"-?\d+$", "", name)


def by_kind(by_process: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, ms in by_process.items():
        out[process_kind(name)] += ms
    return dict(out)


def run_one(tree: Path, tool: str, args: list[str], out_dir: Path) -> list[tuple[str, float, dict[str, float]]]:
    """(measurement, server ms per op, ms per op by process kind) of one run."""
    env = {**os.environ, "PYTHONPATH": ":".join(str(tree / s) for s in SOURCES)}
    if tool == "hotpath":
        proc = subprocess.run([sys.executable, "loadtest/hotpath.py", *args], cwd=tree, env=env, text=True,
                              capture_output=True, timeout=1800)
        found = [(f"guess, concurrency {m.group(1)}", float(m.group(2)), by_kind(eval_dict(m.group(3))))
                 for m in map(HOTPATH_LINE.search, proc.stdout.splitlines()) if m]
    elif tool == "flood":
        # This tree's flood.py against the commit's sources: older commits have no flood.py,
        # and it uses only what every commit has (its docstring).
        proc = subprocess.run([sys.executable, str(ROOT / "loadtest" / "flood.py"), *args], cwd=tree, env=env,
                              text=True, capture_output=True, timeout=1800)
        found = [(f"flood at a {m.group(1)} account", float(m.group(2)), by_kind(eval_dict(m.group(3))))
                 for m in map(FLOOD_LINE.search, proc.stdout.splitlines()) if m]
    else:
        proc = subprocess.run([sys.executable, "loadtest/bench.py", "--out", str(out_dir), *args], cwd=tree,
                              env=env, text=True, capture_output=True, timeout=3600)
        found = []
        if proc.returncode == 0:
            result = json.loads((out_dir / "bench.json").read_text())
            found = [(f"{r['scenario']}, {r['users']} users", r["server_cpu_ms_per_op"],
                      by_kind(r.get("server_cpu_ms_per_op_by_process", {})))
                     for r in result["scenarios"]]
            found.append(("limit check", 0.0, {}))
            print(f"    limit check: {result['limit_check']}", flush=True)
    if not found:
        raise SystemExit(f"{tree}: {tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [f for f in found if f[0] != "limit check"]


def eval_dict(text: str) -> dict[str, float]:
    return {str(k): float(v) for k, v in ast.literal_eval(text).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("revs", nargs="+", help="commits to compare, the first is the baseline")
    argv = sys.argv[1:]
    if "--" not in argv:
        ap.parse_args(argv)  # --help
        ap.error("give the tool after --: hotpath ..., bench ... or flood ...")
    split = argv.index("--")
    args = ap.parse_args(argv[:split])
    tool, *tool_args = argv[split + 1:] or [""]
    if tool not in ("hotpath", "bench", "flood"):
        ap.error("the tool is hotpath, bench or flood")
    results: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bkv-ab-") as tmp:
        trees = {}
        try:
            for rev in args.revs:
                sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True, check=True,
                                     capture_output=True).stdout.strip()
                tree = Path(tmp) / sha
                subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), sha], cwd=ROOT, check=True)
                trees[rev] = tree
            for n in range(args.rounds):
                for rev, tree in trees.items():
                    for name, ms, kinds in run_one(tree, tool, tool_args, Path(tmp) / f"out-{tree.name}"):
                        results[(name, rev)].append((ms, kinds))
                        print(f"round {n + 1} {rev:>10} {name}: {ms:.2f} ms", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    print()
    for name in dict.fromkeys(k[0] for k in results):
        base = statistics.median(ms for ms, _ in results[(name, args.revs[0])])
        print(f"{name}:")
        for rev in args.revs:
            runs = results[(name, rev)]
            med = statistics.median(ms for ms, _ in runs)
            kinds = sorted({k for _, ks in runs for k in ks})
            split_ = " ".join(f"{k}={statistics.median(ks.get(k, 0.0) for _, ks in runs):.2f}" for k in kinds)
            print(f"  {rev:>10}: median {med:.2f} ms ×{med / base:.2f}  runs {sorted(ms for ms, _ in runs)}  {split_}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
