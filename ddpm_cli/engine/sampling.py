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

from ddpm_cli.engine.draw import DrawOptions, DrawPlan, plan_draw
from ddpm_cli.engine.files import atomic_write_bytes, check_writable
from ddpm_cli.errors import DdpmError, UsageError

GRID_MAX = 1024  # a grid shows at most this many images (a 32x32 grid is already 1,100 px wide)
PNG_WRITERS = 4  # threads encoding PNGs while a GPU samples the next batch (zlib releases the GIL); 1 on the CPU


@dataclass
class SampleRequest:
    """Everything `ddpm sample` was asked for; defaults match the command's."""

    checkpoint: Path
    n: int
    draw: DrawOptions = field(default_factory=DrawOptions)  # sampler, guidance, weights, seed, compile
    per_class: bool = False
    class_index: int | None = None
    batch_size: int | None = None  # None: generate.default_batch (1000 at 32x32 on a GPU, 256 on the CPU)
    device: str = "auto"
    out: Path | None = None  # None: no per-image files (only a grid, if asked for)
    fmt: Literal["png", "npz"] = "png"
    grid: Path | None = None
    overwrite: bool = False


@dataclass
class SamplePlan:
    """What will be made and where, decided before any torch import."""

    draw: DrawPlan
    labels: list[int] | None  # one class per image, or None for an unconditional model
    files: list[Path]  # one PNG per image (empty unless --out with png)
    npz: Path | None
    grid: Path | None

    @property
    def checkpoint(self) -> Path:
        return self.draw.path

    @property
    def config(self):
        return self.draw.config

    @property
    def warnings(self) -> list[str]:
        return self.draw.warnings


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
    compile_cache: str = ""  # with `compiled`: the compile cache's state (engine.compile_cache.CompileCache.state)

    @property
    def images_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)


def plan_labels(n: int, *, conditional: bool, num_classes: int, per_class: bool = False,
                class_index: int | None = None) -> list[int] | None:
    """The class of each of the n images: None for an unconditional model; `class_index` for all; with
    `per_class` contiguous blocks of n / num_classes (n must be a multiple of num_classes); else classes in turn."""
    if n < 1:
        raise UsageError(f"-n must be at least 1 (got {n})")
    if per_class and class_index is not None:
        raise UsageError("pass either --per-class or --class, not both")
    if not conditional:
        if per_class:
            raise UsageError("--per-class needs a class-conditional model, and this checkpoint is unconditional; "
                             "drop --per-class")
        if class_index is not None:
            raise UsageError("--class needs a class-conditional model, and this checkpoint is unconditional; "
                             "drop --class")
        return None
    if class_index is not None:
        if not 0 <= class_index < num_classes:
            raise UsageError(f"--class {class_index} is out of range: this model has {num_classes} classes "
                             f"(0 to {num_classes - 1})")
        return [class_index] * n
    if per_class:
        per, extra = divmod(n, num_classes)
        if extra:
            lower, upper = per * num_classes, (per + 1) * num_classes
            nearest = f"-n {upper}" if per == 0 else f"-n {lower} or -n {upper}"
            raise UsageError(f"--per-class gives every class the same number of images, and -n {n} does not split "
                             f"over this model's {num_classes} classes; pass a multiple of {num_classes} "
                             f"({nearest})")
        return [k for k in range(num_classes) for _ in range(per)]
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
    if req.n < 1:
        raise UsageError(f"-n must be at least 1 (got {req.n})")
    if req.batch_size is not None and req.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {req.batch_size})")
    if req.per_class and req.class_index is not None:
        raise UsageError("pass either --per-class or --class, not both")
    if req.fmt not in ("png", "npz"):
        raise DdpmError(f"unknown format {req.fmt!r}; choose png or npz")
    draw = plan_draw(req.checkpoint, req.draw)
    m = draw.config.model
    labels = plan_labels(req.n, conditional=m.conditional, num_classes=m.num_classes, per_class=req.per_class,
                         class_index=req.class_index)
    files: list[Path] = []
    npz = None
    if req.out is not None:
        if req.fmt == "png":
            width = max(6, len(str(req.n - 1)))
            labs = labels if labels is not None else [None] * req.n
            files = [req.out / image_name(i, labs[i], width) for i in range(req.n)]
        else:
            npz = req.out if req.out.suffix.lower() == ".npz" else req.out / "samples.npz"  # x.NPZ too, as the CLI
        if req.out.exists() and not req.out.is_dir() and req.fmt == "png":
            raise DdpmError(f"--out {req.out} is a file; pass a directory for the PNG files")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 checks, before any rank writes
        _check_free(files + [p for p in (npz, req.grid) if p is not None], req.overwrite)
        # an NPZ, grid or folder of PNGs that cannot be written fails now, not after every image has been drawn
        folders = list({f.parent: f for f in files}.values())  # one PNG of each folder
        check_writable([p for p in (npz, req.grid) if p is not None] + folders, "choose another --out or --grid")
    return SamplePlan(draw, labels, files, npz, req.grid)


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
    """Load the model, draw `req.n` images in batches of at most `req.batch_size` (evened out; default
    generate.default_batch), write the outputs. Under torchrun each rank draws its share of the batches (the
    images one process makes) and writes its PNGs; rank 0 writes the NPZ and the grid.

    `on_start(device)` once the model is loaded; `on_step(i, steps)` after each network step of a batch;
    `on_batch(done, n)` after each batch."""
    import torch

    from ddpm_cli.engine.build import resolve_device
    from ddpm_cli.engine.compile_cache import state_of
    from ddpm_cli.engine.distributed import DistInfo
    from ddpm_cli.engine.draw import draw, load_drawer
    from ddpm_cli.engine.generate import default_batch, even_batch

    dist_info = DistInfo.from_env(req.device, "--device")
    device = dist_info.device if dist_info.world > 1 else resolve_device(req.device, "--device")
    m = plan.config.model
    cuda = device.type == "cuda"
    batch_size = even_batch(req.n, req.batch_size or default_batch(m.image_size, cuda))
    drawer, _ = load_drawer(plan.draw, device, req.n, req.draw.compile)
    labels = torch.tensor(plan.labels, dtype=torch.long) if plan.labels is not None else None
    for d in {p.parent for p in plan.files} | {p.parent for p in (plan.npz, plan.grid) if p is not None}:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DdpmError(f"cannot create folder {d}: {e.strerror or e}") from None

    if on_start:
        on_start(str(device))
    keep_all = plan.npz is not None or plan.grid is not None
    t0 = time.perf_counter()
    first_batch_s = 0.0

    def each(start: int, images) -> None:
        nonlocal first_batch_s
        if plan.files:
            pngs.submit(plan.files[start:start + images.shape[0]], images.numpy())
        first_batch_s = first_batch_s or time.perf_counter() - t0

    # PNGs are written by threads while the GPU samples the next batch (encoding thousands of PNGs takes seconds)
    with PngWriter(PNG_WRITERS if cuda else 1) if plan.files else nullcontext() as pngs:
        images = draw(drawer, req.n, batch_size=batch_size, seed=req.draw.seed, labels=labels, dist=dist_info,
                      each=each, gather=keep_all, on_step=on_step,
                      on_batch=(lambda done: on_batch(done, req.n)) if on_batch else None)
    seconds = time.perf_counter() - t0
    if images is not None:  # rank 0 holds every rank's images
        images = images.numpy()  # (N, C, H, W) uint8
        if plan.npz is not None:
            write_npz(plan.npz, images.transpose(0, 2, 3, 1), plan.labels)
        if plan.grid is not None:
            rows = grid_layout(plan.labels, req.n, req.per_class, m.num_classes)
            try:
                atomic_write_bytes(plan.grid, _png_bytes(tile(images, rows)))
            except OSError as e:
                raise DdpmError(f"cannot write {plan.grid}: {e.strerror or e}") from None
    dist_info.finish_together()  # no rank tears the group down while rank 0 still writes (see finish_together)
    dist_info.close()
    return SampleResult(req.n, seconds, plan.files, plan.npz, plan.grid, str(device), compiled=drawer.compiled,
                        first_batch_s=first_batch_s, compile_cache=state_of(drawer.net))
