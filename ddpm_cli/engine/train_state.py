"""A training run's checkpoint beyond what sampling needs: saving a Trainer's weights and training state
(optimizer, data position, counters, RNG streams) and putting a Trainer back to them for an exact resume."""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddpm_cli.config import refuse_identity_change
from ddpm_cli.engine import checkpoint as ckpt_io
from ddpm_cli.engine.build import count_params
from ddpm_cli.engine.files import atomic_write_bytes
from ddpm_cli.engine.runs import CKPT_RE, checkpoint_path, list_checkpoints, state_path
from ddpm_cli.errors import DdpmError

if TYPE_CHECKING:
    from ddpm_cli.engine.train import Trainer


def restore(trainer: "Trainer", weights: Path) -> None:
    """Put a Trainer back to a checkpoint: weights, EMAs (post-hoc ones too), optimizer, step, data position,
    counters, RNG."""
    ck = ckpt_io.load_checkpoint(weights)
    refuse_identity_change(ck.config, trainer.cfg, ck.path)
    tensors, state, groups = ckpt_io.load_state(ck.path)
    ckpt_io.load_into(trainer.model, ck.model_state, str(ck.path))
    if trainer.ema is not None:
        # Each average resumes from the stored one of the same decay (ema_decay and ema_extra may have been
        # changed at this resume); a decay new here starts from the stored main EMA, or the weights.
        stored = {**({ck.config.train.ema_decay: ck.ema_state} if ck.ema_state else {}), **ck.extra_ema}
        for ema in (trainer.ema, *trainer.extra_emas.values()):
            ckpt_io.load_into(ema.model, stored.get(ema.decay) or ck.ema_state or ck.model_state, str(ck.path))
            ema.num_updates = int(state.get("ema_updates", 0))
    try:
        ckpt_io.load_optimizer_state(trainer.opt, ckpt_io.optimizer_state_dict(tensors, groups))
    except (ValueError, KeyError, RuntimeError) as e:
        raise DdpmError(f"{ck.path}: the optimizer state does not fit this run ({e}); resume with the "
                        f"same train.optimizer") from None
    trainer.step, trainer.images_seen = int(state["step"]), int(state["images_seen"])
    if trainer.posthoc is not None:  # (the snapshots after the step go once the run starts: Trainer.run)
        trainer.posthoc.restore(trainer.run_dir, trainer.step)
    trainer.batcher.load_state_dict(state["data"])
    saved_n = state["data"].get("n")  # (checkpoints before it was stored: unknown, not compared)
    if saved_n is not None and int(saved_n) != trainer.batcher.n:
        trainer.cb.on_warning(f"the training set has {trainer.batcher.n} images where the run had {saved_n}: the "
                              f"resume goes on in another order than the run's (not an exact resume)")
    trainer.lr_schedule.load_state_dict(state.get("lr_schedule", {}), trainer.step)
    es = state.get("early_stopping", {})
    trainer.best_val = float(es.get("best", math.inf))
    trainer.bad_evals = int(es.get("bad", 0))
    trainer.nonfinite_total = int(state.get("nonfinite_total", 0))
    trainer.pending_stats = state.get("log_interval")  # (None in checkpoints made before it was kept)
    if ck.guide_state is not None:
        trainer.guide = (ck.guide_step, ck.guide_state)
    elif trainer.cfg.train.guide_step is not None and trainer.step >= trainer.cfg.train.guide_step:
        trainer.cb.on_warning(f"resuming at step {trainer.step}, past train.guide_step "
                           f"{trainer.cfg.train.guide_step}, from a checkpoint without a guide; this run's "
                           f"checkpoints will carry no autoguidance guide")
    if trainer.dist.world == 1:
        torch.set_rng_state(tensors["rng.cpu"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and trainer.device.type == "cuda":
            torch.cuda.set_rng_state_all(cuda_states)
    else:
        torch.manual_seed(trainer.cfg.train.seed + 1 + trainer.dist.rank + 7919 * trainer.step)
    trainer.resumed_from = ck.path
    trainer.cb.on_message(f"resumed from {ck.path} at step {trainer.step}")


def save(trainer: "Trainer") -> Path:
    """Rank 0's checkpoint: the post-hoc EMA snapshot (if tracked), weights (with EMAs and guide), then the
    training state, then latest.json."""
    cfg = trainer.cfg
    path = checkpoint_path(trainer.run_dir, trainer.step)
    if trainer.posthoc is not None:  # first: a resume from this checkpoint reads the averages back from it
        trainer.posthoc.save(trainer.run_dir, trainer.step, trainer.images_seen)
    meta = ckpt_io.weights_metadata(cfg, trainer.step, trainer.images_seen, count_params(trainer.model),
                                    trainer.ema is not None, trainer.classes)
    ckpt_io.save_weights(path, trainer.model, trainer.ema.model if trainer.ema else None, meta,
                         {d: e.model for d, e in trainer.extra_emas.items()}, trainer.guide)
    early = {"bad": trainer.bad_evals, **({"best": trainer.best_val} if math.isfinite(trainer.best_val) else {})}
    state = {"step": trainer.step, "images_seen": trainer.images_seen, "data": trainer.batcher.state_dict(),
             "ema_updates": trainer.ema.num_updates if trainer.ema else 0, "nonfinite_total": trainer.nonfinite_total,
             "early_stopping": early, "lr_schedule": trainer.lr_schedule.state_dict(),
             "log_interval": trainer.stats.state_dict() if trainer.stats is not None else None}
    try:
        ckpt_io.save_state(state_path(path), trainer.opt, state)
    except BaseException:  # weights without their state would pass for a later checkpoint that cannot resume
        path.unlink(missing_ok=True)
        raise
    # The pointer goes last: it only ever names a checkpoint whose files are complete.
    pointer = trainer.run_dir / "latest.json"
    try:
        atomic_write_bytes(pointer, json.dumps({"step": trainer.step, "weights": f"checkpoints/{path.name}",
                                                "state": f"checkpoints/{state_path(path).name}"}).encode())
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise DdpmError(f"cannot update {pointer}: {reason}; it still names the previous checkpoint, which is "
                        f"intact") from None
    _prune(trainer, path)
    return path

def _prune(trainer: "Trainer", written: Path) -> None:
    """Keep the run's `keep_last` newest checkpoints, counting only complete ones (weights and state) up to the
    run's step, and never the one just `written` or the one resumed from: a later leftover (a save that failed,
    a continuation replaced) ranks above them by step alone."""
    keep = trainer.cfg.logging.keep_last
    found = [p for p in list_checkpoints(trainer.run_dir)
             if int(CKPT_RE.search(p.name).group(1)) <= trainer.step and state_path(p).exists()]
    spared = {written.resolve(), *([trainer.resumed_from.resolve()] if trainer.resumed_from is not None else [])}
    for old in found[:-keep] if len(found) > keep else []:
        if old.resolve() in spared:
            continue
        old.unlink(missing_ok=True)
        state_path(old).unlink(missing_ok=True)
