"""The load-test harness works end to end: a few seconds of each Locust
scenario against a real fleet, with the floor measured in the same run.
(Numbers from this are not performance claims; see docs/performance.md.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from support import procs

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_every_scenario_through_noise_and_the_flood_respects_the_limit(tmp_path):
    res = procs.run([sys.executable, str(ROOT / "loadtest" / "bench.py"), "--duration", "6", "--seed-users", "6",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["scenario"]: r for r in result["scenarios"]}
    assert set(rows) == {"guess", "recovery", "registration", "recovery at half saturation"}
    assert "Envoy and Noise" in result["fleet"] and result["floor"]["noise"]["handshake"] > 0
    for r in rows.values():
        assert r["ops"] > 0 and r["errors"] == 0
        assert r["floor_ms_per_op"] > 0 and r["ratio_to_floor"] > 1
    assert result["limit_check"].endswith(": ok"), result["limit_check"]
    assert (tmp_path / "bench.md").read_text().count("|") > 20
    # The verdict on each of the four targets, with the cost our services cannot remove.
    verdicts = result["targets"]
    assert len(verdicts) == 4 and all(isinstance(t["met"], bool) for t in verdicts)
    assert verdicts[1]["fixed_ms"] >= rows["recovery"]["floor_ms_per_op"] > 0
    assert "Against the targets" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "locust-guess.html").exists()
    # (Whether the paced run reached half the saturated throughput is a timing
    # question for the benchmark, not this test: on a shared two-core machine
    # the "saturated" run was seen slower than the paced one.)
    assert set(r["server_cpu_ms_per_op_by_process"]) >= {"etcd", "hsm", "island", "frontend", "envoy",
                                                            "noise-processor"}
