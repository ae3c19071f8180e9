"""The consolidation benchmark still runs against the product as it is.

A benchmark is only run by hand, so a change of the plugin's arguments or
control commands can break it unnoticed. This runs its smallest form (one
8 MiB delta, idle and moderate load, vdisk and qemu-img only) and checks what
it reports about correctness; its timings are not looked at.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_consolidation_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "consolidate_bench.py"), "--methods", "vdisk",
         "--deltas", "8M", "--loads", "idle,moderate", "--repeat", "1", "--peer-repeat", "1",
         "--base-size", "64M", "--window", "20", "--baseline", "0.5", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    vdisk = [run for run in runs if run["method"] == "vdisk"]
    assert [run["load"] for run in vdisk] == ["idle", "moderate"], runs
    for run in vdisk:
        where = f"{run['load']}: {run['note']} {run['check']}"
        assert run["converged"] and run["check"] == "clean", where
        assert run["passes"] == 1 and run["copied"] <= run["copy_set"], where
    assert "ERROR" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
