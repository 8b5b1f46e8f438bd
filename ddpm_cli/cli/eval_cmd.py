"""`ddpm eval`: FID and KID of a checkpoint's samples or of existing images against a reference (images, a
dataset, or precomputed statistics), through torch-fidelity's TF-Inception. Progress goes to stderr, the result
to stdout as one JSON line, so `ddpm eval ... > result.json` keeps only the numbers."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.launch import is_main_process, relaunch_with_torchrun, under_torchrun
from ddpm_cli.cli.ui import err_console, fail, fmt_rate, friendly


class EvalDisplay:
    """EvalCallbacks for the terminal: a live bar per stage on a terminal, one line per stage elsewhere."""

    def __init__(self, live: bool | None = None):
        self.live = err_console.is_terminal if live is None else live
        self.progress = None
        self.task = None
        self.phase: str | None = None
        self.total = 0
        self.done = 0
        self.t0 = time.monotonic()

    def _finish_phase(self) -> None:
        if self.phase is not None and not self.live:
            dt = time.monotonic() - self.t0
            err_console.print(f"{self.phase}: {self.done:,} images in {dt:.1f} s ({fmt_rate(self.done / max(dt, 1e-9))}"
                              f" img/s)", markup=False, soft_wrap=True)
        self.phase = None

    def on_phase(self, name: str, total: int) -> None:
        self._finish_phase()
        self.phase, self.total, self.done, self.t0 = name, total, 0, time.monotonic()
        if not self.live:
            return
        if self.progress is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("images"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=err_console, refresh_per_second=4)
            self.progress.start()
        self.task = self.progress.add_task(name, total=total)

    def on_advance(self, done: int) -> None:
        self.done = done
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done)

    def on_message(self, text: str) -> None:
        (self.progress.console if self.progress else err_console).print(f"[yellow]note:[/] {text}", markup=True,
                                                                        soft_wrap=True, highlight=False)

    def close(self) -> None:
        self._finish_phase()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@friendly
def eval_command(
    input: Optional[Path] = typer.Argument(
        None, show_default=False,
        help="What to score: a checkpoint (.safetensors or a run directory) to sample first, or existing samples "
             "(an .npz such as `ddpm sample --format npz` writes, a folder or .zip of images, or a statistics .npz)."),
    ref: str = typer.Option(
        ..., "--ref", show_default=False,
        help="Reference: a folder or .zip of images, a statistics .npz (--save-stats), cifar10-train or "
             "cifar10-test (torchvision, under --data-root), or a run config YAML (its data section)."),
    n: Optional[int] = typer.Option(None, "-n", "--num", min=1, show_default=False,
                                    help="Samples to draw from a checkpoint (default: 10000); for existing samples, "
                                         "score the first N (default: all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, show_default=False,
                                             help="Images per batch for sampling and Inception "
                                                  "(default: sampling 1000 on CUDA, Inception 250; 50 on the CPU)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler's noise (checkpoints)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", show_default=False,
                                          help="Sampler for a checkpoint: ddpm, ddim or dpm++2m (default: ddim, or "
                                               "dpm++2m when autoguided by the checkpoint's stored guide)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, show_default=False,
                                        help="Sampler steps (default: the sampler's default)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", show_default=False,
                                             help="Guidance weight (1: none): autoguidance by the checkpoint's "
                                                  "stored guide (its default when it has one) or by --guide-model; "
                                                  "else classifier-free for class-conditional checkpoints (labels "
                                                  "spread evenly over the classes)."),
    guide_model: Optional[str] = typer.Option(None, "--guide-model", show_default=False,
                                              help="Autoguidance by this weaker checkpoint (an earlier one of the "
                                                   "same run); `none`: not by the checkpoint's stored guide."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", show_default=False,
                                              help="Sample the checkpoint's EMA weights of this decay "
                                                   "(train.ema_decay or one of train.ema_extra)."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", min=1, help="KID: number of random subsets."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", min=2,
                                        help="KID: images per subset (lowered to fit smaller sets)."),
    inception_weights: Optional[Path] = typer.Option(
        None, "--inception-weights", envvar="DDPM_INCEPTION_WEIGHTS", show_default=False,
        help="TF-Inception weights in torch-fidelity's format (.pth), for offline use (default: torch-fidelity "
             "downloads its own)."),
    data_root: Path = typer.Option(Path("data"), "--data-root",
                                   help="Where torchvision's CIFAR-10 lives (for --ref cifar10-train/test)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="DDPM_CACHE_DIR", show_default=False,
                                             help="Folder of cached reference statistics "
                                                  "(default: ~/.cache/ddpm/fid-stats)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Read and write cached reference statistics."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", show_default=False,
                                              help="Write the reference statistics to this .npz (then use it as "
                                                   "--ref)."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Spread the sampling of a checkpoint over N GPUs of this "
                             "machine (torchrun); the images, and so the scores, are those of one."),
) -> None:
    """Score samples with FID and KID against a reference; print one JSON line."""
    if input is None and save_stats is None:
        fail("nothing to score: pass a checkpoint or samples, or --save-stats FILE to precompute the reference "
             "statistics", code=2)

    from ddpm_cli.engine.evaluation.run import EvalRequest, check_request, evaluate

    req = EvalRequest(ref=ref, input=input, n=n, batch_size=batch_size, device=device, seed=seed, sampler=sampler,
                      steps=steps, guidance=guidance, guide=guide_model, ema_decay=ema_decay,
                      kid_subsets=kid_subsets,
                      kid_subset_size=kid_subset_size,
                      inception_weights=inception_weights, data_root=data_root, cache_dir=cache_dir,
                      use_cache=cache, save_stats=save_stats)
    # refuse bad arguments once, before N processes; only sampling a checkpoint is spread over them
    if gpus > 1 and not under_torchrun() and check_request(req)[0] is not None:
        return relaunch_with_torchrun(gpus)
    main = is_main_process()
    display = EvalDisplay() if main else None
    try:
        result = evaluate(req, callbacks=display)
    finally:
        if display is not None:
            display.close()
    if main:
        typer.echo(json.dumps(result))
