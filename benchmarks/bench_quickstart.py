"""The newcomer's first command, measured: `ddpm train --config examples/quickstart.yaml` run as a user runs it,
timed end to end, and its last sample grid (the one the README points to) scored for recognisability by
benchmarks/shapes_score.py; `--extra N` also scores N more samples drawn from the final checkpoint exactly as
the grid's are (same sampler and steps, other seeds), for a figure with less noise than one grid's tiles.

    python benchmarks/bench_quickstart.py                      # the shipped quickstart, default threads
    python benchmarks/bench_quickstart.py --extra 500 --set train.steps=600   # a variant

The last line is `BENCH {json}`: wall_s (the whole command), train_s (what `ddpm train` reports: training,
its grids and checkpoints), img_per_s (median over the logged intervals), the grid's score and the extra one's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def extra_samples(checkpoint: Path, n: int, sampler: str | None = None, seed: int = 1):
    """n samples from the checkpoint with the grid's sampler (as Trainer.sample_grid draws them) or `sampler`
    ("ddim:50", "ddpm", "dpm++2m:20"); labels cycle over the classes when the model is conditional."""
    import torch

    from ddpm_cli.api import Diffusion

    d = Diffusion.from_checkpoint(checkpoint, device="cpu")
    cfg = d.cfg
    if sampler is None:
        full = cfg.logging.sample_steps >= cfg.diffusion.num_timesteps
        name, steps = ("ddpm" if full else "ddim"), cfg.logging.sample_steps
    else:
        name, _, steps = sampler.partition(":")
        steps = int(steps) if steps else None
    y = torch.arange(n) % cfg.model.num_classes if cfg.model.conditional else None
    guidance = cfg.logging.sample_guidance if cfg.model.conditional else 1.0  # as the grid is guided
    x = d.sample(n, y=y, sampler=name, steps=steps, guidance=guidance, seed=seed)
    images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to ddpm train")
    ap.add_argument("--extra", type=int, default=0, help="also score this many more samples of the final model")
    ap.add_argument("--sampler", action="append", default=[],
                    help="score --extra samples of this sampler too, e.g. ddim:50 or ddpm (repeatable)")
    ap.add_argument("--scorer-count", type=int, default=5000, help="shapes the scorer trains on (fewer: faster, "
                    "less sure)")
    ap.add_argument("--keep", type=Path, help="put the run here (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        cmd = [sys.executable, "-m", "ddpm_cli", "train", "--config", args.config,
               "--set", f"logging.run_dir={base}", "--set", "logging.run_name=quickstart"]
        for o in args.overrides:
            cmd += ["--set", o]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.monotonic() - t0
        if r.returncode != 0:
            sys.exit(f"ddpm train failed ({r.returncode}):\n{r.stderr[-3000:]}")
        done = re.search(r"done: step (\d+), [\d,]+ images seen in ([\d.]+) s", r.stdout)
        run = base / "quickstart"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rates = [rec["img_per_s"] for rec in records[1:] if "img_per_s" in rec] or [records[0]["img_per_s"]]
        import torch
        import yaml

        from shapes_score import ShapesScorer, score_grid

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        grid = max((run / "samples").glob("step_*.png"))
        t1 = time.monotonic()
        scorer = ShapesScorer(cfg["model"]["image_size"], cfg["model"]["in_channels"], count=args.scorer_count)
        scorer_s = time.monotonic() - t1
        conditional = cfg["model"]["conditional"]
        out = {"config": args.config, "overrides": args.overrides, "threads": torch.get_num_threads(),
               "cpu": _cpu_name(), "wall_s": round(wall, 1), "train_s": float(done.group(2)) if done else None,
               "steps": int(done.group(1)) if done else None, "img_per_s": round(statistics.median(rates), 1),
               "conditional": conditional, "grid": grid.name,
               "grid_score": score_grid(scorer, grid, conditional).summary(),
               "scorer_s": round(scorer_s, 1)}
        if args.extra:
            ckpt = max((run / "checkpoints").glob("ckpt-*[0-9].safetensors"))
            images, y = extra_samples(ckpt, args.extra)
            out["extra_score"] = scorer.score(images, y).summary()
            for name in args.sampler:
                t2 = time.monotonic()
                images, y = extra_samples(ckpt, args.extra, name)
                out[f"extra_score {name}"] = {**scorer.score(images, y).summary(),
                                              "sample_s": round(time.monotonic() - t2, 1)}
        print(r.stdout[-2000:])
        print("BENCH " + json.dumps(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
