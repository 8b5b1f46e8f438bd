"""`ddpm eval`: FID and KID of a checkpoint's samples or of existing images against a reference (images, a
dataset, or precomputed statistics), through torch-fidelity's TF-Inception. Progress goes to stderr, the result
to stdout as one JSON line, so `ddpm eval ... > result.json` keeps only the numbers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddpm_cli.cli.launch import is_main_process, relaunch_with_torchrun, under_torchrun
from ddpm_cli.cli.options import sampling_options
from ddpm_cli.cli.outputs import PATH_METAVAR, output_path, refuse_replacing
from ddpm_cli.cli.sample import refuse_too_many
from ddpm_cli.cli.ui import PlainProgress, err_console, exit_quickly_when_done, fail, friendly


class EvalDisplay:
    """EvalCallbacks for the terminal: a live bar per stage on a terminal; elsewhere (logs, pipes) plain lines: an
    estimate of each stage's time after its second batch, then a line every `every_s` seconds."""

    def __init__(self, live: bool | None = None, every_s: float = 30.0):
        self.live = err_console.is_terminal if live is None else live
        self.plain = None if self.live else PlainProgress(err_console, every_s)
        self.progress = None
        self.task = None

    def on_phase(self, name: str, total: int) -> None:
        if self.plain is not None:
            self.plain.start(name, total)
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
        if self.plain is not None:
            self.plain.advance(done)
        elif self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done)

    def on_message(self, text: str, label: str = "note") -> None:
        (self.progress.console if self.progress else err_console).print(f"[yellow]{label}:[/] {escape(text)}",
                                                                        markup=True, soft_wrap=True,
                                                                        highlight=False)

    def on_warning(self, text: str) -> None:
        self.on_message(text, "warning")

    def close(self) -> None:
        if self.plain is not None:
            self.plain.finish()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@friendly
@sampling_options
def eval_command(
    input: Optional[Path] = typer.Argument(
        None, show_default=False,
        help="What to score: a checkpoint (.safetensors or a run directory) to sample first, or existing samples "
             "(an .npz such as `ddpm sample --format npz` writes, a folder or .zip of images, or a statistics .npz)."),
    ref: str = typer.Option(
        ..., "--ref", show_default=False,
        help="Reference: a folder or .zip of images, a statistics .npz (--save-stats), cifar10-train or "
             "cifar10-test (torchvision, under --data-root), or a run config YAML or run directory (its data "
             "section)."),
    n: Optional[int] = typer.Option(None, "-n", "--num", min=1, show_default=False,
                                    help="Samples to draw from a checkpoint (default: 10000); for existing samples, "
                                         "score N of them (default: all), spread evenly: over an npz's images, "
                                         "over a folder's or .zip's sorted file names (each class folder its "
                                         "share); not with statistics."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, show_default=False,
                                             help="Images per batch for sampling and Inception "
                                                  "(default: sampling as ddpm sample does, 1000 on CUDA and 256 on the "
                                                  "CPU; Inception 250 on CUDA, 50 on the CPU)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    ref_limit: Optional[int] = typer.Option(None, "--ref-limit", min=2, show_default=False,
                                            help="Use only N images of the reference, picked as -n picks samples "
                                                 "(a quicker, rougher score; cached apart from the whole reference)."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", min=1, max=10_000,
                                    help="KID: number of random subsets."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", min=2,
                                        help="KID: images per subset (lowered to fit smaller sets)."),
    inception_weights: Optional[Path] = typer.Option(
        None, "--inception-weights", envvar="DDPM_INCEPTION_WEIGHTS", show_default=False,
        help="TF-Inception weights in torch-fidelity's format (.pth), for offline use (default: torch-fidelity "
             "downloads its own)."),
    data_root: Path = typer.Option(Path("data"), "--data-root",
                                   help="Where torchvision's CIFAR-10 lives (for --ref cifar10-train/test)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="DDPM_CACHE_DIR", show_default=False,
                                             help="Folder of cached reference statistics (default: "
                                                  "$XDG_CACHE_HOME/ddpm/fid-stats, else ~/.cache/ddpm/fid-stats; "
                                                  "`ddpm cache info|clear --cache-dir` list and clear it)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Read and write cached reference statistics."),
    save_stats: Optional[str] = typer.Option(None, "--save-stats", metavar=PATH_METAVAR, show_default=False,
                                             help="Write the reference statistics to this .npz (then use it as "
                                                  "--ref)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --save-stats file."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Spread the sampling of a checkpoint over N GPUs of this "
                             "machine (torchrun); the images, and so the scores, are those of one."),
    draw=None,  # DrawOptions: the sampling options `ddpm sample` has (cli/options.py), for a checkpoint
) -> None:
    """Score samples with FID and KID against a reference; print one JSON line."""
    exit_quickly_when_done()  # its JSON line and caches are written when it returns
    if input is None and save_stats is None:
        fail("nothing to score: pass a checkpoint or samples, or --save-stats FILE to precompute the reference "
             "statistics", code=2)

    refuse_too_many(n)
    save_stats = output_path("--save-stats", save_stats, "stats.npz")
    refuse_replacing({"--save-stats": save_stats}, [input, inception_weights])  # --ref: check_request
    from ddpm_cli.engine.evaluation.run import EvalRequest, check_request, evaluate

    req = EvalRequest(ref=ref, input=input, n=n, draw=draw, batch_size=batch_size, device=device,
                      ref_limit=ref_limit, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                      inception_weights=inception_weights, data_root=data_root, cache_dir=cache_dir,
                      use_cache=cache, save_stats=save_stats, overwrite=overwrite)
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
