"""`ddpm eval` in the engine: check the request, draw a checkpoint's samples (over the ranks under torchrun), get
the reference statistics (cached), and score; and FID of a model in memory for the training loop. Never prints:
progress goes through EvalCallbacks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm_cli.engine.distributed import DistInfo
from ddpm_cli.engine.evaluation.inception import Inception, check_inception_path, load_inception
from ddpm_cli.engine.evaluation.reference import check_compatible, reference_stats
from ddpm_cli.engine.evaluation.scores import EvalResult, score
from ddpm_cli.engine.evaluation.sources import (ImageSource, first_n, is_checkpoint, model_batches, model_source,
                                                open_images_or_stats, tensor_source)
from ddpm_cli.engine.evaluation.stats import EvalCallbacks, FeatureStats, compute_stats, notify, save_stats
from ddpm_cli.engine.guidance import Guidance
from ddpm_cli.errors import DataError, DdpmError


def fid_of_model(model: torch.nn.Module, diffusion, n: int, ref_stats: FeatureStats, inception: Inception, *,
                 image_shape: tuple[int, int, int], num_classes: int | None = None, sampler: str | None = None,
                 steps: int | None = None, guidance: float = 1.0, variance: str = "beta", batch_size: int = 256,
                 seed: int = 0, bf16: bool = False, kid: bool = False, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, callbacks: EvalCallbacks | None = None) -> EvalResult:
    """Sample `n` images from `model` (in eval mode; its mode is restored) and score them against `ref_stats`.

    For in-training FID: build `inception = load_inception(path, device)` and `ref_stats = reference_stats(ref,
    inception)` once, then call this every N steps with the EMA model. KID is off by default (it costs more)."""
    was_training = model.training
    model.eval()
    try:
        src = model_source(model, diffusion, n, image_shape=image_shape, num_classes=num_classes, sampler=sampler,
                           steps=steps, guidance=guidance, variance=variance, seed=seed, device=inception.device,
                           bf16=bf16)
        stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="samples")
    finally:
        model.train(was_training)
    return score(stats, ref_stats, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                 device=inception.device, callbacks=callbacks)


@dataclass
class EvalRequest:
    """Everything `ddpm eval` was asked for; defaults match the command's."""

    ref: str
    input: Path | None = None  # a checkpoint or run directory to sample, or images/statistics to score
    n: int | None = None  # checkpoint: samples to draw (default 10,000); images: the first n (default all)
    batch_size: int | None = None  # None: Inception 250 on CUDA (sampling: generate.default_batch), 50 on the CPU
    device: str = "auto"
    seed: int = 0
    sampler: str | None = None  # None: ddim, or dpm++2m for a checkpoint autoguided by its stored guide
    steps: int | None = None
    guidance: float | None = None  # None: the stored guide's weight if the checkpoint carries one, else 1 (off)
    guide: Path | str | None = None  # checkpoint: a weaker one for autoguidance; "none": not the stored guide
    ema_decay: float | None = None  # checkpoint: which EMA weights (None: train.ema_decay's)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception_weights: Path | None = None  # None: torch-fidelity downloads its own
    data_root: Path = Path("data")
    cache_dir: Path | None = None  # None: default_cache_dir()
    use_cache: bool = True
    save_stats: Path | None = None  # write the reference statistics here


DEFAULT_SAMPLES = 10_000


def evaluate(req: EvalRequest, callbacks: EvalCallbacks | None = None) -> dict:
    """`ddpm eval`: reference statistics (cached), optionally saved; then, with an input, its statistics (sampling
    a checkpoint first) and the scores. Returns the JSON-ready result. Inputs are checked before any heavy work.

    Under torchrun the sampling of a checkpoint is spread over the ranks (the same images as one process); rank 0
    does the rest and gets the result, the other ranks get {}."""
    guidance, ref = check_request(req)
    dist_info = DistInfo.from_env()
    try:
        return _evaluate(req, ref, guidance, dist_info, callbacks)
    finally:
        dist_info.close()


def check_request(req: EvalRequest) -> tuple[Guidance | None, ImageSource | FeatureStats]:
    """The cheap checks of `ddpm eval`'s arguments, paths and reference (once, before any process or heavy work
    starts); returns how a checkpoint input will be guided (None: the input is not a checkpoint to sample), and
    the opened reference."""
    if req.n is not None and req.n < 1:
        raise DdpmError(f"-n must be at least 1 (got {req.n})")
    if req.input is None and req.save_stats is None:
        raise DdpmError("nothing to do: pass samples or a checkpoint to score, or --save-stats FILE to precompute "
                        "the reference statistics")
    if req.kid_subsets < 1 or req.kid_subset_size < 2:
        raise DdpmError("--kid-subsets must be at least 1 and --kid-subset-size at least 2")
    if req.inception_weights is not None:
        check_inception_path(req.inception_weights)
    guidance = None
    if req.input is not None and is_checkpoint(req.input):
        from ddpm_cli.diffusion.samplers import SAMPLERS
        from ddpm_cli.engine.checkpoint import read_checkpoint_config, require_ema_decay
        from ddpm_cli.engine.guidance import check_guidance

        if req.sampler is not None and req.sampler not in SAMPLERS:
            raise DdpmError(f"unknown sampler {req.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if req.steps is not None and req.steps < 1:
            raise DdpmError(f"--steps must be at least 1 (got {req.steps})")
        path, header, cfg = read_checkpoint_config(req.input)
        guidance = check_guidance(path, header, cfg, req.guidance, req.guide)
        if req.ema_decay is not None:
            require_ema_decay(header, cfg.train.ema_decay, req.ema_decay)
    elif req.input is not None:
        if (req.sampler is not None or req.steps is not None or req.guidance not in (None, 1.0)
                or req.ema_decay is not None or req.guide is not None):
            raise DdpmError(f"--sampler, --steps, --guidance, --guide-model and --ema-decay apply when a checkpoint "
                            f"is sampled, but {req.input} is not a checkpoint; drop them")
        if not Path(req.input).exists():
            raise DataError(f"{req.input} not found; pass a checkpoint (.safetensors or a run directory), or samples "
                            f"(.npz, a folder or .zip of images)")
    return guidance, open_images_or_stats(req.ref, data_root=req.data_root)


def _evaluate(req: EvalRequest, ref: ImageSource | FeatureStats, g: Guidance | None, dist_info: DistInfo,
              callbacks: EvalCallbacks | None) -> dict:
    from ddpm_cli.engine.build import resolve_device

    device = dist_info.device if dist_info.world > 1 else resolve_device(req.device)
    batch_size = req.batch_size or (250 if device.type == "cuda" else 50)
    t0 = time.perf_counter()

    model = None
    sample_info: dict = {}
    samples: ImageSource | FeatureStats | None = None
    if req.input is not None:
        if g is not None:  # a checkpoint to sample
            from ddpm_cli.diffusion.samplers import network_evaluations
            from ddpm_cli.engine.checkpoint import load_guide, load_model

            model, diffusion, cfg, ckpt = load_model(req.input, device, ema_decay=req.ema_decay)
            m = cfg.model
            guide_model = load_guide(g, ckpt, device) if g.guide is not None else None
            sampler = req.sampler or g.default_sampler
            steps = network_evaluations(diffusion, sampler, req.steps)  # what runs: distinct timesteps
            sample_info = {"checkpoint": str(ckpt.path), "step": ckpt.step, "sampler": sampler, "steps": steps,
                           "nfe_per_image": steps * (2 if g.weight != 1.0 else 1), "guidance": g.weight,
                           "seed": req.seed,
                           "ema_decay": req.ema_decay if req.ema_decay is not None else (
                               cfg.train.ema_decay if ckpt.ema_state is not None else None)}
            if g.guide is not None:
                sample_info["guide"] = str(g.guide)
                if g.stored_step is not None:
                    sample_info["guide_step"] = g.stored_step
        else:
            samples = open_images_or_stats(req.input, data_root=req.data_root, role="samples")
            if isinstance(samples, ImageSource) and req.n is not None:
                samples = first_n(samples, req.n)
    if dist_info.world > 1 and model is None and dist_info.rank != 0:
        return {}  # nothing to spread: rank 0 scores the images alone

    spread: torch.Tensor | None = None
    if model is not None:  # sampled as `ddpm sample` samples (bf16, channels-last, compiled when it pays on CUDA)
        from ddpm_cli.engine.generate import default_batch, job_nfe, sampling_net

        n, shape = req.n or DEFAULT_SAMPLES, (m.in_channels, m.image_size, m.image_size)
        # unless --batch-size says otherwise, sampled in `ddpm sample`'s batches (on a GPU twice 250's rate)
        cuda = device.type == "cuda"
        sample_batch = req.batch_size or (default_batch(m.image_size, cuda=True) if cuda else batch_size)
        nfe = job_nfe(n, sampler, req.steps, cfg.diffusion.num_timesteps, guided=g.weight != 1.0)
        net = sampling_net(model, device, nfe)
        guide = sampling_net(guide_model, device, nfe) if guide_model is not None else None
        gen = dict(image_shape=shape, num_classes=m.num_classes if m.conditional else None, sampler=sampler,
                   steps=req.steps, guidance=g.weight, guide=guide, variance=cfg.diffusion.variance,
                   seed=req.seed, device=device, bf16=device.type == "cuda")
        sample_info["precision"] = "bf16" if gen["bf16"] else "fp32"
    if model is not None and dist_info.world > 1:  # sample first, each rank its batches; rank 0 then scores
        from ddpm_cli.engine.generate import even_batch

        per = even_batch(n, sample_batch)  # the batches generate makes: batch b is images b * per ...
        mine = range(dist_info.rank, -(-n // per), dist_info.world)
        notify(callbacks, "on_phase", f"sampling ({dist_info.world} ranks)", n)
        kept = []
        for start, images in model_batches(net, diffusion, n, per, batches=mine, **gen):
            kept.append((start, images))
            notify(callbacks, "on_advance", min(n, sum(t.shape[0] for _, t in kept) * dist_info.world))
        spread = dist_info.gather_batches(kept, n, per, shape)
        if dist_info.rank != 0:
            return {}

    inception = load_inception(req.inception_weights, device)  # rank 0 alone under torchrun
    ref_stats = reference_stats(ref, inception, cache_dir=req.cache_dir, use_cache=req.use_cache,
                                batch_size=batch_size, callbacks=callbacks)
    out: dict[str, Any] = {}
    if req.save_stats is not None:
        save_stats(ref_stats, req.save_stats)
        out["stats"] = str(req.save_stats)
    if req.input is None:
        out.update({"ref": req.ref, "ref_n": ref_stats.n, "seconds": round(time.perf_counter() - t0, 2)})
        return out

    if spread is not None:
        sample_stats = compute_stats(tensor_source(spread, f"samples of {ckpt.path}"), inception,
                                     batch_size=batch_size, callbacks=callbacks, phase="samples")
    elif model is not None:
        src = model_source(net, diffusion, n, name=f"samples of {ckpt.path}", sample_batch=sample_batch, **gen)
        sample_stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="samples")
    elif isinstance(samples, FeatureStats):
        check_compatible(samples, inception, callbacks)
        sample_stats = samples
    else:
        for w in samples.warnings:
            notify(callbacks, "on_message", w)
        sample_stats = compute_stats(samples, inception, batch_size=batch_size, callbacks=callbacks,
                                     phase="samples")
    result = score(sample_stats, ref_stats, kid_subsets=req.kid_subsets, kid_subset_size=req.kid_subset_size,
                   device=device, callbacks=callbacks)
    out = {**result.as_dict(), "ref": req.ref, "input": str(req.input), **sample_info, **out,
           "inception": inception.weights_id, "seconds": round(time.perf_counter() - t0, 2)}
    return out
