"""Run-directory discovery: a run's checkpoints, the latest one, and the training-state file beside each."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ddpm_cli.errors import CheckpointError

CKPT_RE = re.compile(r"ckpt-(\d+)\.safetensors$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's weight checkpoints, oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = [p for p in ckpt_dir.glob("ckpt-*.safetensors") if CKPT_RE.search(p.name)] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.search(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest.json` points at (written last, so it names a complete file), else the newest."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest.json"
    if pointer.exists():
        try:
            target = run_dir / json.loads(pointer.read_text())["weights"]
            if target.exists():
                return target
        except (ValueError, KeyError, TypeError, OSError):
            pass
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory -> its latest checkpoint."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p} holds no checkpoints (looked for checkpoints/ckpt-*.safetensors); "
                                  f"pass a run directory of `ddpm train` or a .safetensors file")
        return found
    return p


def state_path(weights: Path) -> Path:
    """The training-state file that sits beside a weights checkpoint."""
    return weights.with_name(weights.name.replace(".safetensors", ".state.safetensors"))
