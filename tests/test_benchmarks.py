"""The benchmark scripts still run (a CPU smoke run of a tiny model); they time nothing here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_speed_runs_the_trainer_and_the_sampler(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--tiny", "--train", "fp32", "--steps", "30",
                        "--log-every", "5", "--profile", "--sample", "fp32", "--sample-batch", "2", "--sample-steps", "2",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(x["kind"], x["variant"]) for x in results] == [("train", "fp32"), ("sample", "fp32")]
    assert results[0]["img_per_s"] > 0 and len(results[0]["loss_curve"]) == 6 and results[1]["nfe_per_s"] > 0
    assert "| train | fp32 | 128 |" in r.stdout  # the table
    copies = json.loads(r.stdout.split("BENCH copies ", 1)[1].splitlines()[0])  # the profile's copies by shape
    assert copies and all({"op", "calls", "ms", "shapes"} <= set(c) for c in copies)


def test_fid_summary_tables_each_run_and_its_scores(tmp_path):
    (tmp_path / "a.log").write_text(
        "step 16500/1000000 (2%)  loss 0.0144  lr 6.00e-04  5,276 img/s  grad-norm 0.039\n"
        "done: step 16949, 2,169,472 images seen in 506.3 s (reached train.max_time, 65.8 s of it compiling); x\n"
        "FID-DONE\n")
    (tmp_path / "a.jsonl").write_text('MAIN --sampler ddim --steps 100\n{"fid": 14.7725, "kid_mean": 0.00926}\n'
                                      'SWEEP dpm++2m 20  \n{"fid": 14.75, "kid_mean": null}\n'
                                      'SWEEP ddim 10 1\n{"fid": null, "failed": true}\n')
    (tmp_path / "b.log").write_text("compiling the training step\n")
    (tmp_path / "c.log").write_text("done: step 300, 38,400 images seen in 120.5 s (reached train.steps); x\n")
    r = subprocess.run([sys.executable, "benchmarks/fid_summary.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[2:]
    assert rows[0] == ("| a | done | 2,169,472 | 16949 | 65.8 | 5,276 | --sampler ddim --steps 100 | 14.77 | 9.3 |")
    assert rows[1] == "|  |  |  |  |  |  | dpm++2m 20 | 14.75 |  |"
    assert rows[2] == "|  |  |  |  |  |  | ddim 10 1 | failed |  |"  # fid_run.sh records a failed score so
    assert rows[3].startswith("| b | running |")
    assert rows[4].startswith("| c | running | 38,400 | 300 |  |")  # no compilation: no compile column
