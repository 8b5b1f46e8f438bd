"""`ddpm eval` in the engine: check the request, draw a checkpoint's samples (draw.py: over the ranks under
torchrun), get the reference statistics (cached), and score; and FID of a model in memory for the training loop.
Never prints: progress goes through EvalCallbacks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm_cli.engine.distributed import DistInfo
from ddpm_cli.engine.draw import DrawOptions, DrawPlan, Drawer, balanced_labels, draw, load_drawer, plan_draw
from ddpm_cli.engine.evaluation.inception import Inception, check_inception_path, load_inception
from ddpm_cli.engine.evaluation.reference import check_compatible, reference_stats
from ddpm_cli.engine.evaluation.scores import EvalResult, score
from ddpm_cli.engine.evaluation.sources import (ImageSource, is_checkpoint, is_stats_file,
                                                open_images_or_stats, samples_source, tensor_source)
from ddpm_cli.engine.evaluation.stats import EvalCallbacks, FeatureStats, compute_stats, notify, save_stats
from ddpm_cli.engine.files import check_writable
from ddpm_cli.errors import DataError, DdpmError, UsageError

DEFAULT_SAMPLES = 10_000
BATCH = 256  # images a network and an Inception call take, unless told


def fid_of_model(drawer: Drawer, n: int, ref_stats: FeatureStats, inception: Inception, *, seed: int = 0,
                 batch_size: int = BATCH, kid: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 callbacks: EvalCallbacks | None = None) -> EvalResult:
    """Draw `n` images (a conditional model's labels spread evenly over the classes) from `drawer`, whose network
    is put in eval mode and back, and score them against `ref_stats`.

    For in-training FID: build `inception = load_inception(path, device)` and `ref_stats = reference_stats(ref,
    inception)` once, then call this every N steps with a Drawer of the EMA model. KID is off by default (it
    costs more)."""
    if n < 1:
        raise DdpmError(f"-n must be at least 1 (got {n})")
    model = drawer.net
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    labels = balanced_labels(n, drawer.null_class) if drawer.null_class else None
    try:
        src = samples_source(drawer, n, seed=seed, labels=labels)
        stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="samples")
    finally:
        if was_training is not None:
            model.train(was_training)
    return score(stats, ref_stats, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                 device=inception.device, callbacks=callbacks)


@dataclass
class EvalRequest:
    """Everything `ddpm eval` was asked for; defaults match the command's."""

    ref: str
    input: Path | None = None  # a checkpoint or run directory to sample, or images/statistics to score
    n: int | None = None  # checkpoint: samples to draw (default 10,000); images: n of them (default all)
    draw: DrawOptions = field(default_factory=DrawOptions)  # how a checkpoint is sampled, as `ddpm sample` takes it
    batch_size: int | None = None  # None: Inception 250 on CUDA (sampling: generate.default_batch), 50 on the CPU
    device: str = "auto"
    ref_limit: int | None = None  # use only N images of the reference (as -n picks them)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception_weights: Path | None = None  # None: torch-fidelity downloads its own
    data_root: Path = Path("data")
    cache_dir: Path | None = None  # None: stats_cache.cache_dir()
    use_cache: bool = True
    save_stats: Path | None = None  # write the reference statistics here
    overwrite: bool = False  # replace an existing save_stats file


def evaluate(req: EvalRequest, callbacks: EvalCallbacks | None = None) -> dict:
    """`ddpm eval`: reference statistics (cached), optionally saved; then, with an input, its statistics (sampling
    a checkpoint first) and the scores. Returns the JSON-ready result. Inputs are checked before any heavy work.

    Under torchrun the sampling of a checkpoint is spread over the ranks (the same images as one process); rank 0
    does the rest and gets the result, the other ranks get {}."""
    plan, ref = check_request(req)
    for w in plan.warnings if plan is not None else []:
        notify(callbacks, "on_message", w)
    dist_info = DistInfo.from_env(req.device, "--device")
    try:
        return _evaluate(req, ref, plan, dist_info, callbacks)
    finally:
        dist_info.close()


def check_request(req: EvalRequest) -> tuple[DrawPlan | None, ImageSource | FeatureStats]:
    """The cheap checks of `ddpm eval`'s arguments, paths and reference (once, before any process or heavy work
    starts); returns how a checkpoint input will be drawn (None: the input is not a checkpoint to sample), and
    the opened reference."""
    if req.n is not None and req.n < 1:
        raise UsageError(f"-n must be at least 1 (got {req.n})")
    if req.ref_limit is not None and req.ref_limit < 2:
        raise UsageError(f"--ref-limit must be at least 2 (got {req.ref_limit})")
    if req.input is None and req.save_stats is None:
        raise UsageError("nothing to do: pass samples or a checkpoint to score, or --save-stats FILE to precompute "
                         "the reference statistics")
    if req.save_stats is not None:
        target = Path(req.save_stats).resolve()
        for name, source in (("--ref", req.ref), ("input", req.input)):
            if source is not None and Path(source).resolve() == target:
                raise UsageError(f"--save-stats {req.save_stats} is also the {name}: writing the statistics there "
                                 f"would replace it; pass another file")
        if target.is_dir():
            raise UsageError(f"--save-stats {req.save_stats} is a folder; pass a file name (.npz)")
        if target.exists() and not req.overwrite:
            raise UsageError(f"{req.save_stats} exists; pass --overwrite to replace it, or another --save-stats file")
        check_writable([Path(req.save_stats)], "choose another --save-stats file")  # before the reference's work
    if req.kid_subsets < 1 or req.kid_subset_size < 2:
        raise UsageError("--kid-subsets must be at least 1 and --kid-subset-size at least 2")
    if req.inception_weights is not None:
        check_inception_path(req.inception_weights)
    plan = None
    if req.input is not None and is_checkpoint(req.input):
        plan = plan_draw(req.input, req.draw)
    elif req.input is not None:
        if req.draw.model_specific:
            raise DdpmError(f"the sampling options (--sampler, --steps, --eta, --spacing, --variance, --guidance, "
                            f"--guide-model, --ema, --ema-decay, --seed, --compile) apply when a checkpoint is "
                            f"sampled, but {req.input} is not a checkpoint; drop them")
        if not Path(req.input).exists():
            raise DataError(f"{req.input} not found; pass a checkpoint (.safetensors or a run directory), or samples "
                            f"(.npz, a folder or .zip of images)")
        if req.n is not None and is_stats_file(req.input):
            raise UsageError(f"-n picks images to score, and {req.input} holds statistics, not images: drop -n to "
                             f"score the statistics whole, or pass the images they were made from")
    ref = open_images_or_stats(req.ref, data_root=req.data_root, n=req.ref_limit, option="--ref-limit")
    if req.ref_limit is not None and isinstance(ref, FeatureStats):
        raise UsageError(f"--ref-limit picks images of a reference, and {req.ref} holds statistics; drop --ref-limit "
                         f"or pass the images")
    return plan, ref


def _sample_info(plan: DrawPlan, ckpt: Any, drawer: Drawer, seed: int) -> dict:
    """What the JSON says about the sampling: the checkpoint, sampler, evaluations, guidance, weights."""
    g, spec = plan.guidance, plan.spec
    steps = spec.evaluations(drawer.diffusion.alpha_bar)  # what runs: distinct timesteps
    info = {"checkpoint": str(ckpt.path), "step": ckpt.step, "sampler": spec.sampler, "steps": steps,
            "nfe_per_image": steps * (2 if g.weight != 1.0 else 1), "guidance": g.weight, "seed": seed,
            "ema_decay": plan.ema_used, "precision": "bf16" if drawer.bf16 else "fp32"}
    if spec.sampler == "ddim" and spec.eta:
        info["eta"] = spec.eta
    if g.guide is not None:
        info["guide"] = str(g.guide)
        if g.stored_step is not None:
            info["guide_step"] = g.stored_step
    return info


def _evaluate(req: EvalRequest, ref: ImageSource | FeatureStats, plan: DrawPlan | None, dist_info: DistInfo,
              callbacks: EvalCallbacks | None) -> dict:
    from ddpm_cli.engine.build import resolve_device
    from ddpm_cli.engine.generate import default_batch

    device = dist_info.device if dist_info.world > 1 else resolve_device(req.device, "--device")
    batch_size = req.batch_size or (250 if device.type == "cuda" else 50)
    t0 = time.perf_counter()

    # Inception first (rank 0 alone under torchrun): weights that cannot be read or downloaded are said before any
    # sampling, not after hours of it
    inception = load_inception(req.inception_weights, device) if dist_info.rank == 0 else None
    sample_info: dict = {}
    samples: ImageSource | FeatureStats | None = None
    if plan is not None:  # a checkpoint to sample, as `ddpm sample` samples (bf16, channels-last, compiled)
        n, m, seed = req.n or DEFAULT_SAMPLES, plan.config.model, req.draw.seed
        drawer, ckpt = load_drawer(plan, device, n, req.draw.compile)
        sample_info = _sample_info(plan, ckpt, drawer, seed)
        labels = balanced_labels(n, m.num_classes) if m.conditional else None
        # unless --batch-size says otherwise, sampled in `ddpm sample`'s batches (not Inception's): a sampler that
        # adds noise draws it per batch, so other batches would be other images
        sample_batch = req.batch_size or default_batch(m.image_size, cuda=device.type == "cuda")
        name = f"samples of {ckpt.path}"
        if dist_info.world > 1:  # sample first, each rank its batches; rank 0 then scores
            notify(callbacks, "on_phase", f"sampling ({dist_info.world} ranks)", n)
            images = draw(drawer, n, batch_size=sample_batch, seed=seed, labels=labels, dist=dist_info,
                          on_batch=lambda done: notify(callbacks, "on_advance", min(n, done * dist_info.world)))
            if dist_info.rank != 0:
                return {}
            samples = tensor_source(images, name)
        else:
            samples = samples_source(drawer, n, seed=seed, labels=labels, name=name, sample_batch=sample_batch)
    elif req.input is not None:
        if dist_info.world > 1 and dist_info.rank != 0:
            return {}  # nothing to spread: rank 0 scores the images alone
        samples = open_images_or_stats(req.input, data_root=req.data_root, role="samples", n=req.n)
    elif dist_info.rank != 0:
        return {}

    ref_stats = reference_stats(ref, inception, cache_dir=req.cache_dir, use_cache=req.use_cache,
                                batch_size=batch_size, callbacks=callbacks)
    out: dict[str, Any] = {}
    if req.save_stats is not None:
        save_stats(ref_stats, req.save_stats)
        out["stats"] = str(req.save_stats)
    if samples is None:
        out.update({"ref": req.ref, "ref_n": ref_stats.n, "seconds": round(time.perf_counter() - t0, 2)})
        return out

    if isinstance(samples, FeatureStats):
        check_compatible(samples, inception, callbacks)
        sample_stats = samples
    else:
        for w in samples.warnings:
            notify(callbacks, "on_message", w)
        sample_stats = compute_stats(samples, inception, batch_size=batch_size, callbacks=callbacks,
                                     phase="samples")
    sizes = [s.meta.get("image_size") for s in (sample_stats, ref_stats)]
    if all(sizes) and sizes[0] != sizes[1]:  # statistics from before sizes were kept say nothing
        (h, w), (rh, rw) = sizes
        notify(callbacks, "on_warning", f"the samples are {h}x{w} and the reference {rh}x{rw}: Inception resizes "
                                        f"both to 299x299, so the score also measures the difference in "
                                        f"resolution; compare sets of one size")
    result = score(sample_stats, ref_stats, kid_subsets=req.kid_subsets, kid_subset_size=req.kid_subset_size,
                   device=device, callbacks=callbacks)
    counts = [s.n for s in (sample_stats, ref_stats) if s.n is not None]
    if counts and min(counts) < sample_stats.dim:
        notify(callbacks, "on_warning", f"FID of {min(counts):,} images in {sample_stats.dim:,} feature dimensions "
                                        f"is biased upward (the covariance cannot reach full rank below "
                                        f"{sample_stats.dim:,} images): compare it only with FIDs of the same "
                                        f"numbers of images")
    out = {**result.as_dict(), "ref": req.ref, "input": str(req.input), **sample_info, **out,
           "inception": inception.weights_id, "seconds": round(time.perf_counter() - t0, 2)}
    if req.ref_limit is not None:
        out["ref_limit"] = req.ref_limit
    return out
