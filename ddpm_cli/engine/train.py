"""The training loop: data -> loss -> clipped optimizer step -> EMA, with checkpoints, sample grids, metrics,
early stopping, exact resume and clean stops. Never prints: progress goes to `TrainCallbacks`.

The step issues no host synchronisation: losses, gradient norms and non-finite counts accumulate on the device
and are read once per `logging.log_every` steps."""
from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cli.config import RunConfig, config_to_dict
from ddpm_cli.engine import compile_ahead, compile_cache, monitor, train_state
from ddpm_cli.engine.build import (build_diffusion, build_optimizer, build_unet, compile_mode, compile_options,
                                   count_params, force_channels_last_graph, grad_sync, peak_lr, resolve_device,
                                   use_bf16, use_channel_stats, use_channels_last, use_fold_upsampling)
from ddpm_cli.engine.data import ImageSet, load_dataset, training_batches
from ddpm_cli.engine.distributed import DistInfo
from ddpm_cli.engine.ema import EMA
from ddpm_cli.engine.grad_accum import GradAccumulator
from ddpm_cli.engine.files import atomic_write_bytes
from ddpm_cli.engine.runs import (CONFIG_WRITTEN, checkpoint_path, list_checkpoints, lock_run, make_run_dir,
                                  release_run, remove_new_dirs, remove_unstarted_run)
from ddpm_cli.engine.metrics import MetricsLog, WandbSink, keep_metrics_until, plot_loss_curve, read_metrics
from ddpm_cli.engine.lr_schedule import LRSchedule
from ddpm_cli.engine.posthoc_ema import PosthocEMA
from ddpm_cli.engine.time_budget import TimeBudget
from ddpm_cli.errors import DataError, DdpmError, RunLocked, TrainingAborted
from ddpm_cli.nn.unet import activation_checkpointing, channel_stats, fold_upsampling


class TrainCallbacks:
    """Progress hooks; the CLI renders them. Every method may be left as the no-op."""

    def on_start(self, info: dict) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_log(self, record: dict) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_warning(self, text: str) -> None:  # something the user should fix or know; a note by default
        self.on_message(f"warning: {text}")


def drop_labels(y: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """train.label_dropout: each label replaced by the null class with probability p, which trains the
    unconditional model classifier-free guidance subtracts (the trainer's step and the API's loss alike)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


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


_SIGNALLED = 100  # a stop flag above this carries the signal's number
_DATA_FAILED = 2  # a stop flag: a rank of several could not make its batch (1 is out of time)


class _GridStopped(Exception):
    """A signal came while the closing sample grid was drawn."""


def result_reason(stop_reason: str) -> str:
    """How a run ended, in words."""
    return {"steps": "reached train.steps", "time": "reached train.max_time",
            "early_stopping": "early stopping"}.get(stop_reason, stop_reason)


class Trainer:
    def __init__(self, cfg: RunConfig, **kwargs):
        """See _setup for the keyword arguments. A start that fails (bad data, no download, Ctrl-C while loading)
        leaves no empty run directory behind."""
        self._created_dirs: list[Path] = []
        self._run_lock = None
        try:
            self._setup(cfg, **kwargs)
        except BaseException:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            remove_new_dirs(self._created_dirs)
            release_run(self._run_lock)
            raise

    def _setup(self, cfg: RunConfig, *, resume: Path | None = None,
               callbacks: TrainCallbacks | None = None, stop: StopFlag | None = None,
               name_hint: str | None = None, dataset: ImageSet | None = None):
        self.t0 = time.monotonic()
        self.cfg = cfg
        self.cb = callbacks or TrainCallbacks()
        self.stop = stop or StopFlag()
        self.dist = DistInfo.from_env(cfg.train.device)
        self.main = self.dist.rank == 0
        if not self.main:
            self.cb = TrainCallbacks()  # one progress display: rank 0's
        tc = cfg.train
        self.device = self.dist.device if self.dist.world > 1 else resolve_device(tc.device, "train.device")
        self.resume = resume

        if resume is not None:
            self.run_dir = resume.parent.parent
        elif self.main:
            self.run_dir = make_run_dir(cfg, name_hint, self._created_dirs)
        else:
            self.run_dir = Path(cfg.logging.run_dir)
        if self.main:  # held until close(): a second process that would train into this run is refused
            try:
                self._run_lock = lock_run(self.run_dir, resume is not None)
            except RunLocked:  # another start made the same new folder a moment before this one: it is its run's
                self._created_dirs.clear()
                raise
        self.run_dir = self.dist.broadcast_path(self.run_dir)

        # Data
        ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.model)
        for w in ds.warnings:
            self.cb.on_warning(w)
        self.classes = ds.classes
        fid_reference = ds.images  # the default in-training FID reference: every training image
        self.batcher, self.val = training_batches(cfg, ds, self.device, self.dist.rank, self.dist.world)
        self.num_train = self.batcher.n

        # Model, EMA, diffusion, optimizer
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = tc.cudnn_benchmark  # (compile_ahead's eager steps: eager_cudnn)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(tc.seed)
        self.model = build_unet(cfg.model).to(self.device)
        self.channels_last = use_channels_last(cfg, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        channel_stats(self.model, use_channel_stats(cfg, self.channels_last))
        activation_checkpointing(self.model, cfg.model.checkpointing)  # training only: build_unet leaves it off
        fold_upsampling(self.model, use_fold_upsampling(cfg, self.device))
        schedule = dict(warmup=tc.ema_warmup, start=tc.ema_start, every=tc.ema_every)
        self.ema = EMA(self.model, tc.ema_decay, **schedule) if (tc.ema and self.main) else None
        # train.ema_extra: more averaging lengths to choose from after training, updated with the main one
        self.extra_emas = {d: EMA(self.model, d, **schedule) for d in tc.ema_extra} if self.ema else {}
        # train.posthoc_ema: power-function averages, snapshotted under RUN/ema/ for `ddpm ema`
        self.posthoc = PosthocEMA(self.model, tc.posthoc_ema) if (tc.posthoc_ema and self.main) else None
        self.diffusion = build_diffusion(cfg.diffusion).to(self.device)
        self.bf16 = use_bf16(cfg, self.device)
        self.in_training_fid = monitor.InTrainingFid(cfg, self.diffusion, fid_reference, self.device, self.bf16)
        if cfg.logging.fid_every and self.main:
            self.in_training_fid.check()
        self.fused = self.device.type in ("cuda", "cpu")
        self.peak_lr = peak_lr(cfg, self.dist.world)
        self.lr_schedule = LRSchedule(self.peak_lr, tc.warmup_steps, tc.lr_cooldown, tc.steps, tc.max_time)
        self.opt = build_optimizer(cfg, self.model, self.peak_lr, self.fused)
        self.compile_mode = compile_mode(cfg, self.device)
        self.compiled = self.compile_mode is not None
        self.grad_sync = grad_sync(cfg, self.compile_mode) if self.dist.world > 1 else "none"
        self.net = self.dist.wrap(self.model, self.grad_sync)
        self.loss_fn, self.step_cache = self._loss, None  # the eager step, until the compiled one is made
        # train.compile_ahead: a helper compiles the step; the run makes its own compiled step (loading the helper's
        # work) when the helper is done, so the set-up does not even import the compiler
        self.compile_ahead = self._compile_ahead_applies()
        if self.compiled and not self.compile_ahead:
            self._make_compiled_step()
        self.accumulate = (GradAccumulator(list(self.model.parameters()), tc.grad_accum,
                                           self.diffusion.sample_timesteps) if tc.grad_accum > 1 else None)

        # State
        self.step, self.images_seen = 0, 0
        self.best_val, self.bad_evals = math.inf, 0
        self.nonfinite_total = 0
        # the steps since the last log line (monitor.StepStats): counted in run(), kept by a checkpoint between lines
        self.stats: monitor.StepStats | None = None
        self.pending_stats: list[float] | None = None  # a resumed checkpoint's, for run() to start from
        self.guide: tuple[int, dict[str, torch.Tensor]] | None = None  # train.guide_step: (step, weights on CPU)
        self.resumed_from: Path | None = None
        self.ahead = None  # train.compile_ahead's helper while it compiles
        self.eager_split: GradAccumulator | None = None  # its eager steps' micro-batches, once one ran out of memory
        if resume is not None:
            train_state.restore(self, resume)
        if resume is None:
            torch.manual_seed(tc.seed + 1 + self.dist.rank)  # the training noise stream, distinct per rank
        self.metrics = None  # opened by run(), after a resume has cut the records it trains again
        self.wandb = None
        if self.main and cfg.logging.wandb != "off":
            self.wandb = WandbSink(cfg.logging.wandb, cfg.logging.wandb_project, cfg.logging.wandb_entity,
                                   self.run_dir.name, config_to_dict(cfg), self.run_dir)
        if self.main:
            import yaml

            text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode()
            atomic_write_bytes(self.run_dir / "config.yaml", text)
            # what this run wrote, so that a resume can tell a file edited since (cli/train.py) from its own
            atomic_write_bytes(self.run_dir / CONFIG_WRITTEN, hashlib.sha256(text).hexdigest().encode())

    # -- the step ------------------------------------------------------------------------------------------

    def _loss(self, x: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of a batch; t and noise are drawn here unless given (grad_accum's micro-batches)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with amp:
            return self.diffusion.loss(self.net, x, y, t, noise)

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        m = self.cfg.model
        return drop_labels(y, self.cfg.train.label_dropout, m.num_classes) if m.conditional else None

    # -- checkpoints: the weights and the training state (engine/train_state.py) -----------------------------

    def save_checkpoint(self) -> Path | None:
        return train_state.save(self) if self.main else None

    def sample_grid(self, on_step=None) -> Path | None:
        if not self.main:
            return None
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)  # a run copied or resumed from its checkpoint alone has none yet
        path = monitor.draw_grid(self.ema.model if self.ema else self.model, self.diffusion, self.cfg,
                                 folder / f"step_{self.step:08d}.png", self.device, self.bf16, on_step)
        if self.wandb:
            self.wandb.log_image("samples", path, self.step)
        return path

    def _closing_grid(self) -> None:
        """The run's last sample grid, after its last checkpoint: a signal before or while it is drawn leaves it
        out (a scheduler's grace period is not spent on a picture; the run() end reports the signal)."""
        def stop_if_signalled(i: int, n: int) -> None:  # noqa: ARG001 - the sampler's progress callback
            if self.stop.signum:
                raise _GridStopped

        if not self.stop.signum:
            try:
                self.sample_grid(stop_if_signalled)
            except _GridStopped:
                pass

    def _closing_cost(self) -> tuple[float, float]:
        """Seconds the end of a run takes on rank 0 (the other ranks wait for it): (its sample grid; its
        checkpoint, estimated at 1 GB/s until one is written and timed)."""
        grid_s = monitor.grid_seconds(self.ema.model if self.ema else self.model, self.diffusion, self.cfg,
                                      self.device, self.bf16)
        copies = 3 + (1 + len(self.extra_emas) if self.ema else 0) + 1  # weights, Adam's two moments, EMAs, guide
        copies += self.posthoc.copies if self.posthoc else 0  # the post-hoc EMA snapshot written with it
        return grid_s, 4 * count_params(self.model) * copies / 1e9

    def _fid_cost(self) -> float:
        """logging.fid_every's next FID in seconds (rank 0, under train.max_time: InTrainingFid.seconds, the last
        one's once there was one); 0 without one to come. Where its batch does not fit beside the training step to
        be timed, 0 and a warning: the FID itself says more."""
        every = self.cfg.logging.fid_every
        if not every or (self.step // every + 1) * every > self.cfg.train.steps:
            return 0.0
        try:
            return self.in_training_fid.seconds(self.ema.model if self.ema else self.model)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.cb.on_warning("train.max_time: the in-training FID's batch did not fit beside the training step "
                               "to be timed, so its cost is not budgeted; if the FID runs out of memory too, lower "
                               "logging.fid_samples (its batch is at most 256) or set logging.fid_every 0")
            return 0.0

    def held_out_loss(self) -> float:
        assert self.val is not None
        loss = monitor.held_out_loss(self.model, self.diffusion, self.val, self.cfg, self.device, self.bf16)
        return float(self.dist.average(loss))  # one value on every rank: they stop early together

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until train.steps, train.max_time, early stopping or a signal. A new run that stops or fails before
        its first step takes its run directory away again: it holds only the config, and nothing to resume."""
        try:
            self._take_over_the_run()
            result = self._run()
            if self.ahead is not None and self.main and self.ahead.proc.poll() is None:
                self.cb.on_message(f"train.compile_ahead: the run ended at step {self.step}, before its helper had "
                                   f"compiled the step; its work is dropped, and the next run compiles again (for "
                                   f"runs this short, train.compile_ahead=false compiles once and caches the step)")
            return result
        except BaseException:
            if self.step == 0 and self.main:
                if self.metrics is not None:
                    self.metrics.close()
                remove_unstarted_run(self._created_dirs)
            raise
        finally:
            if self.ahead is not None:  # the run ended before its helper had compiled: its work is not kept
                self.ahead.stop()
                self.ahead = None
            self.eager_split = None  # (a run that ended eager) its micro-batch sums

    def _take_over_the_run(self) -> None:
        """What a start changes in the run's files, once it is set up to train (a start that fails before keeps
        them): a resume cuts metrics.jsonl and the post-hoc EMA snapshots back to its step, since the steps after it
        are trained again and logged once; then the metrics log opens."""
        if not self.main:
            return
        if self.resumed_from is not None:
            keep_metrics_until(self.run_dir / "metrics.jsonl", self.step)
            removed = self.posthoc.drop_after(self.run_dir, self.step) if self.posthoc is not None else 0
            if removed:
                self.cb.on_message(f"removed {removed} post-hoc EMA snapshot{'s' if removed > 1 else ''} past step "
                                   f"{self.step}: they belonged to the continuation this resume replaces")
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    def _run(self) -> TrainResult:
        cfg, tc, lc = self.cfg, self.cfg.train, self.cfg.logging
        dev = self.device
        self.model.train()
        self.cb.on_start({"run_dir": str(self.run_dir), "device": str(dev), "params": count_params(self.model),
                          "images": self.num_train, "start_step": self.step, "total_steps": tc.steps,
                          "global_batch": tc.batch_size * self.dist.world, "world": self.dist.world,
                          "grad_accum": tc.grad_accum,
                          "peak_lr": self.peak_lr, "lr_scaling": tc.lr_scaling,
                          "grad_sync": self.grad_sync,
                          "bf16": self.bf16, "compile": self.compiled, "channels_last": self.channels_last,
                          "checkpointing": cfg.model.checkpointing,
                          "classes": self.classes if cfg.model.conditional else []})
        clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        stats, gn = monitor.StepStats(dev, self.pending_stats), torch.zeros((), device=dev)
        self.stats = stats
        stop_reason = "steps"
        last_log_t, last_log_step = time.monotonic(), self.step
        compile_s, first_step = 0.0, True
        first_loss = last_loss = None
        checkpoint: Path | None = None
        records: list[dict] = []
        params = [p for p in self.model.parameters()]
        global_batch = tc.batch_size * self.dist.world
        if self.compiled and self.step < tc.steps and not self.compile_ahead:
            self.cb.on_message("compiling the training step (torch.compile; the first step takes a while)")
        budget = TimeBudget(self.t0, tc.max_time, dev)
        fid_s = 0.0  # the next in-training FID's seconds (_fid_cost): under train.max_time, one that would overrun
        # is skipped
        start_step = self.step
        lookahead = 1 if self.dist.world == 1 else 10  # ranks agree on stopping every 10 steps (dist.agree)
        data_error: DataError | None = None  # this rank's batch that could not be made, with several ranks

        while self.step < tc.steps:
            # _SIGNALLED + signum = a signal, 1 = out of time; with several ranks they agree on it (every 10 steps)
            # so that no rank leaves the loop while the others wait in an all-reduce.
            time_up = budget.up(lookahead)
            flag = self.dist.agree(_SIGNALLED + self.stop.signum if self.stop.signum else
                                   _DATA_FAILED if data_error else 1 if time_up else 0, self.step)
            if flag > _SIGNALLED:  # every rank reports (and exits with) the same signal, whichever got it
                stop_reason, self.stop.signum = "signal", flag - _SIGNALLED
                break
            if flag == _DATA_FAILED:
                stop_reason = "data"
                break
            if flag or self.lr_schedule.ended(self.step):  # the cool-down on the clock may end just before it
                stop_reason = "time"
                break
            t_step = time.monotonic()
            try:
                x, y = self.batcher.next()
            except DataError as e:  # a streamed file that no longer decodes
                if self.dist.world == 1:
                    raise self._stopped_by_data(e, trained=self.step > start_step) from None
                # One rank cannot leave a run of several alone (the others would wait for it in the all-reduce): it
                # moves past the batch, so that its data position stays the step's, and trains its last good one
                # in its place until the ranks next agree, where every rank stops (_DATA_FAILED).
                self.batcher.skip()
                data_error = data_error or e
                x, y = good if self.step > start_step else (None, None)
            if self.step == start_step and self.dist.agree(_DATA_FAILED if data_error else 0, 0, every=1):
                stop_reason = "data"  # a first batch has no good one to stand in: the ranks agree on it at once
                break
            good = x, y
            if self.lr_schedule.cooldown and self.lr_schedule.window is None and tc.max_time is not None:
                # the cool-down on the clock starts at the same step on every rank, with rank 0's end (whose
                # budget knows the closing checkpoint and grid)
                proposal = (self.lr_schedule.proposal(self.step, time.monotonic() - self.t0,
                                                      budget.steps_left(lookahead)) if self.main else 0)
                self.lr_schedule.settle(self.step, self.dist.agree(proposal, self.step))
            lr = self.lr_schedule.at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            y = self._labels(y)
            eager = False  # train.compile_ahead: the step runs eagerly until the helper has compiled it
            if self.compile_ahead and self.step == start_step:
                self.ahead = self._start_compile_ahead(x, y)
                self.compile_ahead = self.ahead is not None
            if self.ahead is not None:
                eager = self._eager_while_compiling(budget)
            if eager:
                loss = self._eager_step(x, y)
                eager = self.ahead is not None  # (not where it ran out of memory and took the compiled step)
            elif self.accumulate is None:
                loss = self.loss_fn(x, y)
                loss.backward()
            else:  # train.grad_accum micro-batches; their summed gradients are in .grad
                loss = self.accumulate(self.loss_fn, x, y)
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
            if self.posthoc is not None:
                self.posthoc.update(self.model, self.step)
            stats.add(loss, bad, self.step)
            budget.step_done(first_step and not eager)
            if first_step and not eager:  # with torch.compile, the first compiled step is the compilation
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                compile_s, first_step = time.monotonic() - t_step, False
                if self.step_cache is not None:  # forward and backward have compiled now: keep them for the next run
                    self.step_cache.save()
                if self.compile_ahead and self.step > start_step + 1 and budget.deadline is not None and self.main:
                    # the first costing ran beside the helper's compile, every core busy: again, without it
                    budget.grid_s, budget.checkpoint_s = self._closing_cost()
                    fid_s = self._fid_cost()
                    budget.pause()
            if self.step == start_step + 1 and budget.deadline is not None and self.main:
                # after the first step, compiled or (train.compile_ahead) eager: the budget keeps the end's work
                budget.grid_s, budget.checkpoint_s = self._closing_cost()
                fid_s = self._fid_cost()  # (the first FID: its sampling, and the reference's Inception pass)
                budget.pause()
            self.cb.on_step(self.step)
            if self.main and self.step == tc.guide_step:  # the autoguidance guide: these weights, kept from now on
                net = self.ema.model if self.ema is not None else self.model
                self.guide = (self.step, {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()})

            final = self.step >= tc.steps
            if self.step % lc.log_every == 0 or final:
                mean_loss, grad_norm, n_bad, bad_in_a_row, last_bad = stats.read(gn)
                now = time.monotonic()
                rec = {"step": self.step, "loss": mean_loss, "lr": lr,
                       "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                       "img_per_s": (self.step - last_log_step) * global_batch / max(now - last_log_t, 1e-9),
                       "images_seen": self.images_seen, "time_s": round(now - self.t0, 3),
                       "nonfinite": self.nonfinite_total + n_bad}
                if first_loss is None and rec["loss"] is not None:
                    first_loss = rec["loss"]
                last_loss = rec["loss"] if rec["loss"] is not None else last_loss
                self._emit(rec, records)
                last_log_t, last_log_step = now, self.step
                self.nonfinite_total += n_bad
                if bad_in_a_row >= tc.max_nonfinite:
                    raise TrainingAborted(
                        f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                        f"{last_bad}); stopped without saving them. The last good checkpoint is "
                        f"{self._latest_name()}; lower train.lr (or drop train.lr_scaling) or train.grad_clip, or "
                        f"check the data")
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
            if not final and self.step % lc.checkpoint_every == 0 and budget.affords(budget.checkpoint_s):
                t_save = time.monotonic()
                checkpoint = self.save_checkpoint()
                if self.main:  # a measured write replaces the estimate
                    budget.checkpoint_s = time.monotonic() - t_save
                budget.pause()
            if (tc.posthoc_ema and tc.posthoc_ema_every and not final and self.step % tc.posthoc_ema_every == 0
                    and self.step % lc.checkpoint_every != 0):  # a checkpoint writes its own
                if self.posthoc is not None:  # rank 0's; every rank pauses its step clock, as for a checkpoint
                    self.posthoc.save(self.run_dir, self.step, self.images_seen)
                budget.pause()
            if not final and self.step % lc.sample_every == 0 and budget.affords(budget.grid_s):
                self.sample_grid()
                budget.pause()
            if lc.fid_every and self.main and self.step % lc.fid_every == 0:
                if budget.affords(fid_s):
                    fid = self._in_training_fid()
                    fid_s = self._fid_cost()
                    self._emit({"step": self.step, "fid": fid}, records)
                    budget.pause()
                else:
                    self.cb.on_message(f"no in-training FID at step {self.step}: its {fid_s:.0f} s would end the "
                                       f"run past train.max_time")

        if self.dist.world > 1 and self.dist.agree(_DATA_FAILED if data_error else 0, 0, every=1):
            # (also where the run ended, or a signal stopped it, before the ranks agreed on a failed batch)
            raise self._stopped_by_data(data_error, trained=self.step > start_step)
        if (self.main and tc.guide_step is not None and self.step < tc.guide_step and self.guide is None
                and stop_reason != "signal"):
            self.cb.on_warning(f"the run ended at step {self.step}, before train.guide_step "
                               f"{tc.guide_step}; its checkpoints carry no autoguidance guide (lower guide_step)")
        if stop_reason == "signal":
            self.cb.on_message(f"stopping at step {self.step} on signal {self.stop.signum}: writing a checkpoint")
        if self.step > 0 and (self.resumed_from is None or self.step > int(self.resumed_from.stem.split("-")[1])):
            checkpoint = self.save_checkpoint()
            if stop_reason != "signal":
                self._closing_grid()
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
        if stop_reason != "signal" and self.stop.signum and checkpoint is not None:
            # a signal while the run was closing (its checkpoint, its last grid): the run is whole, and a scheduler
            # that sent it still learns it was stopped by one
            raise TrainingAborted(f"stopped by signal {self.stop.signum} while closing the run at step {self.step} "
                                  f"({result_reason(stop_reason)}); checkpoint {checkpoint} is complete",
                                  128 + self.stop.signum)
        if stop_reason == "signal":
            code = 128 + self.stop.signum  # the shell's convention: Ctrl-C 130, SIGTERM 143, SIGHUP 129
            if self.step == 0:  # (checkpoint is None on every rank but 0, which alone saves)
                raise TrainingAborted(f"stopped by signal {self.stop.signum} before the first step; nothing was "
                                      f"saved: start the run again with the same command", code)
            raise TrainingAborted(f"stopped by signal {self.stop.signum} at step {self.step}; checkpoint "
                                  f"{checkpoint}; continue with `ddpm train --resume {self.run_dir}`", code)
        return result

    def _make_compiled_step(self) -> None:
        """torch.compile the step, wrapped in the compile cache: at its first call it loads an earlier process's
        compiled step (or the compile_ahead helper's) before compiling."""
        if self.channels_last:
            force_channels_last_graph()
        # dynamic=False: a second Trainer in the same process (a notebook, the test suite) shares `_loss`'s code
        # object, and a new shape there would otherwise recompile with symbolic sizes, which inductor's CUDA
        # lowering of this network fails on (tests/test_gpu_newcomer.py caught it).
        self.loss_fn = torch.compile(self._loss, dynamic=False,
                                     options=compile_options(self.cfg, self.device, self.compile_mode))
        self.loss_fn = self.step_cache = compile_cache.for_training(self, self.compile_mode)

    def _compile_ahead_applies(self) -> bool:
        """train.compile_ahead (true, or auto: decided at the first step), where it can work; a warning where the
        config asked for it (true) in vain."""
        tc = self.cfg.train
        if not (tc.compile_ahead and self.compiled):
            return False
        why = ("under torchrun (each rank would start one)" if self.dist.world > 1 else
               "with train.grad_accum (its micro-batches' step takes other arguments)" if tc.grad_accum > 1 else
               "with compile max-autotune (it tunes while compiling)" if self.compile_mode == "max-autotune"
               else None)
        if why and tc.compile_ahead is True:
            self.cb.on_warning(f"train.compile_ahead does not apply {why}; the step compiles in the run")
        return why is None

    def _start_compile_ahead(self, x: torch.Tensor, y: torch.Tensor | None):
        """train.compile_ahead's helper (engine/compile_ahead.py), given the first step's inputs; under `auto`, None
        where the compile cache holds the step (a warm start): the step is then made here, and compiles in the run."""
        if self.cfg.train.compile_ahead == "auto":
            probe = compile_cache.for_training(self, self.compile_mode)  # (wraps the eager step: only its key is read)
            if probe.has_entry((x, y)):
                self.cb.on_message("compiling the training step (torch.compile; the compile cache holds it)")
                self._make_compiled_step()
                return None
        self.cb.on_message("train.compile_ahead: compiling the training step in a helper process; training "
                           "eagerly until it is ready")
        return compile_ahead.CompileAhead.start(config_to_dict(self.cfg), str(self.device), [x, y],
                                                self.cfg.model.num_classes + 1)

    # Under train.max_time, a helper that ends this close to the end (the closing work apart) leaves the run eager:
    # loading the compiled step (and recording its CUDA graph) would cost about what the faster steps after it win
    # back, and a cold compile after a failed helper would outlast the budget.
    SWITCH_MIN_LEFT_S = 30.0

    def _eager_while_compiling(self, budget: TimeBudget) -> bool:
        """Before a step while train.compile_ahead's helper runs: whether this step is eager. Holds the GPU for the
        helper's kernel timings when it asks (that wait is not a step's time), and makes the compiled step once the
        helper has ended."""
        ready = self.ahead.done()
        if ready is None:
            dev = self.device
            answering = self.ahead.answering
            if self.ahead.hold_if_asked(lambda: self._give_the_gpu_up(dev), lambda: bool(self.stop.signum)):
                budget.pause()
            if answering and not self.ahead.answering:
                self.cb.on_warning(f"train.compile_ahead: the helper held the GPU for "
                                   f"{compile_ahead.HOLD_MAX_S:.0f} s without letting go; training on beside it")
            return True
        if budget.seconds_left() < self.SWITCH_MIN_LEFT_S:  # too late to load (or compile) the step: stay eager
            if not ready and not self.ahead.failure_said:
                self.cb.on_warning(f"train.compile_ahead: the helper failed ({self.ahead.last_line()}); the run "
                                   f"ends eagerly, too close to its train.max_time to compile the step")
                self.ahead.failure_said = True
            return True
        self._end_compile_ahead(ready)
        return False

    @staticmethod
    def _give_the_gpu_up(dev: torch.device) -> None:
        """Before a hold for the helper: the queued work done, and the memory the eager steps cached handed back
        (the helper's first call, which the holds cover, needs the compiled step's activations)."""
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The step without the compiler, while the helper compiles it (cuDNN as `compile_ahead.eager_cudnn` sets
        it). The eager step holds more activations than the compiled one, beside the helper's own network: where
        that runs out of GPU memory, the step is taken again in at least twice as many micro-batches (the same
        gradient: engine/grad_accum.py), and so are the steps after it; a step that does not fit even one image at
        a time ends the helper and is taken compiled, as without compile_ahead. A step taken again draws the same
        timesteps and noise as its first try did (the generator's state is put back, the batch in the loss's
        layout), so a run that ran out of memory trains as one that did not."""
        cuda = self.device.type == "cuda"
        rng = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()
        with compile_ahead.eager_cudnn(self.device):
            while True:
                try:
                    if self.eager_split is None:
                        loss = self._loss(x, y)
                        loss.backward()
                    else:  # (in the loss's layout, so that the noise drawn for the whole batch is the loss's own)
                        xs = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
                        loss = self.eager_split(self._loss, xs, y)
                        torch.cuda.empty_cache()  # memory is short: what the step cached goes back for the helper
                    return loss
                except torch.cuda.OutOfMemoryError:
                    # out of the except block first (its traceback holds the failed step's activations), and
                    # without the loss: after an error in the backward it holds the part of the graph not yet run
                    loss = None
                self.opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.set_rng_state(rng, self.device)
                else:
                    torch.set_rng_state(rng)
                n, k = x.shape[0], self.eager_split.k if self.eager_split is not None else 1
                self.eager_split = None  # (its sums go back with the cache)
                torch.cuda.empty_cache()
                k = next((d for d in range(2 * k, n + 1) if n % d == 0), None)  # equal micro-batches, twice as many
                if k is None:
                    break
                self.eager_split = GradAccumulator(list(self.model.parameters()), k, self.diffusion.sample_timesteps)
                self.cb.on_warning(f"train.compile_ahead: the eager step ran out of GPU memory beside the helper; "
                                   f"the eager steps run in {k} micro-batches from step {self.step + 1} on")
        self.cb.on_warning("train.compile_ahead: the eager step ran out of GPU memory beside the helper even one "
                           "image at a time; the helper is ended and the step compiles in the run (turn "
                           "train.compile_ahead off for this batch size)")
        self.ahead.stop()
        self.ahead = None
        self._make_compiled_step()
        loss = self.loss_fn(x, y)
        loss.backward()
        return loss

    def _end_compile_ahead(self, ok: bool) -> None:
        """The helper has ended: the run makes its compiled step, which loads the helper's work (or, if the
        helper failed, compiles)."""
        if ok:
            self.cb.on_message(f"compile_ahead: the helper has compiled the step; compiled steps from step "
                               f"{self.step + 1} ({time.monotonic() - self.t0:.1f} s into the run; "
                               f"{self.ahead.held_s:.1f} s held for its kernel timings)")
        else:
            self.cb.on_warning(f"train.compile_ahead: the helper failed ({self.ahead.last_line()}); the step "
                               f"compiles in the run")
        self.ahead.stop()
        self.ahead = None
        if self.eager_split is not None:  # the eager steps' micro-batch sums: memory the compiled step needs
            self.eager_split = None
            torch.cuda.empty_cache()
        self._make_compiled_step()

    def _stopped_by_data(self, e: DataError | None, trained: bool) -> DdpmError:
        """The error that ends a run whose next batch cannot be made (`e`; None on a rank of several whose peer's
        could not, and whose own line says why): the steps `trained` are saved first (by rank 0; with the batch's
        place in the epoch, or with several ranks the place past it), so that fixing the data and resuming loses
        nothing. Every rank learns whether that checkpoint was written before any leaves (torchrun stops every
        rank when one exits with an error, and its line with it), and a signal that came meanwhile keeps its exit
        code (a scheduler may requeue on it)."""
        saved, failed = None, None
        if trained:
            try:
                saved = self.save_checkpoint()
            except Exception as err:  # noqa: BLE001 - (a full disk) said with the data's line, on every rank
                failed = err
        unsaved = self.dist.agree(int(failed is not None), 0, every=1)  # (also where the ranks meet before leaving)
        what = str(e) if e is not None else "another process of the run could not make its batch (its own line " \
                                            "says why)"
        if not (trained or self.stop.signum) and e is not None:
            return e  # nothing trained, nothing saved: the data's own error
        code = 128 + self.stop.signum if self.stop.signum else 1
        if self.stop.signum:
            what = f"{what}; stopped by signal {self.stop.signum} too"
        if not trained:
            return TrainingAborted(f"{what}; nothing was trained", code)
        if unsaved:
            why = failed if failed is not None else "rank 0 could not write it"
            return TrainingAborted(f"{what}; no checkpoint was written ({why}); the last one is "
                                   f"{self._latest_name()}", code)
        return TrainingAborted(f"{what}; checkpoint {saved or checkpoint_path(self.run_dir, self.step)} "
                               f"holds the run up to step {self.step}: continue with `ddpm train --resume "
                               f"{self.run_dir}`", code)

    def _in_training_fid(self) -> float:
        """logging.fid_every's score. It fails only where the start's check could not look (a reference that is
        there but cannot be read, the GPU's memory): then the steps since the last checkpoint are saved first, so
        that fixing the setting and resuming loses nothing."""
        try:
            return self.in_training_fid(self.ema.model if self.ema else self.model)
        except Exception as e:
            checkpoint = self.save_checkpoint()
            resume = f"checkpoint {checkpoint} holds the run so far; continue with `ddpm train --resume {self.run_dir}`"
            if isinstance(e, DdpmError):
                raise TrainingAborted(f"the in-training FID at step {self.step} failed: "
                                      f"{monitor.config_names(str(e))}; {resume} (or set logging.fid_every 0)") from None
            self.cb.on_warning(f"the in-training FID at step {self.step} failed; {resume}")
            raise

    def close(self) -> None:
        """Release what the run holds beyond its objects: a streamed set's decoding workers, the process group, the
        run's lock."""
        self.batcher.close()
        self.net = self.model  # DDP's reducer holds the default group: let it go with the group (DistInfo.close)
        self.dist.close()
        release_run(self._run_lock)

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
        trainer.close()

