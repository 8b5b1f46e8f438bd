"""A command's outputs never replace its inputs, `--overwrite` or not: `ddpm sample CKPT --grid CKPT --overwrite`
would otherwise write a PNG over the checkpoint it has just sampled, and `ddpm export CKPT -o CKPT --overwrite`
a slimmer file over the training run's weights. --overwrite is for earlier outputs, never for the sources."""
from __future__ import annotations

import os
from pathlib import Path

from ddpm_cli.errors import UsageError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing: nothing there to lose
        return False


def refuse_replacing_inputs(outputs: dict[str, Path | None], inputs: list[str | Path | None]) -> None:
    """UsageError (exit 2) when an output would be written over one of the inputs (the same file, links
    followed). `outputs` maps each output's option (for the message) to its path; None entries are skipped."""
    sources = [Path(p) for p in inputs if p is not None]
    for option, out in outputs.items():
        if out is None:
            continue
        for src in sources:
            if _same_file(out, src):
                raise UsageError(f"{option} {out} is this command's input {src}: an output never replaces an "
                                 f"input, --overwrite or not; choose another {option}")
