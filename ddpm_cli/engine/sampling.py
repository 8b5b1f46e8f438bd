"""`ddpm sample` in the engine: check the options against the checkpoint (header only, no torch), plan which
class each image gets and where it goes, then generate in batches and write PNG files, an NPZ and a grid.

Never prints: progress goes through callbacks, problems are DdpmError with the fix in the message."""
from __future__ import annotations

import io
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from ddpm_cli.config import RunConfig
from ddpm_cli.engine.checkpoint import Header, has_ema_weights, read_checkpoint_config, require_ema_decay
from ddpm_cli.engine.files import atomic_write_bytes
from ddpm_cli.engine.guidance import Guidance, check_guidance
from ddpm_cli.errors import DdpmError

SAMPLERS = ("ddpm", "ddim", "dpm++2m")  # mirrors diffusion.samplers.SAMPLERS without importing torch
SPACINGS = ("uniform", "quadratic", "logsnr")
GRID_MAX = 1024  # a grid shows at most this many images (a 32x32 grid is already 1,100 px wide)
PNG_WRITERS = 4  # threads encoding PNGs while a GPU samples the next batch (zlib releases the GIL); 1 on the CPU


@dataclass
class SampleRequest:
    """Everything `ddpm sample` was asked for; defaults match the command's."""

    checkpoint: Path
    n: int
    per_class: bool = False
    class_index: int | None = None
    batch_size: int | None = None  # None: generate.default_batch (1000 at 32x32 on a GPU, 256 on the CPU)
    seed: int = 0
    ema: bool | None = None  # None: the EMA weights when the checkpoint has them
    ema_decay: float | None = None  # one of the checkpoint's EMA weights by decay (train.ema_decay or ema_extra)
    device: str = "auto"
    out: Path | None = None  # None: no per-image files (only a grid, if asked for)
    fmt: Literal["png", "npz"] = "png"
    grid: Path | None = None
    sampler: str | None = None  # None: ddim, or dpm++2m for a checkpoint autoguided by its stored guide
    steps: int | None = None  # None: the sampler's default (all T for ddpm)
    eta: float = 0.0
    spacing: str | None = None  # None: the sampler's default
    variance: str | None = None  # None: the checkpoint's diffusion.variance
    guidance: float | None = None  # None: the stored guide's weight if the checkpoint carries one, else 1 (off)
    guide: Path | str | None = None  # autoguidance by this weaker checkpoint (its EMA weights); "none": no guide
    overwrite: bool = False
    compile: Literal["auto", "on", "off"] = "auto"  # auto: on CUDA for jobs of at least generate.COMPILE_MIN_NFE


@dataclass
class SamplePlan:
    """What will be made and where, decided before any torch import."""

    checkpoint: Path
    header: Header
    config: RunConfig
    labels: list[int] | None  # one class per image, or None for an unconditional model
    files: list[Path]  # one PNG per image (empty unless --out with png)
    npz: Path | None
    grid: Path | None
    use_ema: bool
    warnings: list[str] = field(default_factory=list)
    ema_decay: float | None = None
    guidance: Guidance = field(default_factory=Guidance)
    sampler: str = "ddim"

    @property
    def weights(self) -> str:
        """Which weights are drawn from, in words (an export says what it was made of)."""
        if self.ema_decay is not None:
            return f"EMA {self.ema_decay}"
        if self.use_ema:
            return "EMA"
        source = self.header.metadata.get("source_weights")
        return f"exported {'raw' if source == 'model' else source.replace('ema', 'EMA', 1)}" if source else "raw"


@dataclass
class SampleResult:
    n: int
    seconds: float
    files: list[Path]
    npz: Path | None
    grid: Path | None
    device: str
    compiled: bool = False
    first_batch_s: float = 0.0  # with `compiled`, it includes compiling (or loading from torch's cache)

    @property
    def images_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)


def plan_labels(n: int, *, conditional: bool, num_classes: int, per_class: bool = False,
                class_index: int | None = None) -> list[int] | None:
    """The class of each of the n images: None for an unconditional model; `class_index` for all; with
    `per_class` contiguous blocks of n / num_classes (the remainder to the first classes); else classes in turn."""
    if n < 1:
        raise DdpmError(f"-n must be at least 1 (got {n})")
    if per_class and class_index is not None:
        raise DdpmError("pass either --per-class or --class, not both")
    if not conditional:
        if per_class:
            raise DdpmError("--per-class needs a class-conditional model, and this checkpoint is unconditional; "
                            "drop --per-class")
        if class_index is not None:
            raise DdpmError("--class needs a class-conditional model, and this checkpoint is unconditional; "
                            "drop --class")
        return None
    if class_index is not None:
        if not 0 <= class_index < num_classes:
            raise DdpmError(f"--class {class_index} is out of range: this model has {num_classes} classes "
                            f"(0 to {num_classes - 1})")
        return [class_index] * n
    if per_class:
        base, extra = divmod(n, num_classes)
        return [k for k in range(num_classes) for _ in range(base + (k < extra))]
    return [i % num_classes for i in range(n)]


def image_name(index: int, label: int | None, width: int = 6) -> str:
    """`class3_000042.png` for a conditional model, `000042.png` otherwise."""
    return f"{index:0{width}d}.png" if label is None else f"class{label}_{index:0{width}d}.png"


def _check_free(paths: list[Path], overwrite: bool) -> None:
    if overwrite:
        return
    taken = [p for p in paths if p.exists()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise DdpmError(f"{taken[0]} already exists{more}; pass --overwrite or choose another --out/--grid")


def plan_sampling(req: SampleRequest) -> SamplePlan:
    """Check every option against the checkpoint's header and the output paths; import no torch."""
    if req.batch_size is not None and req.batch_size < 1:
        raise DdpmError(f"--batch-size must be at least 1 (got {req.batch_size})")
    if req.sampler is not None and req.sampler not in SAMPLERS:
        raise DdpmError(f"unknown sampler {req.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if req.steps is not None and req.steps < 1:
        raise DdpmError(f"--steps must be at least 1 (got {req.steps})")
    if req.spacing is not None and req.spacing not in SPACINGS:
        raise DdpmError(f"unknown spacing {req.spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not 0.0 <= req.eta <= 1.0:
        raise DdpmError(f"--eta must be between 0 and 1 (got {req.eta})")
    if req.fmt not in ("png", "npz"):
        raise DdpmError(f"unknown format {req.fmt!r}; choose png or npz")
    path, header, cfg = read_checkpoint_config(req.checkpoint)
    m = cfg.model
    labels = plan_labels(req.n, conditional=m.conditional, num_classes=m.num_classes, per_class=req.per_class,
                         class_index=req.class_index)
    warnings: list[str] = []
    guidance = check_guidance(path, header, cfg, req.guidance, req.guide)
    sampler = req.sampler or guidance.default_sampler
    if guidance.weight != 1.0 and guidance.guide is None:
        if cfg.train.label_dropout == 0.0:
            warnings.append("this model was trained without label dropout (train.label_dropout = 0), so its "
                            "'no label' input is untrained and --guidance will give poor images")
    if sampler == "ddpm" and req.steps is not None and req.steps != cfg.diffusion.num_timesteps:
        warnings.append(f"the ddpm sampler always takes all T = {cfg.diffusion.num_timesteps} steps; --steps "
                        f"is ignored (use --sampler ddim or dpm++2m for fewer)")
    if sampler != "ddim" and req.eta != 0.0:
        why = (" (the default sampler of a checkpoint with a stored guide; pass --sampler ddim)"
               if req.sampler is None else "")
        warnings.append(f"--eta applies to ddim only, and this samples with {sampler}{why}; ignored")
    has_ema = has_ema_weights(header)
    if req.ema and not has_ema:
        raise DdpmError(f"{path} has no EMA weights; drop --ema (or pass --no-ema)")
    use_ema = has_ema if req.ema is None else req.ema
    if req.ema_decay is not None:
        if req.ema is False:
            raise DdpmError("--ema-decay picks EMA weights; drop --no-ema")
        require_ema_decay(header, cfg.train.ema_decay, req.ema_decay)
        use_ema = True

    files: list[Path] = []
    npz = None
    if req.out is not None:
        if req.fmt == "png":
            width = max(6, len(str(req.n - 1)))
            labs = labels if labels is not None else [None] * req.n
            files = [req.out / image_name(i, labs[i], width) for i in range(req.n)]
        else:
            npz = req.out if req.out.suffix == ".npz" else req.out / "samples.npz"
        if req.out.exists() and not req.out.is_dir() and req.fmt == "png":
            raise DdpmError(f"--out {req.out} is a file; pass a directory for the PNG files")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 checks, before any rank writes
        _check_free(files + [p for p in (npz, req.grid) if p is not None], req.overwrite)
    return SamplePlan(path, header, cfg, labels, files, npz, req.grid, use_ema, warnings, req.ema_decay, guidance,
                      sampler)


def grid_layout(labels: list[int] | None, n: int, per_class: bool, num_classes: int) -> list[list[int]]:
    """Rows of image indices for the grid: a row per class with `per_class`, else a near-square block."""
    if per_class and labels is not None:
        per = max(1, GRID_MAX // num_classes)
        rows = [[i for i, k in enumerate(labels) if k == c][:per] for c in range(num_classes)]
        return [r for r in rows if r]
    n = min(n, GRID_MAX)
    ncol = max(1, math.ceil(math.sqrt(n)))
    return [list(range(i, min(n, i + ncol))) for i in range(0, n, ncol)]


def tile(images, rows: list[list[int]], padding: int = 2):
    """uint8 numpy images (N, C, H, W) -> one (H', W', C) image, rows padded with black cells."""
    import numpy as np

    _, C, H, W = images.shape
    ncol = max(len(r) for r in rows)
    canvas = np.zeros((padding + len(rows) * (H + padding), padding + ncol * (W + padding), C), dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, i in enumerate(row):
            y, x = padding + r * (H + padding), padding + c * (W + padding)
            canvas[y:y + H, x:x + W] = images[i].transpose(1, 2, 0)
    return canvas


def _png_bytes(hwc) -> bytes:
    from PIL import Image

    img = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, hwc) -> None:
    """One uint8 (H, W, C) image as PNG (C = 1 grayscale, 3 RGB, 4 RGBA)."""
    try:
        path.write_bytes(_png_bytes(hwc))
    except OSError as e:
        raise DdpmError(f"cannot write {path}: {e.strerror or e}") from None


class PngWriter:
    """Writes batches of PNGs on `threads` threads. The first failed write is raised by a later submit() or on
    leaving the `with` block, which waits for every write."""

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="png")
        self.pending: list = []

    def submit(self, paths: list[Path], images) -> None:
        """images: uint8 (b, C, H, W), one per path."""
        self._raise_failed(done_only=True)
        self.pending.append(self.pool.submit(_write_pngs, paths, images))

    def _raise_failed(self, done_only: bool) -> None:
        waiting = []
        for f in self.pending:
            if done_only and not f.done():
                waiting.append(f)
            else:
                f.result()  # re-raises the write's DdpmError
        self.pending = waiting

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self._raise_failed(done_only=False)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _write_pngs(paths: list[Path], images) -> None:
    for path, chw in zip(paths, images):
        write_png(path, chw.transpose(1, 2, 0))


def write_npz(path: Path, images, labels) -> None:
    """`arr_0`: uint8 (N, H, W, C) as FID tools read it; `labels`: int64 (N,) for a conditional model."""
    import numpy as np

    arrays = {"arr_0": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise DdpmError(f"cannot write {path}: {e.strerror or e}") from None


def run_sampling(plan: SamplePlan, req: SampleRequest, *, on_start: Callable[[str], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> SampleResult:
    """Load the model, generate `req.n` images in batches of at most `req.batch_size` (evened out; default
    generate.default_batch), write the outputs.

    `on_start(device)` once the model is loaded; `on_step(i, steps)` after each network step of a batch;
    `on_batch(done, n)` after each batch."""
    import numpy as np
    import torch

    from ddpm_cli.engine.build import resolve_device
    from ddpm_cli.engine.checkpoint import load_guide, load_model
    from ddpm_cli.engine.generate import default_batch, even_batch, generate, job_nfe, sampling_net

    from ddpm_cli.engine.distributed import DistInfo

    # Under torchrun each rank draws the batches b = rank, rank + world, ... of the same plan, so N GPUs make
    # exactly the images one GPU makes with the same seed and batch size.
    dist_info = DistInfo.from_env()
    device = dist_info.device if dist_info.world > 1 else resolve_device(req.device)
    image_size = plan.config.model.image_size
    batch_size = even_batch(req.n, req.batch_size or default_batch(image_size, device.type == "cuda"))
    num_batches = (req.n + batch_size - 1) // batch_size  # generate's batches: b is images b * batch_size ...
    my_batches = range(dist_info.rank, num_batches, dist_info.world)
    model, diffusion, cfg, ckpt = load_model(plan.checkpoint, device, use_ema=plan.use_ema,
                                             ema_decay=plan.ema_decay)
    m = cfg.model
    cuda = device.type == "cuda"
    g = plan.guidance
    nfe = job_nfe(req.n, plan.sampler, req.steps, cfg.diffusion.num_timesteps, guided=g.weight != 1.0)
    net = sampling_net(model, device, nfe, req.compile)
    guide = None
    if g.guide is not None:
        guide = sampling_net(load_guide(g, ckpt, device), device, nfe, req.compile)
    labels = torch.tensor(plan.labels, dtype=torch.long) if plan.labels is not None else None
    for d in {p.parent for p in plan.files} | {p.parent for p in (plan.npz, plan.grid) if p is not None}:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DdpmError(f"cannot create folder {d}: {e.strerror or e}") from None

    if on_start:
        on_start(str(device))
    keep_all = plan.npz is not None or plan.grid is not None
    kept: list = []
    t0 = time.perf_counter()
    done, first_batch_s = 0, 0.0
    # PNGs are written by threads while the GPU samples the next batch (10,000 PNGs take seconds to encode)
    with PngWriter(PNG_WRITERS if cuda else 1) if plan.files else nullcontext() as pngs:
        for start, batch, _ in generate(net, diffusion, req.n,
                                        image_shape=(m.in_channels, m.image_size, m.image_size), labels=labels,
                                        batch_size=batch_size, sampler=plan.sampler, steps=req.steps, eta=req.eta,
                                        spacing=req.spacing, variance=req.variance or cfg.diffusion.variance,
                                        guidance=g.weight, null_class=m.num_classes if m.conditional else None,
                                        guide=guide, seed=req.seed, device=device, bf16=cuda, batches=my_batches,
                                        on_step=on_step):
            arr = batch.numpy()  # (b, C, H, W) uint8
            if plan.files:
                pngs.submit(plan.files[start:start + arr.shape[0]], arr)
            if keep_all:
                kept.append((start, arr))
            done += arr.shape[0]
            if on_batch:
                on_batch(done, req.n)
            first_batch_s = first_batch_s or time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    dist_info.barrier()  # every rank's PNGs are written
    if keep_all and dist_info.world > 1:
        kept = _gather_parts(plan, kept, dist_info)
    if keep_all and dist_info.rank == 0:
        kept.sort(key=lambda item: item[0])
        images = np.concatenate([arr for _, arr in kept])  # (N, C, H, W)
        if plan.npz is not None:
            write_npz(plan.npz, images.transpose(0, 2, 3, 1), plan.labels)
        if plan.grid is not None:
            rows = grid_layout(plan.labels, req.n, req.per_class, m.num_classes)
            grid = tile(images, rows)
            try:
                atomic_write_bytes(plan.grid, _png_bytes(grid))
            except OSError as e:
                raise DdpmError(f"cannot write {plan.grid}: {e.strerror or e}") from None
    dist_info.finish_together()  # no rank tears the group down while rank 0 still writes (see finish_together)
    dist_info.close()
    return SampleResult(req.n, seconds, plan.files, plan.npz, plan.grid, str(device),
                        compiled=getattr(net, "compiled", False), first_batch_s=first_batch_s)


def _gather_parts(plan: SamplePlan, kept: list, dist_info) -> list:
    """Several ranks: each saves its batches to a part file beside the output (npz, no pickle); rank 0 reads
    them all back, in index order, and removes them."""
    import numpy as np

    anchor = plan.npz or plan.grid
    part = lambda r: anchor.with_name(f".{anchor.name}.part{r}.npz")  # noqa: E731
    arrays = {f"s{start}": arr for start, arr in kept}
    with open(part(dist_info.rank), "wb") as f:
        np.savez(f, **arrays)
    dist_info.barrier()
    if dist_info.rank != 0:
        return []
    out = []
    for r in range(dist_info.world):
        with np.load(part(r), allow_pickle=False) as z:
            out += [(int(k[1:]), z[k]) for k in z.files]
        part(r).unlink()
    return out
