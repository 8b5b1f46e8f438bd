"""What a training run draws and measures of itself as it goes: its loss and non-finite steps between log lines,
its sample grids, the held-out loss of early stopping, the in-training FID, and the time its closing grid will
take (for train.max_time)."""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from ddpm_cli.config import RunConfig
from ddpm_cli.diffusion.gaussian import GaussianDiffusion
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine.data import ImageSet, to_model_range
from ddpm_cli.engine.generate import generate


class StepStats:
    """The steps since the last log line, counted on the device so that a step never waits for the GPU: the
    summed loss of the finite steps, their number, the non-finite steps, the longest run of them in a row and
    the last one. `read()` syncs once and starts the next interval."""

    def __init__(self, device: torch.device, state: list[float] | None = None):
        """`state`: a checkpoint's (state_dict), so that a resumed run's first log line counts the steps before it."""
        values = state if state is not None and len(state) == 6 else [0.0] * 6
        self.loss, self.good, self.nonfinite, self.bad_run, self.max_bad_run, self.last_bad = (
            torch.tensor(float(v), device=device) for v in values)

    def state_dict(self) -> list[float]:
        """The interval so far, for a checkpoint (syncs once)."""
        return torch.stack([self.loss, self.good, self.nonfinite, self.bad_run, self.max_bad_run,
                            self.last_bad]).tolist()

    def add(self, loss: torch.Tensor, bad: torch.Tensor, step: int) -> None:
        self.loss += torch.where(bad, 0.0, loss.detach().float())
        self.good += (~bad).float()
        self.bad_run = (self.bad_run + 1) * bad.float()
        self.max_bad_run = torch.maximum(self.max_bad_run, self.bad_run)
        self.nonfinite += bad.float()
        self.last_bad = torch.where(bad, float(step), self.last_bad)

    def read(self, grad_norm: torch.Tensor) -> tuple[float | None, float, int, int, int]:
        """(mean finite loss or None, grad_norm, non-finite steps, longest run of them, the last one's step)."""
        loss, good, gn, bad, run, last = torch.stack([self.loss, self.good, grad_norm.float(), self.nonfinite,
                                                      self.max_bad_run, self.last_bad]).tolist()
        for t in (self.loss, self.good, self.nonfinite, self.max_bad_run):
            t.zero_()
        return (loss / good if good else None), gn, int(bad), int(run), int(last)


def _amp(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def grid_plan(cfg: RunConfig) -> tuple[int, torch.Tensor | None, int, bool]:
    """The sample grid: (images, labels or None, images a row, whether it runs the full ancestral sampler)."""
    m, n = cfg.model, cfg.logging.sample_count
    labels, nrow = None, max(1, int(math.sqrt(n)))
    if m.conditional:
        per = max(1, n // m.num_classes)
        labels = torch.arange(m.num_classes).repeat_interleave(per)
        n, nrow = len(labels), per
    return n, labels, nrow, cfg.logging.sample_steps >= cfg.diffusion.num_timesteps


@torch.no_grad()
def draw_grid(net: torch.nn.Module, diffusion: GaussianDiffusion, cfg: RunConfig, path: Path,
              device: torch.device, bf16: bool, on_step: Callable[[int, int], None] | None = None) -> Path:
    """The grid of `logging.sample_count` images (a row per class when conditional), drawn by `net` in eval mode,
    written as `ddpm sample --grid` writes one (gray stays gray, alpha stays). `on_step`: the sampler's progress
    callback (what it raises ends the drawing, and nothing is written)."""
    from ddpm_cli.engine.sampling import tile, write_png

    m = cfg.model
    was_training = net.training
    net.eval()
    n, labels, nrow, full = grid_plan(cfg)
    spec = SamplerSpec("ddpm" if full else "ddim", cfg.logging.sample_steps, variance=cfg.diffusion.variance)
    try:
        images = [batch for _, batch, _ in generate(
            net, diffusion, n, spec, image_shape=m.image_shape(), labels=labels, batch_size=max(n, 1),
            seed=cfg.train.seed, guidance=cfg.logging.sample_guidance if m.conditional else 1.0,
            null_class=m.num_classes, device=device, bf16=bf16, on_step=on_step)]
    finally:
        net.train(was_training)
    batch = torch.cat(images).numpy()
    write_png(path, tile(batch, [list(range(i, min(len(batch), i + nrow))) for i in range(0, len(batch), nrow)]))
    return path


def seconds_per_call(call: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """`call`'s seconds on `device`, timed over `repeat` calls after a first one (which pays for cuDNN's algorithm
    search and lazy initialisation)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    call()
    sync()
    t0 = time.monotonic()
    for _ in range(repeat):
        call()
    sync()
    return (time.monotonic() - t0) / repeat


@torch.no_grad()
def grid_seconds(net: torch.nn.Module, diffusion: GaussianDiffusion, cfg: RunConfig, device: torch.device,
                 bf16: bool) -> float:
    """How long draw_grid will take: one network evaluation of its batch, timed, times the sampler's steps."""
    n, labels, _, full = grid_plan(cfg)
    m = cfg.model
    was_training = net.training
    net.eval()
    # its own generator: the run's random stream must not depend on when the cost was timed (a resumed run times
    # it after its own first step, an uninterrupted one once, and a resume would be exact no more)
    x = torch.randn(n, *m.image_shape(), device=device, generator=torch.Generator(device=device).manual_seed(0))
    t = torch.full((n,), diffusion.num_timesteps - 1, device=device)
    y = labels.to(device) if labels is not None else None
    try:
        with _amp(device, bf16):
            forward_s = seconds_per_call(lambda: net(x, t, y), device, repeat=2)
    finally:
        net.train(was_training)
    steps = cfg.diffusion.num_timesteps if full else cfg.logging.sample_steps
    # the sampler's own arithmetic and the PNG come on top of the network evaluations: a tenth more
    return 1.1 * forward_s * steps


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, diffusion: GaussianDiffusion, val: ImageSet, cfg: RunConfig,
                  device: torch.device, bf16: bool) -> torch.Tensor:
    """Loss on the held-out split with fixed t and noise, so evaluations are comparable (a tensor on `device`)."""
    g = torch.Generator().manual_seed(cfg.train.seed + 999)
    model.eval()
    total, count = torch.zeros((), device=device), 0
    bs = cfg.train.batch_size
    for i in range(0, len(val), bs):
        x0 = to_model_range(val.images[i:i + bs]).to(device)
        y = val.labels[i:i + bs].to(device) if cfg.model.conditional else None
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        with _amp(device, bf16):
            loss = diffusion.loss(model, x0, y, t=t, noise=noise)
        total += loss.float() * x0.shape[0]
        count += x0.shape[0]
    model.train()
    return total / count


def config_names(message: str) -> str:
    """An evaluation error as the run's config names its inputs: `ddpm eval`'s flags become logging's fields."""
    message = message.replace("--inception-weights", "logging.fid_inception_weights")
    return re.sub(r"--ref\b(?!-)", "logging.fid_ref", message)


class InTrainingFid:
    """FID of `logging.fid_samples` samples (DPM-Solver++, fid_steps) against `logging.fid_ref` (default: the
    training images), on the training device; Inception is loaded by check(), before the run, and the reference
    statistics are made at the first call."""

    def __init__(self, cfg: RunConfig, diffusion: GaussianDiffusion, train_images: torch.Tensor,
                 device: torch.device, bf16: bool):
        self.cfg, self.diffusion, self.device, self.bf16 = cfg, diffusion, device, bf16
        self._train_images = train_images
        self._inception = None  # loaded by check(), before the run starts
        self._state = None  # (inception, reference statistics)
        self.last_s: float | None = None  # the last call's seconds, its reference statistics' apart

    def check(self) -> None:
        """Refuse, before the run starts, what the first in-training FID would fail on hours later: Inception that
        cannot be loaded (a weights file that is not there or not torch-fidelity's, or a download offline) or a
        reference that is not there. Named as the config names them, not as `ddpm eval` does."""
        from ddpm_cli.engine.evaluation import inception as ev_inception, sources
        from ddpm_cli.errors import ConfigError, DdpmError

        lc = self.cfg.logging
        refs = sources.CIFAR10_REFS
        if lc.fid_ref is not None and lc.fid_ref not in refs and not Path(lc.fid_ref).expanduser().exists():
            # only that it is there: reading a reference (an .npz of 50,000 images, say) is the first FID's work
            raise ConfigError(f"logging.fid_ref {lc.fid_ref} not found; point it at a folder or .zip of images, an "
                              f".npz of images or statistics (`ddpm eval --save-stats`), {' or '.join(refs)}, or "
                              f"a run config YAML")
        try:
            self._inception = ev_inception.load_inception(lc.fid_inception_weights, self.device)
        except DdpmError as e:
            raise ConfigError(config_names(str(e))) from None

    def __call__(self, net: torch.nn.Module) -> float:
        from ddpm_cli.engine.draw import Drawer
        from ddpm_cli.engine.evaluation import inception as ev_inception, reference, run, sources

        lc, m = self.cfg.logging, self.cfg.model
        t0 = time.monotonic()
        if self._state is None:
            inception = self._inception or ev_inception.load_inception(lc.fid_inception_weights, self.device)
            ref = lc.fid_ref or sources.tensor_source(self._train_images, "the training images")
            self._state = (inception, reference.reference_stats(ref, inception, data_root=self.cfg.data.root,
                                                                use_cache=lc.fid_ref is not None))
            t0 = time.monotonic()  # (a one-off: the next call's cost is the rest)
        inception, ref_stats = self._state
        spec = SamplerSpec("dpm++2m", lc.fid_steps, variance=self.cfg.diffusion.variance)
        drawer = Drawer(net, self.diffusion, spec, m.image_shape(),
                        m.num_classes if m.conditional else None, device=self.device, bf16=self.bf16)
        fid = float(run.fid_of_model(drawer, lc.fid_samples, ref_stats, inception, seed=self.cfg.train.seed).fid)
        self.last_s = time.monotonic() - t0
        return fid

    @torch.no_grad()
    def seconds(self, net: torch.nn.Module) -> float:
        """How long the next call will take (for train.max_time): the last call's time once there was one; before,
        as grid_seconds tells the grid's, a network evaluation and an Inception pass of one batch, timed, times the
        sampler's network evaluations and the batches, plus the reference's Inception pass where it will run (the
        training images, the default; an explicit logging.fid_ref is taken to be statistics or a cache hit)."""
        from ddpm_cli.engine.evaluation import run

        if self.last_s is not None:
            return self.last_s
        lc, m, dev = self.cfg.logging, self.cfg.model, self.device
        b = min(run.BATCH, lc.fid_samples)
        x = torch.randn(b, *m.image_shape(), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        t = torch.full((b,), self.diffusion.num_timesteps - 1, device=dev)
        y = torch.zeros(b, dtype=torch.long, device=dev) if m.conditional else None
        was_training = net.training
        net.eval()
        try:
            with _amp(dev, self.bf16):
                forward_s = seconds_per_call(lambda: net(x, t, y), dev)
        finally:
            net.train(was_training)
        inception = self._state[0] if self._state else self._inception
        images = torch.zeros(b, *m.image_shape(), dtype=torch.uint8)
        per_batch = seconds_per_call(lambda: inception(images), dev) if inception is not None else 0.0
        # the reference's images at the samples' cost an image (its own batches are smaller: timing them too would
        # cost the CPU, where Inception is slow, another two calls)
        reference_n = len(self._train_images) if self._state is None and lc.fid_ref is None else 0
        reference_s = per_batch * reference_n / b
        evaluations = SamplerSpec("dpm++2m", lc.fid_steps).evaluations(self.diffusion.alpha_bar)
        # the sampler's own arithmetic comes on top of the network evaluations: a tenth more, as the grid's
        return 1.1 * math.ceil(lc.fid_samples / b) * (forward_s * evaluations + per_batch) + reference_s
