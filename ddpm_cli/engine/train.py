"""The training loop: data -> loss -> clipped optimizer step -> EMA, with checkpoints, sample grids, metrics,
early stopping, exact resume and clean stops. Never prints: progress goes to `TrainCallbacks`.

The step issues no host synchronisation: losses, gradient norms and non-finite counts accumulate on the device
and are read once per `logging.log_every` steps."""
from __future__ import annotations

import errno
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cli.config import RunConfig, config_to_dict
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine import checkpoint as ckpt_io
from ddpm_cli.engine.build import (build_diffusion, build_unet, compile_mode, compile_options, count_params,
                                   force_channels_last_graph, grad_sync, resolve_device, use_bf16, use_channel_stats,
                                   use_channels_last)
from ddpm_cli.engine.data import Batcher, ImageSet, load_dataset, split_holdout, to_model_range
from ddpm_cli.engine.distributed import DistInfo
from ddpm_cli.engine.ema import EMA
from ddpm_cli.engine.generate import generate
from ddpm_cli.engine.files import atomic_write_bytes
from ddpm_cli.engine.runs import list_checkpoints, state_path
from ddpm_cli.engine.metrics import MetricsLog, WandbSink, keep_metrics_until, plot_loss_curve, read_metrics
from ddpm_cli.errors import DdpmError, TrainingAborted
from ddpm_cli.nn.unet import channel_stats

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class TrainCallbacks:
    """Progress hooks; the CLI renders them. Every method may be left as the no-op."""

    def on_start(self, info: dict) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_log(self, record: dict) -> None: ...
    def on_message(self, text: str) -> None: ...


@dataclass
class StopFlag:
    """Set by a signal handler (the CLI's); the loop finishes its step, checkpoints and stops."""

    signum: int = 0
    count: int = 0

    def request(self, signum: int) -> None:
        self.signum, self.count = signum, self.count + 1


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    stop_reason: str
    checkpoint: Path | None
    elapsed_s: float
    compile_s: float = 0.0
    last_loss: float | None = None
    first_loss: float | None = None
    metrics: list = field(default_factory=list)


def default_run_name(hint: str | None) -> str:
    return f"{hint or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(cfg: RunConfig, name_hint: str | None, created: list[Path] | None = None) -> Path:
    """The new run's directory, made and checked writable; the folders it had to make are added to `created`
    (outermost first), so that a start that fails after this can take them away again."""
    base = Path(cfg.logging.run_dir).expanduser()
    name = cfg.logging.run_name or default_run_name(name_hint)
    run_dir = base / name
    if cfg.logging.run_name and list_checkpoints(run_dir):
        raise DdpmError(f"run directory {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
                        f"or choose another logging.run_name")
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


_SIGNALLED = 100  # a stop flag above this carries the signal's number


def peak_lr(cfg: RunConfig, world: int = 1) -> float:
    """train.lr, scaled by train.lr_scaling for the global batch (batch_size x ranks) against train.lr_batch."""
    tc = cfg.train
    ratio = tc.batch_size * world / tc.lr_batch
    return tc.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[tc.lr_scaling]


def _lr_at(cfg: RunConfig, step: int, peak: float) -> float:
    warm = cfg.train.warmup_steps
    return peak * (min(1.0, (step + 1) / warm) if warm else 1.0)


class TimeBudget:
    """When `train.max_time` ends the run: before a step that would finish past the budget, the closing
    checkpoint and sample grid counted in, so the whole run ends within about one step of it (the first,
    compiling step included: it cannot be cut, and the run stops right after it when it overran).

    On CUDA the host would otherwise queue steps far ahead of the device (a CUDA-graph step is one launch), so
    its clock would say nothing of the work still queued: at most two steps are left in flight, which keeps the
    device fed and the host's clock within a step of the device's."""

    IN_FLIGHT = 2

    def __init__(self, t0: float, max_time: float | None, device: torch.device):
        self.deadline = None if max_time is None else t0 + max_time
        self.cuda = device.type == "cuda"
        self.step_s = 0.0  # a step's duration, smoothed; 0 until one step after the first has finished
        self.grid_s = self.checkpoint_s = 0.0  # the run's closing work: its last sample grid and checkpoint
        self._events: list = []
        self._last: float | None = None

    def step_done(self, first: bool) -> None:
        """Call after each step: bounds the queue and measures the step time."""
        if self.deadline is None:
            return
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self._events.append(event)
            if len(self._events) > self.IN_FLIGHT:
                self._events.pop(0).synchronize()
        now = time.monotonic()
        if self._last is not None and not first:
            took = now - self._last
            self.step_s = took if not self.step_s else 0.8 * self.step_s + 0.2 * took
        self._last = now

    def pause(self) -> None:
        """The next interval holds other work (a checkpoint, a grid, an evaluation): not a step's time."""
        self._last = None

    def up(self, lookahead_steps: int = 1) -> bool:
        """Whether starting `lookahead_steps` more steps would end the run past its budget."""
        if self.deadline is None:
            return False
        closing = self.grid_s + self.checkpoint_s
        return time.monotonic() + lookahead_steps * self.step_s + closing >= self.deadline


def load_optimizer_state(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """Optimizer.load_state_dict, then each moment laid out like its parameter. Checkpoints store tensors
    contiguous, and torch restores a moment's dtype and device but not its strides; CUDA's fused Adam refuses
    moments whose layout differs from a channels-last parameter's."""
    opt.load_state_dict(state_dict)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def remove_new_dirs(created: list[Path]) -> None:
    """Take away the folders a failed start made (outermost first in `created`): the run directory with what the
    start wrote in it, and each parent it made that is empty after that. Nothing that was there before is touched."""
    import shutil

    if not created:
        return
    shutil.rmtree(created[-1], ignore_errors=True)
    for d in reversed(created[:-1]):
        try:
            d.rmdir()
        except OSError:
            return  # not empty: someone else's files


class Trainer:
    def __init__(self, cfg: RunConfig, **kwargs):
        """See _setup for the keyword arguments. A start that fails (bad data, no download, Ctrl-C while loading)
        leaves no empty run directory behind."""
        self._created_dirs: list[Path] = []
        try:
            self._setup(cfg, **kwargs)
        except BaseException:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            remove_new_dirs(self._created_dirs)
            raise

    def _setup(self, cfg: RunConfig, *, resume: Path | None = None,
               callbacks: TrainCallbacks | None = None, stop: StopFlag | None = None,
               name_hint: str | None = None, dataset: ImageSet | None = None):
        self.t0 = time.monotonic()
        self.cfg = cfg
        self.cb = callbacks or TrainCallbacks()
        self.stop = stop or StopFlag()
        self.dist = DistInfo.from_env()
        self.main = self.dist.rank == 0
        if not self.main:
            self.cb = TrainCallbacks()  # one progress display: rank 0's
        tc = cfg.train
        self.device = self.dist.device if self.dist.world > 1 else resolve_device(tc.device)
        self.resume = resume

        if resume is not None:
            self.run_dir = resume.parent.parent
        elif self.main:
            self.run_dir = make_run_dir(cfg, name_hint, self._created_dirs)
        else:
            self.run_dir = Path(cfg.logging.run_dir)
        self.run_dir = self.dist.broadcast_path(self.run_dir)

        # Data
        ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.model)
        for w in ds.warnings:
            self.cb.on_message(f"warning: {w}")
        self.classes = ds.classes
        self._fid_state = None  # (inception, reference statistics), built at the first in-training FID
        self._train_images = ds.images  # the default in-training FID reference
        self.val: ImageSet | None = None
        if tc.early_stopping.enabled:
            ds, self.val = split_holdout(ds, tc.early_stopping.holdout, tc.seed)
        on_device = cfg.data.on_device == "on" or (
            cfg.data.on_device == "auto" and self.device.type == "cuda"
            and ds.images.numel() < 0.25 * torch.cuda.mem_get_info(self.device)[0])
        self.batcher = Batcher(ds, tc.batch_size, tc.seed, self.device, on_device, cfg.data.random_flip,
                               self.dist.rank, self.dist.world)
        self.num_train = len(ds)

        # Model, EMA, diffusion, optimizer
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = tc.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(tc.seed)
        self.model = build_unet(cfg.model).to(self.device)
        self.channels_last = use_channels_last(cfg, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        channel_stats(self.model, use_channel_stats(cfg, self.channels_last))
        schedule = dict(warmup=tc.ema_warmup, start=tc.ema_start, every=tc.ema_every)
        self.ema = EMA(self.model, tc.ema_decay, **schedule) if (tc.ema and self.main) else None
        # train.ema_extra: more averaging lengths to choose from after training, updated with the main one
        self.extra_emas = {d: EMA(self.model, d, **schedule) for d in tc.ema_extra} if self.ema else {}
        self.diffusion = build_diffusion(cfg.diffusion).to(self.device)
        self.fused = self.device.type in ("cuda", "cpu")
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        self.peak_lr = peak_lr(cfg, self.dist.world)
        self.opt = opt_cls(self.model.parameters(), lr=self.peak_lr, betas=tuple(tc.adam_betas),
                           weight_decay=tc.weight_decay, **({"fused": True} if self.fused else {"foreach": True}))
        self.bf16 = use_bf16(cfg, self.device)
        mode = compile_mode(cfg, self.device)
        self.compiled = mode is not None
        if self.compiled and self.channels_last:
            force_channels_last_graph()
        self.grad_sync = grad_sync(cfg, mode) if self.dist.world > 1 else "none"
        self.net = self.dist.wrap(self.model, self.grad_sync)
        self.loss_fn = (torch.compile(self._loss, options=compile_options(cfg, self.device, mode))
                        if self.compiled else self._loss)

        # State
        self.step, self.images_seen = 0, 0
        self.best_val, self.bad_evals = math.inf, 0
        self.nonfinite_total = 0
        self.guide: tuple[int, dict[str, torch.Tensor]] | None = None  # train.guide_step: (step, weights on CPU)
        self.resumed_from: Path | None = None
        if resume is not None:
            self._load_resume(resume)
        if resume is None:
            torch.manual_seed(tc.seed + 1 + self.dist.rank)  # the training noise stream, distinct per rank
        if resume is not None and self.main:  # the steps after the checkpoint are trained again: log them once
            keep_metrics_until(self.run_dir / "metrics.jsonl", self.step)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.main else None
        self.wandb = None
        if self.main and cfg.logging.wandb != "off":
            self.wandb = WandbSink(cfg.logging.wandb, cfg.logging.wandb_project, cfg.logging.wandb_entity,
                                   self.run_dir.name, config_to_dict(cfg), self.run_dir)
        if self.main:
            import yaml

            atomic_write_bytes(self.run_dir / "config.yaml",
                               yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())

    # -- the step ------------------------------------------------------------------------------------------

    def _loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with amp:
            return self.diffusion.loss(self.net, x, y)

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        m = self.cfg.model
        if not m.conditional:
            return None
        p = self.cfg.train.label_dropout
        if p > 0:
            drop = torch.rand(y.shape[0], device=y.device) < p
            y = torch.where(drop, torch.full_like(y, m.num_classes), y)
        return y

    # -- resume --------------------------------------------------------------------------------------------

    def _load_resume(self, weights: Path) -> None:
        ck = ckpt_io.load_checkpoint(weights)
        tensors, state, groups = ckpt_io.load_state(ck.path)
        ckpt_io.load_into(self.model, ck.model_state, str(ck.path))
        if self.ema is not None:
            # Each average resumes from the stored one of the same decay (ema_decay and ema_extra may have been
            # changed at this resume); a decay new here starts from the stored main EMA, or the weights.
            stored = {**({ck.config.train.ema_decay: ck.ema_state} if ck.ema_state else {}), **ck.extra_ema}
            for ema in (self.ema, *self.extra_emas.values()):
                ckpt_io.load_into(ema.model, stored.get(ema.decay) or ck.ema_state or ck.model_state, str(ck.path))
                ema.num_updates = int(state.get("ema_updates", 0))
        try:
            load_optimizer_state(self.opt, ckpt_io.optimizer_state_dict(tensors, groups))
        except (ValueError, KeyError, RuntimeError) as e:
            raise DdpmError(f"{ck.path}: the optimizer state does not fit this run ({e}); resume with the "
                            f"same train.optimizer") from None
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.batcher.load_state_dict(state["data"])
        es = state.get("early_stopping", {})
        self.best_val = float(es.get("best", math.inf))
        self.bad_evals = int(es.get("bad", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if ck.guide_state is not None:
            self.guide = (ck.guide_step, ck.guide_state)
        elif self.cfg.train.guide_step is not None and self.step >= self.cfg.train.guide_step:
            self.cb.on_message(f"warning: resuming at step {self.step}, past train.guide_step "
                               f"{self.cfg.train.guide_step}, from a checkpoint without a guide; this run's "
                               f"checkpoints will carry no autoguidance guide")
        if self.dist.world == 1:
            torch.set_rng_state(tensors["rng.cpu"])
            cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if cuda_states and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.manual_seed(self.cfg.train.seed + 1 + self.dist.rank + 7919 * self.step)
        self.resumed_from = ck.path
        self.cb.on_message(f"resumed from {ck.path} at step {self.step}")

    # -- outputs -------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        if not self.main:
            return None
        cfg = self.cfg
        name = f"ckpt-{self.step:08d}.safetensors"
        path = self.run_dir / "checkpoints" / name
        meta = ckpt_io.weights_metadata(cfg, self.step, self.images_seen, count_params(self.model),
                                        self.ema is not None, self.classes)
        ckpt_io.save_weights(path, self.model, self.ema.model if self.ema else None, meta,
                             {d: e.model for d, e in self.extra_emas.items()}, self.guide)
        early = {"bad": self.bad_evals, **({"best": self.best_val} if math.isfinite(self.best_val) else {})}
        state = {"step": self.step, "images_seen": self.images_seen, "data": self.batcher.state_dict(),
                 "ema_updates": self.ema.num_updates if self.ema else 0, "nonfinite_total": self.nonfinite_total,
                 "early_stopping": early}
        ckpt_io.save_state(state_path(path), self.opt, state)
        # The pointer goes last: it only ever names a checkpoint whose files are complete.
        pointer = self.run_dir / "latest.json"
        try:
            atomic_write_bytes(pointer, json.dumps({"step": self.step, "weights": f"checkpoints/{name}",
                                                    "state": f"checkpoints/{state_path(path).name}"}).encode())
        except OSError as e:
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise DdpmError(f"cannot update {pointer}: {reason}; it still names the previous checkpoint, which is "
                            f"intact") from None
        self._prune()
        return path

    def _prune(self) -> None:
        keep = self.cfg.logging.keep_last
        found = list_checkpoints(self.run_dir)
        for old in found[:-keep] if len(found) > keep else []:
            if self.resumed_from is not None and old.resolve() == self.resumed_from.resolve():
                continue
            old.unlink(missing_ok=True)
            state_path(old).unlink(missing_ok=True)

    def sample_grid(self) -> Path | None:
        if not self.main:
            return None
        from torchvision.utils import save_image

        cfg, m = self.cfg, self.cfg.model
        net = self.ema.model if self.ema else self.model
        was_training = net.training
        net.eval()
        n, labels, nrow, full = self._grid_plan()
        images = []
        spec = SamplerSpec("ddpm" if full else "ddim", cfg.logging.sample_steps, variance=cfg.diffusion.variance)
        for _, batch, _ in generate(net, self.diffusion, n, spec, image_shape=(m.in_channels, m.image_size,
                                    m.image_size), labels=labels, batch_size=max(n, 1), seed=cfg.train.seed,
                                    guidance=cfg.logging.sample_guidance if m.conditional else 1.0,
                                    null_class=m.num_classes, device=self.device, bf16=self.bf16):
            images.append(batch)
        net.train(was_training)
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_image(torch.cat(images).float() / 255.0, path, nrow=nrow, padding=2)
        if self.wandb:
            self.wandb.log_image("samples", path, self.step)
        return path

    def _grid_plan(self) -> tuple[int, torch.Tensor | None, int, bool]:
        """The sample grid: (images, labels or None, images a row, whether it runs the full ancestral sampler)."""
        m, n = self.cfg.model, self.cfg.logging.sample_count
        labels, nrow = None, max(1, int(math.sqrt(n)))
        if m.conditional:
            per = max(1, n // m.num_classes)
            labels = torch.arange(m.num_classes).repeat_interleave(per)
            n, nrow = len(labels), per
        return n, labels, nrow, self.cfg.logging.sample_steps >= self.cfg.diffusion.num_timesteps

    @torch.no_grad()
    def _closing_cost(self) -> tuple[float, float]:
        """Seconds the end of a run takes on rank 0 (the other ranks wait for it): (the sample grid, timed as one
        network evaluation of its batch times the sampler's steps; the final checkpoint, estimated at 1 GB/s
        until one is written and timed)."""
        n, labels, _, full = self._grid_plan()
        m, dev = self.cfg.model, self.device
        net = self.ema.model if self.ema else self.model
        was_training = net.training
        net.eval()
        x = torch.randn(n, m.in_channels, m.image_size, m.image_size, device=dev)
        t = torch.full((n,), self.diffusion.num_timesteps - 1, device=dev)
        y = labels.to(dev) if labels is not None else None
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        with amp:
            net(x, t, y)  # the first call pays for cuDNN's algorithm search
            sync()
            t_fwd = time.monotonic()
            for _ in range(2):
                net(x, t, y)
            sync()
        net.train(was_training)
        forward_s = (time.monotonic() - t_fwd) / 2
        steps = self.cfg.diffusion.num_timesteps if full else self.cfg.logging.sample_steps
        copies = 3 + (1 + len(self.extra_emas) if self.ema else 0) + 1  # weights, Adam's two moments, EMAs, guide
        # the sampler's own arithmetic and the PNG come on top of the network evaluations: a tenth more
        return 1.1 * forward_s * steps, 4 * count_params(self.model) * copies / 1e9

    def in_training_fid(self) -> float:
        """FID of `logging.fid_samples` EMA samples (DPM-Solver++, fid_steps) against the reference, on this device."""
        from ddpm_cli.engine.draw import Drawer
        from ddpm_cli.engine.evaluation import inception as ev_inception, reference, run, sources

        lc, m = self.cfg.logging, self.cfg.model
        if self._fid_state is None:
            inception = ev_inception.load_inception(lc.fid_inception_weights, self.device)
            ref = lc.fid_ref or sources.tensor_source(self._train_images, "the training images")
            self._fid_state = (inception, reference.reference_stats(ref, inception, data_root=self.cfg.data.root,
                                                                    use_cache=lc.fid_ref is not None))
        inception, ref_stats = self._fid_state
        net = self.ema.model if self.ema else self.model
        spec = SamplerSpec("dpm++2m", lc.fid_steps, variance=self.cfg.diffusion.variance)
        drawer = Drawer(net, self.diffusion, spec, (m.in_channels, m.image_size, m.image_size),
                        m.num_classes if m.conditional else None, device=self.device, bf16=self.bf16)
        result = run.fid_of_model(drawer, lc.fid_samples, ref_stats, inception, seed=self.cfg.train.seed)
        return float(result.fid)

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Loss on the held-out split with fixed t and noise, so evaluations are comparable."""
        assert self.val is not None
        g = torch.Generator().manual_seed(self.cfg.train.seed + 999)
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        bs = self.cfg.train.batch_size
        for i in range(0, len(self.val), bs):
            x0 = to_model_range(self.val.images[i:i + bs]).to(self.device)
            y = self.val.labels[i:i + bs].to(self.device) if self.cfg.model.conditional else None
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=g).to(self.device)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
            with amp:
                loss = self.diffusion.loss(self.model, x0, y, t=t, noise=noise)
            total += loss.float() * x0.shape[0]
            count += x0.shape[0]
        self.model.train()
        return float(self.dist.average(total / count))  # one value on every rank: they stop early together

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, tc, lc = self.cfg, self.cfg.train, self.cfg.logging
        dev = self.device
        self.model.train()
        self.cb.on_start({"run_dir": str(self.run_dir), "device": str(dev), "params": count_params(self.model),
                          "images": self.num_train, "start_step": self.step, "total_steps": tc.steps,
                          "global_batch": tc.batch_size * self.dist.world, "world": self.dist.world,
                          "peak_lr": self.peak_lr, "lr_scaling": tc.lr_scaling,
                          "grad_sync": self.grad_sync,
                          "bf16": self.bf16, "compile": self.compiled, "channels_last": self.channels_last,
                          "classes": self.classes if cfg.model.conditional else []})
        clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        zero = lambda: torch.zeros((), device=dev)  # noqa: E731
        acc_loss, acc_good, bad_run, max_bad_run, nonfinite, last_bad = zero(), zero(), zero(), zero(), zero(), zero()
        gn = zero()
        stop_reason = "steps"
        last_log_t, last_log_step = time.monotonic(), self.step
        compile_s, first_step = 0.0, True
        first_loss = last_loss = None
        checkpoint: Path | None = None
        records: list[dict] = []
        params = [p for p in self.model.parameters()]
        global_batch = tc.batch_size * self.dist.world
        if self.compiled and self.step < tc.steps:
            self.cb.on_message("compiling the training step (torch.compile; the first step takes a while)")
        budget = TimeBudget(self.t0, tc.max_time, dev)
        lookahead = 1 if self.dist.world == 1 else 10  # ranks agree on stopping every 10 steps (dist.agree)

        while self.step < tc.steps:
            # _SIGNALLED + signum = a signal, 1 = out of time; with several ranks they agree on it (every 10 steps)
            # so that no rank leaves the loop while the others wait in an all-reduce.
            time_up = budget.up(lookahead)
            flag = self.dist.agree(_SIGNALLED + self.stop.signum if self.stop.signum else 1 if time_up else 0,
                                   self.step)
            if flag > _SIGNALLED:  # every rank reports (and exits with) the same signal, whichever got it
                stop_reason, self.stop.signum = "signal", flag - _SIGNALLED
                break
            if flag:
                stop_reason = "time"
                break
            t_step = time.monotonic()
            x, y = self.batcher.next()
            lr = _lr_at(cfg, self.step, self.peak_lr)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = self.loss_fn(x, self._labels(y))
            loss.backward()
            if self.grad_sync == "flat":
                self.dist.all_reduce_grads(params)
            gn = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            bad = ~torch.isfinite(gn)
            if self.fused:
                self.opt.found_inf = bad.float()  # the fused kernel skips the update (and the step count)
                self.opt.step()
            elif not bool(bad):
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.images_seen += global_batch
            if self.ema is not None:
                for ema in (self.ema, *self.extra_emas.values()):
                    ema.after_step(self.model, self.step)
            acc_loss += torch.where(bad, 0.0, loss.detach().float())
            acc_good += (~bad).float()
            bad_run = (bad_run + 1) * bad.float()
            max_bad_run = torch.maximum(max_bad_run, bad_run)
            nonfinite += bad.float()
            last_bad = torch.where(bad, float(self.step), last_bad)
            budget.step_done(first_step)
            if first_step:  # with torch.compile, the first step is the compilation
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                compile_s, first_step = time.monotonic() - t_step, False
                if budget.deadline is not None and self.main:
                    budget.grid_s, budget.checkpoint_s = self._closing_cost()
                    budget.pause()
            self.cb.on_step(self.step)
            if self.main and self.step == tc.guide_step:  # the autoguidance guide: these weights, kept from now on
                net = self.ema.model if self.ema is not None else self.model
                self.guide = (self.step, {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()})

            final = self.step >= tc.steps
            if self.step % lc.log_every == 0 or final:
                vals = torch.stack([acc_loss, acc_good, gn.float(), nonfinite, max_bad_run, last_bad]).tolist()
                now = time.monotonic()
                n_good = vals[1]
                rec = {"step": self.step, "loss": vals[0] / n_good if n_good else None, "lr": lr,
                       "grad_norm": vals[2] if math.isfinite(vals[2]) else None,
                       "img_per_s": (self.step - last_log_step) * global_batch / max(now - last_log_t, 1e-9),
                       "images_seen": self.images_seen, "time_s": round(now - self.t0, 3),
                       "nonfinite": self.nonfinite_total + int(vals[3])}
                if first_loss is None and rec["loss"] is not None:
                    first_loss = rec["loss"]
                last_loss = rec["loss"] if rec["loss"] is not None else last_loss
                self._emit(rec, records)
                last_log_t, last_log_step = now, self.step
                self.nonfinite_total += int(vals[3])
                acc_loss.zero_(), acc_good.zero_(), nonfinite.zero_()
                if vals[4] >= tc.max_nonfinite:
                    raise TrainingAborted(
                        f"{int(vals[4])} steps in a row had a non-finite loss or gradient (last at step "
                        f"{int(vals[5])}); stopped without saving them. The last good checkpoint is "
                        f"{self._latest_name()}; lower train.lr (or drop train.lr_scaling) or train.grad_clip, or "
                        f"check the data")
                max_bad_run.zero_()
            es = tc.early_stopping
            if self.val is not None and self.step % es.eval_every == 0:
                val = self.held_out_loss()
                budget.pause()
                improved = val < self.best_val - es.min_delta
                self.best_val, self.bad_evals = (val, 0) if improved else (self.best_val, self.bad_evals + 1)
                self._emit({"step": self.step, "val_loss": val, "best_val_loss": self.best_val}, records)
                if self.bad_evals >= es.patience:
                    self.cb.on_message(f"early stopping at step {self.step}: the held-out loss has not improved "
                                       f"by {es.min_delta} for {es.patience} evaluations (best "
                                       f"{self.best_val:.5f})")
                    stop_reason = "early_stopping"
                    break
            if not final and self.step % lc.checkpoint_every == 0:
                t_save = time.monotonic()
                checkpoint = self.save_checkpoint()
                if self.main:  # a measured write replaces the estimate
                    budget.checkpoint_s = time.monotonic() - t_save
                budget.pause()
            if not final and self.step % lc.sample_every == 0:
                self.sample_grid()
                budget.pause()
            if lc.fid_every and self.main and self.step % lc.fid_every == 0:
                self._emit({"step": self.step, "fid": self.in_training_fid()}, records)
                budget.pause()

        if (self.main and tc.guide_step is not None and self.step < tc.guide_step and self.guide is None
                and stop_reason != "signal"):
            self.cb.on_message(f"warning: the run ended at step {self.step}, before train.guide_step "
                               f"{tc.guide_step}; its checkpoints carry no autoguidance guide (lower guide_step)")
        if stop_reason == "signal":
            self.cb.on_message(f"stopping at step {self.step} on signal {self.stop.signum}: writing a checkpoint")
        if self.step > 0 and (self.resumed_from is None or self.step > int(self.resumed_from.stem.split("-")[1])):
            checkpoint = self.save_checkpoint()
            if stop_reason != "signal":
                self.sample_grid()
        else:
            checkpoint = self.resumed_from
        elapsed = time.monotonic() - self.t0
        if self.main:
            self.metrics.close()
            plot_loss_curve(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png")
            if self.wandb:
                self.wandb.close()
        self.dist.finish_together()
        result = TrainResult(self.run_dir, self.step, self.images_seen, stop_reason, checkpoint, elapsed, compile_s,
                             last_loss, first_loss, records)
        if stop_reason == "signal":
            code = EXIT_SIGINT if self.stop.signum == 2 else EXIT_SIGTERM
            raise TrainingAborted(f"stopped by signal {self.stop.signum} at step {self.step}; checkpoint "
                                  f"{checkpoint}; continue with `ddpm train --resume {self.run_dir}`", code)
        return result

    def _latest_name(self) -> str:
        found = list_checkpoints(self.run_dir)
        return str(found[-1]) if found else "none (no checkpoint was written yet)"

    def _emit(self, rec: dict, records: list[dict]) -> None:
        records.append(rec)
        if self.main:
            self.metrics.write(rec)
            if self.wandb:
                self.wandb.log({k: v for k, v in rec.items() if v is not None}, self.step)
        self.cb.on_log(rec)


def train(cfg: RunConfig, **kwargs) -> TrainResult:
    """Build a Trainer and run it (see Trainer for the keyword arguments)."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()

