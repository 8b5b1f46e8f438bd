"""How long `ddpm inspect` takes end to end (a fresh process, as a user runs it) on a checkpoint of about 300 MB.

By default it writes a real checkpoint of the DDPM CIFAR-10 model (35.7M parameters, weights + EMA in fp32,
about 286 MB) to a temporary folder; `--checkpoint PATH` times an existing one instead. Prints the median of
several runs for the table, --json and --sha256, next to a bare `python -c pass` for scale. Goal: under 0.5 s.

    python benchmarks/bench_inspect.py [--checkpoint PATH] [--runs 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(path: Path) -> Path:
    """A checkpoint as `ddpm train` writes it, of the default (CIFAR-10) model, with random weights."""
    import torch

    from ddpm_cli.config import RunConfig
    from ddpm_cli.engine.build import build_unet, count_params
    from ddpm_cli.engine.checkpoint import save_weights, weights_metadata

    cfg = RunConfig()
    torch.manual_seed(0)
    model, ema = build_unet(cfg.model), build_unet(cfg.model)
    meta = weights_metadata(cfg, step=800_000, images_seen=800_000 * 128, num_params=count_params(model),
                            has_ema=True, classes=[])
    save_weights(path, model, ema, meta)
    return path


def time_command(args: list[str], runs: int) -> float:
    """Median wall time of `args` in a fresh process; the first (cold-cache) run is discarded."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        r = subprocess.run(args, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"{' '.join(args)} failed:\n{r.stderr}")
        if i:
            times.append(dt)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="time this checkpoint instead of writing one")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per command (median reported)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or make_checkpoint(Path(tmp) / "ckpt-00800000.safetensors")
        size_mb = ckpt.stat().st_size / 1e6
        ddpm = [sys.executable, "-m", "ddpm_cli"]
        env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s)"
        base = time_command([sys.executable, "-c", "pass"], args.runs)
        table = time_command([*ddpm, "inspect", str(ckpt)], args.runs)
        as_json = time_command([*ddpm, "inspect", str(ckpt), "--json"], args.runs)
        sha = time_command([*ddpm, "inspect", str(ckpt), "--sha256"], max(3, args.runs // 2))
        print(f"ddpm inspect on a {size_mb:,.0f} MB checkpoint ({env_note}), median of {args.runs} runs:")
        print(f"  table            {table:.3f} s")
        print(f"  --json           {as_json:.3f} s")
        print(f"  --sha256         {sha:.3f} s   (reads the whole file)")
        print(f"  python -c pass   {base:.3f} s   (interpreter start-up, for scale)")
        print(f"  goal: under 0.5 s -> {'met' if table < 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
