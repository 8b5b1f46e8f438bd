"""What a command may write over: its earlier outputs, with --overwrite; never its inputs, a training checkpoint
or a run's own files, --overwrite or not. `ddpm sample CKPT --grid CKPT --overwrite` would otherwise write a PNG
over the checkpoint it has just sampled, and `ddpm export RUN -o RUN/latest.json --overwrite` break the run. And
a file output is never given a folder's name (out/)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ddpm_cli.errors import UsageError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing: nothing there to lose
        return False


PATH_METAVAR = "<path>"  # how Typer shows a Path option, for the outputs taken as text (output_path)


def output_path(option: str, text: str | None, file_named: str | None = None) -> Path | None:
    """An output's path as typed, as a Path (None stays None). The option is taken as text, not as a Path, since
    Path drops a trailing separator (Path("out/") is Path("out")): `--grid out/`, for a folder not made yet, wrote
    a file named out. So a file output (`file_named`: an example of its name, for the message) that names a folder
    (out/, out/., ..) is a UsageError (exit 2), found before any work."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError(f"{option} is empty; give a path")
    if file_named is not None and os.path.basename(text) in ("", ".", ".."):
        raise UsageError(f"{option} {text} names a folder, where a file is to be written; give a file name, such "
                         f"as {os.path.join(text, file_named)}")
    return Path(text)


def run_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file sits in (RUN/checkpoints/ckpt-N.safetensors), else None."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


def run_holding(path: Path) -> Path | None:
    """The run directory `path` lies in (a folder holding config.yaml and checkpoints/, up to two folders above
    `path`: its own files, checkpoints/, samples/ and ema/ are no deeper), else None."""
    for folder in list(path.resolve().parents)[:3]:
        if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            return folder
    return None


# What `ddpm train` writes at the top of a run's folder, besides its checkpoints, its sample grids (samples/step_*)
# and its post-hoc EMA snapshots (ema/snapshot-*); any other file there (an export beside a checkpoint, a grid, an
# average of `ddpm ema`) is the user's.
RUN_FILES = ("config.yaml", "config.edited.yaml", ".config.sha256", "latest.json", "metrics.jsonl", "loss.png")
TRAINING_CHECKPOINT = re.compile(r"ckpt-\d+(\.state)?\.safetensors")  # an export beside one is the user's


def is_run_file(run: Path, path: Path) -> bool:
    """Whether `path` is a file that training wrote in `run` (a checkpoint, a training sample grid, a snapshot,
    the run's config, metrics or pointer)."""
    from ddpm_cli.engine.posthoc_ema import snapshot_folder

    path, run = path.resolve(), run.resolve()
    if run not in path.parents:
        return False
    *folder, name = path.relative_to(run).parts
    if not folder:
        return name in RUN_FILES
    if folder == ["checkpoints"]:
        return TRAINING_CHECKPOINT.fullmatch(name) is not None
    if folder == ["samples"]:
        return name.startswith("step_")  # the grids training draws
    return path.parent == snapshot_folder(run).resolve() and name.startswith("snapshot-")


def refuse_replacing(outputs: dict[str, Path | None], inputs: list[str | Path | None] = (),
                     run: Path | None = None, files: bool = True) -> None:
    """UsageError (exit 2) when an output would be written over one of the inputs (the same file, links
    followed), a training checkpoint, or an existing file of `run` or of the run the output lands in; or, for
    outputs that are `files`, when it is a folder (found only at the end otherwise, after the work). `outputs` maps
    each output's option (for the message) to its path; None entries are skipped."""
    from ddpm_cli.engine.runs import is_training_checkpoint

    sources = [Path(p) for p in inputs if p is not None]
    for option, out in outputs.items():
        if out is None:
            continue
        if files and out.is_dir():
            raise UsageError(f"{option} {out} is a folder, where a file is to be written; give a file's path "
                             f"(one inside it, say)")
        above = next((p for p in out.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise UsageError(f"{option} {out}: {above} is a file, not a folder; choose another {option}")
        for src in sources:
            if _same_file(out, src):
                raise UsageError(f"{option} {out} is this command's input {src}: an output never replaces an "
                                 f"input, --overwrite or not; choose another {option}")
        if is_training_checkpoint(out):  # a resume would go on from other weights, or lose its optimizer state
            raise UsageError(f"{option} {out} is part of a training checkpoint (weights with their training "
                             f"state), which no output replaces; choose another {option}")
        if any(is_run_file(r, out) for r in (run, run_holding(out)) if r is not None):
            # a snapshot, latest.json, config.yaml: of the command's run or of the one the output lands in; a new
            # file so named too, which the run would then read as its own (a snapshot it refuses, a checkpoint
            # to resume from)
            raise UsageError(f"{option} {out} is one of the run's own files, which no output replaces; choose "
                             f"another {option}")
