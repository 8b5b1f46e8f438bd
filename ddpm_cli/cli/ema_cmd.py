"""`ddpm ema RUN --length L`: the weights' average of any relative length, chosen after training, from the
post-hoc EMA snapshots a run with train.posthoc_ema wrote (engine/posthoc_ema.py), as a checkpoint that `ddpm
sample`, `eval` and `export` take. Without --length it lists what the run stored."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.outputs import PATH_METAVAR, output_path, refuse_replacing
from ddpm_cli.cli.ui import console, friendly, warn

# a reconstruction whose profile misses the requested one by more than this, or that amplifies the snapshots'
# own rounding by more than GAIN_WARNING (the sum of its weights' magnitudes), is reported as imprecise
FIT_WARNING, GAIN_WARNING = 0.05, 10.0


def _run_and_step(path: Path, step: int | None) -> tuple[Path, int | None]:
    """A run directory, or one of its checkpoints or post-hoc EMA snapshots (whose step is then the default), or
    its ema/ folder of snapshots."""
    from ddpm_cli.engine.posthoc_ema import SNAPSHOT_RE
    from ddpm_cli.engine.runs import CKPT_RE, holds_snapshots, run_folder
    from ddpm_cli.errors import CheckpointError, UsageError

    path = run_folder(path).resolve()  # a checkpoint named from inside its checkpoints/ folder still finds its run
    if path.is_dir():  # RUN/ema (the folder the snapshots are seen in) was taken for a run, and RUN/ema/ema searched
        run = path.parent if path.name == "ema" and holds_snapshots(path) else path
        if not any((run / name).exists() for name in ("config.yaml", "checkpoints", "ema")):
            raise CheckpointError(f"{run} is no run directory of `ddpm train` (it has no config.yaml, checkpoints/ "
                                  f"or ema/); pass the folder a run wrote, or one of its checkpoints")
        return run, step
    match = CKPT_RE.search(path.name) if path.parent.name == "checkpoints" else \
        SNAPSHOT_RE.search(path.name) if path.parent.name == "ema" else None
    if path.is_file() and match:
        return path.parent.parent, int(match.group(1)) if step is None else step
    raise UsageError(f"{path} is neither a run directory nor one of its checkpoints (RUN/checkpoints/ckpt-*) or "
                     f"post-hoc EMA snapshots (RUN/ema/snapshot-*)")


@friendly
def ema_command(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="A run directory of `ddpm train` (or one of its checkpoints or snapshots: "
                                    "its step).", show_default=False),
    lengths: Optional[list[float]] = typer.Option(None, "--length", "-l", help="Relative length of the average "
                                                  "(its standard deviation as a share of the run; in [0.001, "
                                                  "0.28]); repeat for several.", show_default=False),
    step: Optional[int] = typer.Option(None, "--step", help="The snapshot step to average up to (default: the "
                                       "last).", show_default=False),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar=PATH_METAVAR, show_default=False,
                                      help="Output checkpoint (one --length only; default: "
                                           "RUN/ema/ckpt-STEP-lengthL.safetensors)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Post-hoc EMA: a checkpoint of the weights averaged over any relative length, from the snapshots of a run
    trained with train.posthoc_ema."""
    from ddpm_cli.config.schema import POSTHOC_EMA_LENGTHS
    from ddpm_cli.errors import UsageError

    out = output_path("--out", out, "ema.safetensors")
    run, step = _run_and_step(run, step)
    lengths = list(dict.fromkeys(lengths or []))  # a length given twice is made once
    low, high = POSTHOC_EMA_LENGTHS
    for length in lengths:
        if not low <= length <= high:
            raise UsageError(f"--length {length} is out of range: a relative length is in [{low}, {high}] (EDM2's "
                             f"best were 0.05-0.15)")
    if out is not None and len(lengths) != 1:
        raise UsageError("--out names one file: give exactly one --length with it")

    from ddpm_cli.engine import posthoc_ema

    snaps = posthoc_ema.list_snapshots(run)
    if not lengths:
        if not snaps:
            console.print(f"{run}: no post-hoc EMA snapshots (train with --set train.posthoc_ema='[0.05, 0.1]')",
                          markup=False, soft_wrap=True)
            return
        tracked = ", ".join(f"{x:g}" for x in snaps[-1].lengths)
        console.print(f"{run}: {len(snaps)} snapshots of the lengths {tracked}, steps {snaps[0].step} to "
                      f"{snaps[-1].step}; `ddpm ema {shlex.quote(str(run))} --length L` makes a checkpoint of length L",
                      markup=False, soft_wrap=True)
        return
    at = step if step is not None else (snaps[-1].step if snaps else 0)
    paths = {length: out or posthoc_ema.default_output(run, length, at) for length in lengths}
    same = [length for length in lengths if list(paths.values()).count(paths[length]) > 1]
    if same:  # default names keep 6 significant digits: the second average would replace the first
        raise UsageError(f"--length {same[0]!r} and {same[1]!r} would both write {paths[same[0]]}; give lengths "
                         f"that differ within 6 significant digits")
    for path in paths.values():  # every output is checked before any is written
        refuse_replacing({"--out": path}, run=run)  # a training checkpoint, a snapshot, config.yaml: its inputs
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it, or --out another path")
    recs = posthoc_ema.reconstruct(run, lengths, step)  # every snapshot read once for all the lengths
    posthoc_ema.save_reconstructions(run, [(rec, paths[rec.length]) for rec in recs])
    for rec in recs:
        length, path = rec.length, paths[rec.length]
        console.print(f"wrote {path} (length {length:g} at step {rec.step}, from {rec.averages} stored averages; "
                      f"profile fit error {rec.fit_error:.2%})", markup=False, soft_wrap=True)
        if rec.fit_error > FIT_WARNING or rec.gain > GAIN_WARNING:
            warn(f"the snapshots resolve length {length:g} poorly (fit error {rec.fit_error:.1%}, weights "
                 f"{rec.gain:.0f}x amplified); choose one nearer the tracked lengths, or train with snapshots more "
                 f"often (train.posthoc_ema_every)")
