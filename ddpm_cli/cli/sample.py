"""`ddpm sample CKPT`: draw images from a checkpoint alone (PNG files, an NPZ for FID tools, a grid), with a
progress bar over images and sampler steps and a summary line."""
from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.options import sampling_options
from ddpm_cli.cli.launch import is_main_process, relaunch_with_torchrun, under_torchrun
from ddpm_cli.cli.outputs import PATH_METAVAR, output_path, refuse_replacing, run_of
from ddpm_cli.cli.ui import console, exit_quickly_when_done, fmt_rate, friendly, warn
from ddpm_cli.errors import UsageError


# More images than any score or dataset needs (FID takes 50,000): a larger -n is a typo, and planning its file names
# alone would fill the memory.
MAX_IMAGES = 10_000_000


# names --out takes for a mistaken picture, not a folder of them (one already there is still a folder)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class Format(str, Enum):
    png = "png"
    npz = "npz"


class SampleDisplay:
    """A live bar over images and one over the current batch's steps on a terminal; a line per batch elsewhere."""

    def __init__(self, n: int, live: bool | None = None, quiet: bool = False):
        self.n = n
        self.quiet = quiet  # other ranks under torchrun say nothing
        self.live = console.is_terminal if live is None else live
        self.progress = None

    def __enter__(self) -> "SampleDisplay":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.description:>7}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=console, refresh_per_second=8)
            self.progress.start()
            self.images = self.progress.add_task("images", total=self.n)
            self.steps = self.progress.add_task("steps", total=None)
        return self

    def on_step(self, i: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.steps, completed=i, total=total)

    def on_batch(self, done: int, n: int) -> None:
        if self.progress is not None:
            self.progress.update(self.images, completed=done)
        elif not self.quiet:
            console.print(f"sampled {done:,}/{n:,}", markup=False)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _earlier_images(folder: Path, files: list[Path]) -> int:
    """How many images in `folder` are named as sampling names them (000042.png, class3_000042.png) but are not
    among `files`, this call's: left by an earlier call, they would be scored together with these."""
    if not folder.is_dir():
        return 0
    ours = re.compile(r"(class\d+_)?\d{6,}\.png")
    these = {f.name for f in files}
    return sum(1 for p in folder.iterdir() if ours.fullmatch(p.name) and p.name not in these)


def _class_index(text: str | None, checkpoint: Path) -> int | None:
    """--class K: an index, or one of the class names the checkpoint lists (read from its header: no torch). Where
    a name is a number too (class folders 1..12 sort as 1, 10, 11, 12, 2, ...), K that means two classes is
    refused."""
    if text is None:
        return None
    index = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
    from ddpm_cli.engine.checkpoint import class_names, read_header
    from ddpm_cli.engine.runs import resolve_checkpoint

    names = class_names(read_header(resolve_checkpoint(checkpoint)).metadata)
    is_index = index is not None and 0 <= index < len(names)  # (an index past the classes is none of them)
    if text in names and is_index and names.index(text) != index:
        raise UsageError(f"--class {text} is both class {index} ({names[index]}) and the class named {text} (index "
                         f"{names.index(text)}); give the index of the one you mean")
    if text in names and not is_index:
        return names.index(text)
    if index is not None:
        return index
    if not names:
        raise UsageError(f"--class {text}: this checkpoint lists no class names; give a class index")
    listed = ", ".join(f"{i} {name}" for i, name in enumerate(names[:12])) + (", ..." if len(names) > 12 else "")
    raise UsageError(f"--class {text} is not one of this checkpoint's classes ({listed}); give a name or an index")


def refuse_too_many(n: int | None) -> None:
    if n is not None and n > MAX_IMAGES:
        raise UsageError(f"-n {n:,} is more than the {MAX_IMAGES:,} images one call draws; ask for fewer (FID takes "
                         f"50,000)")


def _refuse_bad_outputs(plan, n: int, out: Path | None, grid: Path | None, guide) -> None:
    """What the plan's own checks leave to the command line: no output over an input or the run's files (even with
    --overwrite), the grid a PNG and not one of the images, an npz that fits in memory."""
    refuse_replacing({"--grid": grid, "--out": plan.npz}, [plan.checkpoint, guide], run_of(plan.checkpoint))
    if grid is not None and grid.suffix.lower() not in (".png", ""):
        raise UsageError(f"--grid {grid}: the grid is a PNG file; name it .png")
    if grid is not None and plan.files and grid.resolve().parent == out.resolve() and \
            grid.name in {f.name for f in plan.files}:
        raise UsageError(f"--grid {grid} is one of the images --out writes; choose a path outside {out}")
    if plan.npz is not None:
        _refuse_an_npz_larger_than_memory(n, plan.config.model)


def _refuse_an_npz_larger_than_memory(n: int, model) -> None:
    """An npz is held in memory until it is written: one larger than half the machine's memory would end the
    process (or the machine) after all of the sampling, so it is refused before any."""
    import os

    from ddpm_cli.cli.inspect_cmd import human_size

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: unknown
        return
    channels, height, width = model.image_shape()
    need = n * channels * height * width  # uint8
    if need > memory // 2:
        raise UsageError(f"-n {n:,} images of {model.size_text()} make a {human_size(need)} npz, held in memory "
                         f"until it is written, and this machine has {human_size(memory)}; write PNG files "
                         f"(--format png) or several npz files of fewer images (each its own --seed)")


@friendly
@sampling_options
def sample_command(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT",
                                      help="A .safetensors checkpoint, or a run directory (its latest).",
                                      show_default=False),
    n: int = typer.Option(64, "-n", "--num", help="Number of images (at most 10,000,000)."),
    per_class: bool = typer.Option(False, "--per-class", help="The same number of images for every class "
                                   "(conditional models; -n must be a multiple of the classes); the grid gets a "
                                   "row per class."),
    class_index: Optional[str] = typer.Option(None, "--class", metavar="K", show_default=False,
                                              help="Draw every image of class K: its index, or its name as `ddpm "
                                                   "inspect` lists it (conditional models)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per network batch, at most "
                                             "(batches are evened out). Default: 1000 on a GPU for 32x32 images "
                                             "(fewer for larger ones), 256 on the CPU.", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar=PATH_METAVAR, show_default=False,
                                      help="Folder for the images (created if missing), or an .npz file. Default: "
                                           "samples/ (samples.npz with --format npz), none with --grid alone."),
    fmt: Optional[Format] = typer.Option(None, "--format", show_default=False,
                                         help="png: one file per image; npz: one uint8 (N, H, W, C) array `arr_0` "
                                              "and `labels`, as FID tools read it. Default: npz for an --out "
                                              "named .npz, else png."),
    grid: Optional[str] = typer.Option(None, "--grid", metavar=PATH_METAVAR, show_default=False,
                                       help="Also write one PNG grid of the images (at most 1,024)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Spread the batches over N GPUs of this machine (torchrun); "
                             "the images are the same as on one."),
    draw=None,  # DrawOptions: the sampling options (cli/options.py)
) -> None:
    """Draw images from a trained checkpoint."""
    exit_quickly_when_done()  # its files are complete when it returns
    from ddpm_cli.engine.sampling import SampleRequest, plan_sampling, run_sampling

    refuse_too_many(n)
    class_index = _class_index(class_index, checkpoint)
    grid = output_path("--grid", grid, "grid.png")
    # the plan's rule: x.npz (or x.NPZ) is the file, else a folder
    npz_named = out is not None and Path(out).suffix.lower() == ".npz"
    if fmt == Format.png and npz_named:
        raise UsageError(f"--out {out} names an .npz file, and --format png writes a folder of PNG files; drop "
                         f"--format png to write the npz, or name a folder")
    if (out is not None and Path(out).suffix.lower() in IMAGE_SUFFIXES and not Path(out).is_dir()
            and not out.endswith(("/", os.sep))):  # out.png/ says it is a folder
        fix = ("--grid already writes one picture, so give --out a folder or an .npz file, or drop it" if grid
               else f"for one picture of them all, use --grid {out}")
        raise UsageError(f"--out {out} names an image file, and --out is a folder for the images or an .npz file; "
                         f"{fix}")
    asked_format = fmt is not None
    fmt = fmt or (Format.npz if npz_named else Format.png)
    out = output_path("--out", out, "samples.npz" if npz_named else None)  # npz to a folder: its samples.npz
    if out is None and (grid is None or asked_format):  # --grid alone writes the grid alone
        out = Path("samples.npz") if fmt == Format.npz else Path("samples")
    req = SampleRequest(checkpoint=checkpoint, n=n, draw=draw, per_class=per_class, class_index=class_index,
                        batch_size=batch_size, device=device, out=out, fmt=fmt.value, grid=grid, overwrite=overwrite)
    plan = plan_sampling(req)  # every check, once: before torchrun starts N processes, and before any torch import
    _refuse_bad_outputs(plan, n, out, grid, None if draw.guide in (None, "none") else draw.guide)
    if gpus > 1 and not under_torchrun():
        return relaunch_with_torchrun(gpus)
    main = is_main_process()
    for w in plan.warnings if main else []:
        warn(w)
    stale = _earlier_images(out, plan.files) if plan.files and main else 0
    if stale:
        warn(f"{out} holds {stale:,} other image{'s' if stale != 1 else ''} named as `ddpm sample` names them, from "
             f"an earlier call: `ddpm eval {out}` would score them with these; use an empty folder to keep them apart")
    guidance = plan.draw.guidance
    if main and plan.config.model.conditional and guidance.guide is None and guidance.weight == 0:
        warn("--guidance 0 draws from the unconditional model (classifier-free guidance at 0 drops the label): the "
             "images are not of the classes their names and labels give; use 1 for the conditional model alone")
    if main and plan.files and grid is not None and out.resolve() in grid.resolve().parents:
        warn(f"--grid {grid} is inside --out {out}: `ddpm eval {out}` would score the grid as one more image; write "
             f"it outside the folder")
    m = plan.config.model
    what = ("per class" if per_class else f"class {class_index}" if class_index is not None
            else "classes in turn" if m.conditional else "unconditional")
    spec = plan.draw.spec
    steps = ""  # the ddpm sampler takes every step
    if spec.sampler != "ddpm":
        from ddpm_cli.engine.build import build_diffusion

        # what runs: steps that round onto one timestep run once
        taken = spec.evaluations(build_diffusion(plan.config.diffusion).alpha_bar)
        steps = f" {taken} step{'s' if taken != 1 else ''}"
        asked = min(spec.steps, plan.config.diffusion.num_timesteps)  # (above T, the spec's own warning says so)
        if main and taken < asked:
            warn(f"{spec.steps} {spec.sampler} steps ({spec.spacing} spacing) fall on {taken} distinct timesteps of "
                 f"this model's T = {plan.config.diffusion.num_timesteps}: it takes {taken} (--steps and --spacing "
                 f"choose others)")

    def on_start(device_name: str) -> None:
        if main:
            guided = plan.draw.guidance.describe()
            console.print(f"sampling {n:,} image{'s' if n != 1 else ''} ({what}) from {plan.checkpoint}  |  "
                          f"{spec.sampler}{steps}  |  {plan.draw.weights} weights  |  "
                          f"{guided + '  |  ' if guided else ''}seed {draw.seed}  |  {device_name}", markup=False,
                          soft_wrap=True)

    with SampleDisplay(n, live=None if main else False, quiet=not main) as display:
        result = run_sampling(plan, req, on_start=on_start, on_step=display.on_step, on_batch=display.on_batch)
    if not main:
        return
    where = [str(p) for p in ((out if plan.files else None), result.npz, result.grid) if p is not None]
    cached = " (loaded from the compile cache)" if result.compile_cache == "hit" else ""
    compiled = f"; compiled: the first batch took {result.first_batch_s:.1f} s{cached}" if result.compiled else ""
    console.print(f"{result.n:,} image{'s' if result.n != 1 else ''} in {result.seconds:.1f} s "
                  f"({fmt_rate(result.images_per_s)} images/s{compiled}) on {result.device} -> {', '.join(where)}",
                  markup=False, soft_wrap=True)
