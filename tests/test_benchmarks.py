"""The benchmark scripts still run (a CPU smoke run of a tiny model); they time nothing here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_speed_runs_the_trainer_and_the_sampler(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--tiny", "--train", "fp32", "--steps", "10",
                        "--log-every", "5", "--sample", "fp32", "--sample-batch", "2", "--sample-steps", "2",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(x["kind"], x["variant"]) for x in results] == [("train", "fp32"), ("sample", "fp32")]
    assert results[0]["img_per_s"] > 0 and len(results[0]["loss_curve"]) == 2 and results[1]["nfe_per_s"] > 0
    assert "| train | fp32 | 128 |" in r.stdout  # the table
