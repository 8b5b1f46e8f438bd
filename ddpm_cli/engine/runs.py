"""Run directories: making a new one (and taking it away again when the start fails), the lock one training process
holds on its run, and finding a run's checkpoints, the latest one, and the training-state file beside each."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import time
from pathlib import Path

from ddpm_cli.config import RunConfig
from ddpm_cli.errors import CheckpointError, DdpmError, RunLocked

CKPT_RE = re.compile(r"ckpt-(\d+)\.safetensors$")


# Beside a run's config.yaml: the SHA-256 of the text the run wrote there, so that a resume tells a file edited since
# from the run's own (config_edited).
CONFIG_WRITTEN = ".config.sha256"


# In a run directory: the file whose lock (flock) the process training the run holds, with its pid in it. The OS
# drops the lock when that process ends, however it ends, so a killed run leaves none behind; the file stays.
RUN_LOCK = ".lock"


def lock_run(run_dir: Path, resume: bool = False):
    """Hold RUN's lock for this process, so that no second process trains into the run (a second `ddpm train` with
    its run_name, or a --resume of it, would mix their checkpoints); release it with release_run. Raises RunLocked
    naming the process that holds it (DdpmError where the folder cannot be written). Returns the open lock file, or None where the OS has no flock (no lock)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(Path(run_dir) / RUN_LOCK, "a+")
    except OSError as e:
        raise DdpmError(f"cannot write to run directory {run_dir}: {e.strerror}; "
                        + ("resume a copy of the run in a writable folder" if resume else
                           "set logging.run_dir to a writable folder")) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        holder = f"another process (pid {pid})" if pid.isdigit() else "another process"
        raise RunLocked(f"{holder} is training in {run_dir}; "
                        + ("wait for it to end or stop it, then resume" if resume else
                           "choose another logging.run_name, or wait for it to end or stop it")) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def release_run(lock) -> None:
    if lock is not None:
        lock.close()


def check_run_free(run_dir: Path, resume: bool = False) -> None:
    """Refuse as lock_run does while another process trains in RUN, holding nothing (the trainer locks it); a
    folder without the lock file (no run of this ddpm has trained there) is left without one."""
    if (Path(run_dir) / RUN_LOCK).is_file():
        release_run(lock_run(run_dir, resume))


def config_edited(run_dir: str | Path) -> bool | None:
    """Whether RUN/config.yaml differs from what the run last wrote there; None when that is unknown (a run of an
    older ddpm, or either file missing)."""
    run_dir = Path(run_dir)
    try:
        written = (run_dir / CONFIG_WRITTEN).read_text().strip()
        now = hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    except OSError:
        return None
    return now != written


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` goes (rank 0 writes it; the other ranks of a run name it from here)."""
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:08d}.safetensors"


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


def run_folder(path: str | Path) -> Path:
    """A run directory as given, or the run of its checkpoints/ folder (given by tab completion, or `.` from in
    it)."""
    p = Path(path)
    real = p.resolve()
    return real.parent if real.name == "checkpoints" and not list_checkpoints(real) and list_checkpoints(real.parent) \
        else p


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (or its checkpoints/ folder) -> its latest checkpoint."""
    p = run_folder(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise no_checkpoints_error(p)
        return found
    return p


def holds_snapshots(folder: Path) -> bool:
    """Whether `folder` holds post-hoc EMA snapshots (a run's ema/ folder: engine/posthoc_ema.py)."""
    return any(Path(folder).glob("snapshot-*.safetensors"))


def snapshot_error(p: Path, folder: bool = False) -> CheckpointError:
    """The refusal of a post-hoc EMA snapshot (or the ema/ folder of them) where a checkpoint goes: snapshots are
    running averages without the run's config, and `ddpm ema` makes a checkpoint of any length from them."""
    ema = p if folder else p.parent
    if ema.name != "ema":  # named from inside the folder ("." or "")
        ema = ema.resolve()
    run = shlex.quote(str(ema.parent)) if ema.name == "ema" else "RUN"
    what = "a folder of post-hoc EMA snapshots" if folder else "a post-hoc EMA snapshot"
    return CheckpointError(f"{p} is {what} (train.posthoc_ema's averages), not a checkpoint; make a checkpoint of "
                           f"them with `ddpm ema {run} --length L -o out.safetensors` and pass that")


def diffusers_model(p: Path) -> Path | None:
    """The diffusers model folder (a DDPMPipeline's or a UNet2DModel's: what `ddpm import` reads) that `p` is, or
    whose weights file (diffusion_pytorch_model*.safetensors) `p` is; None when it is neither."""
    p = Path(p)
    if p.is_dir():
        unet = (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*"))
        return p if unet or (p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file() else None
    if not (p.name.startswith("diffusion_pytorch_model") and (p.parent / "config.json").is_file()):
        return None
    pipeline = p.parent.parent if p.parent.name == "unet" else None  # "unet" of "." names nothing: p.parent, as given
    return pipeline if pipeline is not None and (pipeline / "model_index.json").is_file() else p.parent


def diffusers_error(p: Path, folder: Path) -> CheckpointError:
    """The refusal of a diffusers model (its folder, or its weights, `p`) where a ddpm checkpoint goes."""
    what = "model folder" if p.is_dir() else "model's weights"
    return CheckpointError(f"{p} is a diffusers {what}, not a ddpm checkpoint; make a checkpoint of it with `ddpm "
                           f"import {shlex.quote(str(folder))}` and pass the .safetensors file it writes")


def no_checkpoints_error(p: Path) -> CheckpointError:
    """A folder given for a run that holds no checkpoints: what it holds instead, where ddpm can tell."""
    if holds_snapshots(p):
        return snapshot_error(p, folder=True)
    if (folder := diffusers_model(p)) is not None:
        return diffusers_error(p, folder)
    return CheckpointError(f"{p} holds no checkpoints (looked for checkpoints/ckpt-*.safetensors); pass a run "
                           f"directory of `ddpm train` or a .safetensors file")


def state_path(weights: Path) -> Path:
    """The training-state file that sits beside a weights checkpoint."""
    return weights.with_name(weights.name.replace(".safetensors", ".state.safetensors"))


def is_training_checkpoint(path: Path) -> bool:
    """Whether `path` is half of a training checkpoint: weights with a training state beside them, or the state.
    Nothing replaces one (an export, a sample's output, the API's save): its run would resume from other weights,
    or lose its optimizer state."""
    return path.name.endswith(".state.safetensors") or (
        path.name.endswith(".safetensors") and state_path(path).exists())


def default_run_name(hint: str | None) -> str:
    return f"{hint or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(cfg: RunConfig, name_hint: str | None, created: list[Path] | None = None) -> Path:
    """The new run's directory, made and checked writable; the folders it had to make are added to `created`
    (outermost first), so that a start that fails after this can take them away again."""
    base = Path(cfg.logging.run_dir).expanduser()
    name = cfg.logging.run_name or default_run_name(name_hint)
    run_dir = base / name
    if cfg.logging.run_name and run_dir.is_dir():
        check_run_free(run_dir)  # first: while another process trains there, that is what to say
        if list_checkpoints(run_dir):
            raise DdpmError(f"run directory {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
                            f"or choose another logging.run_name")
        # A new run would write among what is there (after an old run's metrics.jsonl, over a config.yaml of the
        # user's): only an empty folder, or one that holds what a start that stopped before its first step wrote, is
        # used.
        try:
            only_a_start = _holds_only_a_start(run_dir)
        except OSError as e:
            raise DdpmError(f"cannot read run directory {run_dir}: {e.strerror}; choose another "
                            f"logging.run_name") from None
        if not only_a_start:
            raise DdpmError(f"run directory {run_dir} already holds files but no checkpoint; remove them (or the "
                            f"folder) to start the run there, or choose another logging.run_name")
    suffix = 1
    while not cfg.logging.run_name and run_dir.exists():
        run_dir = base / f"{name}-{suffix}"
        suffix += 1
    if created is not None:
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        created.extend(reversed(missing))
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DdpmError(f"cannot write to run directory {run_dir}: {e.strerror}; set logging.run_dir to a "
                        f"writable folder") from None
    return run_dir


def remove_new_dirs(created: list[Path]) -> None:
    """Take away the folders a failed start made (outermost first in `created`): the run directory with what the
    start wrote in it, and each parent it made that is empty after that. Nothing that was there before is touched."""
    import shutil

    if not created:
        return
    shutil.rmtree(created[-1], ignore_errors=True)
    _remove_empty_parents(created)


def _remove_empty_parents(created: list[Path]) -> None:
    for d in reversed(created[:-1]):
        try:
            d.rmdir()
        except OSError:
            return  # not empty: someone else's files


def _holds_only_a_start(run_dir: Path) -> bool:
    """Whether RUN holds no more than a start writes before the first step: config.yaml as written, an empty
    metrics.jsonl, empty checkpoints/ and samples/, the lock file (raises OSError where RUN cannot be read)."""
    for p in run_dir.iterdir():
        if p.is_symlink():
            return False
        if p.name in ("checkpoints", "samples") and p.is_dir() and not any(p.iterdir()):
            continue
        if p.name == "metrics.jsonl" and p.is_file() and p.stat().st_size == 0:
            continue
        if p.name in ("config.yaml", CONFIG_WRITTEN, RUN_LOCK) and p.is_file():
            continue
        return False
    # a config.yaml without the digest a run writes beside it is someone else's
    return config_edited(run_dir) is False or not (run_dir / "config.yaml").exists()


def remove_unstarted_run(created: list[Path]) -> bool:
    """Take away the run directory a new run made (and the parents it made, as remove_new_dirs does) when the run
    stopped or failed before its first step, if it holds only what the start wrote: config.yaml as written (the
    command that made it makes it again), an empty metrics.jsonl, empty checkpoints/ and samples/, the lock file.
    Anything else in it (a file of the user's, a wandb run) keeps the whole folder. Returns whether it was taken
    away."""
    if not created:
        return False
    run_dir = created[-1]
    try:
        entries = list(run_dir.iterdir())
        if not _holds_only_a_start(run_dir):
            return False
        for p in entries:
            p.rmdir() if p.is_dir() else p.unlink()
        run_dir.rmdir()  # (not rmtree: a file that came in meanwhile stays, and its folder with it)
    except OSError:
        return False
    _remove_empty_parents(created)
    return True
