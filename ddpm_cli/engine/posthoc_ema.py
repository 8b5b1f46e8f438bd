"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", section
3): training keeps power-function averages of the weights at a few relative lengths (train.posthoc_ema) and
writes snapshots of them under RUN/ema/; after training, the average of any other length at a snapshot's step is
the least-squares combination of the snapshots whose averaging profiles best match its own (`ddpm ema`).

A power-function average at step t weighs the weights of step s <= t by s^gamma: normalised over the run so far,
its profile is p(s) = (gamma + 1) s^gamma / t^(gamma + 1). Its relative length is the profile's standard deviation
over t, sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): 0.2887 for gamma = 0 (the plain mean of every step),
shrinking as gamma grows. The update that keeps it is avg <- avg + (1 - beta_t) (weights - avg) with
beta_t = (1 - 1/t)^(gamma + 1); unlike a fixed decay it needs no warm-up, since the first step is a copy.

The snapshot file (safetensors): tensors avg0.*, avg1.*, ... (one per tracked length, in the config's order);
metadata format, kind "posthoc-ema-snapshot", step, images_seen, lengths and exponents (JSON lists). No torch import
at module level: `ddpm inspect` lists a run's snapshots from their headers without it."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_cli.config.schema import POSTHOC_EMA_LENGTHS
from ddpm_cli.engine.checkpoint import FORMAT, FORMAT_VERSION, read_header, read_tensors, write_tensors
from ddpm_cli.errors import CheckpointError

if TYPE_CHECKING:
    import torch

MIN_LENGTH, MAX_LENGTH = POSTHOC_EMA_LENGTHS
SNAPSHOT_KIND = "posthoc-ema-snapshot"
SNAPSHOT_RE = re.compile(r"snapshot-(\d{8,})\.safetensors$")


def relative_length(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent `gamma`."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def exponent(length: float) -> float:
    """The exponent gamma >= 0 whose profile has this relative length (in [MIN_LENGTH, MAX_LENGTH]); bisection,
    since the length falls monotonically as gamma grows."""
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"a post-hoc EMA length must be in [{MIN_LENGTH}, {MAX_LENGTH}] (got {length})")
    lo, hi = 0.0, 1.0
    while relative_length(hi) > length:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if relative_length(mid) > length else (lo, mid)
    return (lo + hi) / 2


def snapshot_folder(run_dir: Path) -> Path:
    return Path(run_dir) / "ema"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return snapshot_folder(run_dir) / f"snapshot-{step:08d}.safetensors"


# -- during training ---------------------------------------------------------------------------------------------

class PosthocEMA:
    """The tracked power-function averages of `model`'s parameters, one per relative length; rank 0 keeps them."""

    def __init__(self, model: torch.nn.Module, lengths: tuple[float, ...]):
        import torch

        self.lengths = tuple(lengths)
        self.exponents = [exponent(length) for length in self.lengths]
        self.averages = [[p.detach().clone() for p in model.parameters()] for _ in self.lengths]
        self._names = [name for name, _ in model.named_parameters()]
        self._torch = torch
        self._source, self._listed = None, []

    @property
    def copies(self) -> int:
        return len(self.lengths)

    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after optimizer step number `step` (counting from 1)."""
        if model is not self._source:  # listed once per model, as EMA._params does and for the same reason
            self._source, self._listed = model, list(model.parameters())
        params = self._listed
        with self._torch.no_grad():
            for avg, gamma in zip(self.averages, self.exponents):
                beta = (1.0 - 1.0 / step) ** (gamma + 1.0)
                self._torch._foreach_lerp_(avg, params, 1.0 - beta)

    def save(self, run_dir: Path, step: int, images_seen: int) -> Path:
        """Write the averages of this step as RUN/ema/snapshot-STEP.safetensors (atomically)."""
        path = snapshot_path(run_dir, step)
        path.parent.mkdir(exist_ok=True)
        tensors = {f"avg{i}.{name}": t for i, avg in enumerate(self.averages) for name, t in zip(self._names, avg)}
        write_tensors(path, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                      "kind": SNAPSHOT_KIND, "step": str(step), "images_seen": str(images_seen),
                                      "lengths": json.dumps(list(self.lengths)),
                                      "exponents": json.dumps(self.exponents)})
        return path

    def restore(self, run_dir: Path, step: int) -> None:
        """Put the averages back to the snapshot written with the checkpoint of `step` (an exact resume)."""
        path = snapshot_path(run_dir, step)
        if not path.exists():
            raise CheckpointError(f"{path} is missing: a run that tracks train.posthoc_ema resumes from the "
                                  f"snapshot written with its checkpoint; resume from a checkpoint that has one, "
                                  f"or without it: --set train.posthoc_ema=[]")
        snap = read_snapshot(path)
        if tuple(snap.lengths) != self.lengths:
            raise CheckpointError(f"train.posthoc_ema is {list(self.lengths)} but the run tracked "
                                  f"{snap.lengths}; resume with --set train.posthoc_ema='{snap.lengths}'")
        tensors = read_tensors(path)
        with self._torch.no_grad():
            for i, avg in enumerate(self.averages):
                for name, t in zip(self._names, avg):
                    t.copy_(tensors[f"avg{i}.{name}"])

    @staticmethod
    def drop_after(run_dir: Path, step: int) -> int:
        """Remove the snapshots after `step`: they belong to the continuation a resume from `step` replaces, and a
        reconstruction must not mix the two (metrics.jsonl is cut back the same way). Returns how many went."""
        later = [s for s in list_snapshots(run_dir) if s.step > step]
        for s in later:
            s.path.unlink(missing_ok=True)
        return len(later)


# -- after training ----------------------------------------------------------------------------------------------

@dataclass
class Snapshot:
    path: Path
    step: int
    images_seen: int
    lengths: list[float]
    exponents: list[float]


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot's metadata (header only)."""
    try:
        meta = read_header(path).metadata
    except CheckpointError as e:
        raise CheckpointError(f"a post-hoc EMA snapshot is damaged ({e}); move {Path(path).name} out of "
                              f"{Path(path).parent} (the others still reconstruct)") from None
    try:
        if meta.get("kind") != SNAPSHOT_KIND:
            raise ValueError
        snap = Snapshot(Path(path), int(meta["step"]), int(meta.get("images_seen", 0)),
                        [float(x) for x in json.loads(meta["lengths"])],
                        [float(x) for x in json.loads(meta["exponents"])])
        if snap.step < 1 or not snap.lengths or len(snap.lengths) != len(snap.exponents):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path} is not a post-hoc EMA snapshot of ddpm's (unreadable metadata); move it "
                              f"out of the run's ema/ folder") from None
    return snap


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's snapshots, by step."""
    folder = snapshot_folder(run_dir)
    found = sorted(p for p in folder.glob("snapshot-*.safetensors") if SNAPSHOT_RE.search(p.name)) \
        if folder.is_dir() else []
    return sorted((read_snapshot(p) for p in found), key=lambda s: s.step)


def _gram(a: list[tuple[float, float]], b: list[tuple[float, float]]):
    """Inner products of normalised power-function profiles (gamma, t) over (0, inf): the profile of (gamma, t)
    is (gamma + 1) s^gamma / t^(gamma + 1) on (0, t]. Computed in logs, since t^(gamma + 1) overflows."""
    import numpy as np

    out = np.empty((len(a), len(b)))
    for i, (gi, ti) in enumerate(a):
        for j, (gj, tj) in enumerate(b):
            m = min(ti, tj)
            log = (gi + gj + 1) * math.log(m) - (gi + 1) * math.log(ti) - (gj + 1) * math.log(tj)
            out[i, j] = (gi + 1) * (gj + 1) / (gi + gj + 1) * math.exp(log)
    return out


def combination(bases: list[tuple[float, float]], target: tuple[float, float]) -> tuple[list[float], float]:
    """Weights x of the bases' profiles whose sum best matches the target profile (least squares over the
    steps), scaled to sum to 1 so that the result is an average of the weights, not a shrunk one; and the
    relative error of that match, ||sum x_i p_i - p|| / ||p||. Steps are scaled by the target's, which keeps the
    numbers near 1."""
    import numpy as np

    scale = target[1]
    bases = [(g, t / scale) for g, t in bases]
    target = (target[0], 1.0)
    a, b = _gram(bases, bases), _gram(bases, [target])[:, 0]
    c = _gram([target], [target])[0, 0]
    x = np.linalg.lstsq(a, b, rcond=1e-12)[0]
    x = x / x.sum()
    err2 = float(x @ a @ x - 2 * x @ b + c)
    return [float(v) for v in x], math.sqrt(max(err2, 0.0) / c)


@dataclass
class Reconstruction:
    weights: dict[str, torch.Tensor]  # parameter name -> the average of the requested length (float32, CPU)
    length: float
    step: int
    images_seen: int
    averages: int  # the stored averages it combines
    fit_error: float  # relative error of the profile match (see combination)
    gain: float  # sum of |x|: how much the snapshots' own rounding is amplified (1 for a plain average)


def reconstruct(run_dir: Path, lengths: list[float], step: int | None = None) -> list[Reconstruction]:
    """The averages of the relative `lengths` at snapshot step `step` (default: the last), each from every stored
    average of that step or before. Each snapshot is read once, whatever the number of lengths."""
    import torch

    snaps = list_snapshots(run_dir)
    if not snaps:
        raise CheckpointError(f"{snapshot_folder(run_dir)} holds no post-hoc EMA snapshots; train with --set "
                              f"train.posthoc_ema='[0.05, 0.1]' to keep them")
    steps = [s.step for s in snaps]
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"{run_dir} has no post-hoc EMA snapshot at step {step}; it has steps "
                              f"{', '.join(map(str, steps))}")
    used = [s for s in snaps if s.step <= step]
    bases = [(g, float(s.step)) for s in used for g in s.exponents]
    fits = [combination(bases, (exponent(length), float(step))) for length in lengths]
    totals: list[dict[str, torch.Tensor]] = [{} for _ in lengths]
    first = 0  # the index in `bases` of this snapshot's first average
    for s in used:
        for key, t in read_tensors(s.path).items():
            avg, name = key.split(".", 1)  # avg{i}.{parameter}
            t = t.to(torch.float64)
            for total, (x, _) in zip(totals, fits):
                term = t * x[first + int(avg[3:])]
                total[name] = total[name] + term if name in total else term
        first += len(s.exponents)
    images_seen = next(s.images_seen for s in used if s.step == step)
    return [Reconstruction({name: t.to(torch.float32) for name, t in total.items()}, length, step, images_seen,
                           len(bases), fit_error, sum(abs(v) for v in x))
            for length, total, (x, fit_error) in zip(lengths, totals, fits)]


def default_output(run_dir: Path, length: float, step: int) -> Path:
    return snapshot_folder(run_dir) / f"ckpt-{step:08d}-length{length:g}.safetensors"


def save_reconstructions(run_dir: Path, outputs: list[tuple[Reconstruction, Path]]) -> None:
    """Sampling checkpoints of reconstructed averages, one file each: the weights as the model's (no EMA of their
    own), with the config, classes and autoguidance guide of the run's checkpoint at their step (or its latest:
    their config is the run's), so `ddpm sample`, `eval` and `export` take them as they take any checkpoint."""
    from ddpm_cli.engine.checkpoint import load_checkpoint, weights_metadata
    from ddpm_cli.engine.runs import checkpoint_path, latest_checkpoint, list_checkpoints

    if not outputs:
        return
    step = outputs[0][0].step  # one step for all: reconstruct's
    same_step = [p for p in list_checkpoints(run_dir) if p.name == checkpoint_path(run_dir, step).name]
    template = same_step[0] if same_step else latest_checkpoint(run_dir)
    if template is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint to take the config from (checkpoints/); the "
                              f"snapshots alone cannot rebuild the network")
    ck = load_checkpoint(template)
    guide = ck.guide_state is not None and ck.guide_step <= step  # the guide of a later step is no guide here
    for rec, out in outputs:
        state = {**ck.model_state, **rec.weights}  # buffers, if the network has any, from the checkpoint
        tensors = {f"model.{k}": v for k, v in state.items()}
        meta = weights_metadata(ck.config, rec.step, rec.images_seen, sum(v.numel() for v in rec.weights.values()),
                                has_ema=False, classes=ck.classes, kind="posthoc-ema")
        meta.update(source_weights="post-hoc EMA", exported_from=Path(run_dir).resolve().name,
                    posthoc_ema=json.dumps({"length": rec.length, "step": rec.step, "averages": rec.averages,
                                            "fit_error": rec.fit_error}))
        if guide:
            meta["guide_step"] = str(ck.guide_step)
            tensors.update({f"guide.{k}": v for k, v in ck.guide_state.items()})
        out.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(out, tensors, meta)
