"""End to end as a user runs it: `ddpm sample CKPT -n 10000 --steps 100` (DDIM-100, the default batch), timed from
process start to exit, twice: the first run compiles the network (or loads it from inductor's on-disk cache if
an earlier run left it there), the second finds the cache warm.

    PYTHONPATH=. python benchmarks/bench_sample_cli.py                  # DDPM CIFAR-10 model (35.7M), GPU
    PYTHONPATH=. python benchmarks/bench_sample_cli.py --tiny -n 64     # a tiny model on the CPU: checks the script

The checkpoint holds the DDPM CIFAR-10 architecture with random weights (the time does not depend on what
the weights are). Prints one BENCH line per run with the wall time and the command's own summary line."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpm_cli.api import Diffusion
from ddpm_cli.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.base_channels=16", "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.norm_groups=4"]


def make_checkpoint(path: Path, tiny: bool) -> None:
    cfg = load_config(ROOT / "examples" / "cifar10.yaml", TINY if tiny else [])
    torch.manual_seed(0)
    d = Diffusion.from_config(cfg, device="cpu")
    with torch.no_grad():  # zero-initialised output layers: perturb them, as a trained model would be
        for p in d.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d.ema.copy_from(d.model)
    d.save(path)


def run(ckpt: Path, out: Path, n: int, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ddpm_cli", "sample", str(ckpt), "-n", str(n), "--steps", str(steps),
           "--out", str(out), *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"ddpm sample failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    summary = p.stdout.strip().splitlines()[-1]
    m = re.search(r"in ([\d.]+) s", summary)
    first = re.search(r"first batch took ([\d.]+) s", summary)  # compiled: includes compiling or loading it
    files = len(list(out.glob("*.png"))) if out.is_dir() else 0
    return {"kind": "sample-cli", "images": n, "steps": steps, "args": extra, "wall_s": round(wall, 2),
            "sampling_s": float(m.group(1)) if m else None, "first_batch_s": float(first.group(1)) if first else None,
            "pngs": files, "summary": summary}


# Where a run's time goes, timed in a fresh process as run_sampling does it (a GPU host took 5.0 s for torch and
# CUDA, 8.2 s for sampling_net, 12.9 s for the first batch; BENCHMARKS.md 2026-11-27).
PHASES = """
import json, sys, time
T = time.perf_counter
t = {"start": T()}
import torch
torch.zeros(1, device=sys.argv[2])
t["torch and the device"] = T()
from ddpm_cli.engine.checkpoint import load_model
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine.generate import default_batch, generate, sampling_net
device = torch.device(sys.argv[2])
model, diffusion, cfg, _ = load_model(sys.argv[1], device)
t["checkpoint"] = T()
n, steps = int(sys.argv[3]), int(sys.argv[4])
net = sampling_net(model, device, n * steps)
t["sampling_net"] = T()
m = cfg.model
ends = [T() for _ in generate(net, diffusion, n, SamplerSpec(steps=steps),
                              image_shape=(m.in_channels, m.image_size, m.image_size),
                              batch_size=default_batch(m.image_size, device.type == "cuda"),
                              device=device, bf16=device.type == "cuda")]
t["first batch"] = ends[0]
names = list(t)
out = {b: round(t[b] - t[a], 2) for a, b in zip(names, names[1:])}
out["each later batch"] = [round(b - a, 2) for a, b in zip(ends, ends[1:])]
print("BENCH " + json.dumps({"kind": "sample-phases", "images": n, "steps": steps, "seconds": out}))
"""


def phases(ckpt: Path, n: int, steps: int, device: str) -> None:
    p = subprocess.run([sys.executable, "-c", PHASES, str(ckpt), device, str(n), str(steps)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        sys.exit(f"the phase run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    print(p.stdout.strip().splitlines()[-1], flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="more `ddpm sample` options (last)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    p.add_argument("--phases", action="store_true", help="then time start-up, checkpoint, network set-up and each "
                   "batch in one fresh process (the default batch, no files written)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        make_checkpoint(ckpt, a.tiny)
        for i in range(a.runs):
            res = run(ckpt, Path(tmp) / f"out{i}", a.n, a.steps, a.args)
            res["run"] = i + 1
            print("BENCH " + json.dumps(res), flush=True)
        if a.phases:
            phases(ckpt, a.n, a.steps, "cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    main()
