"""Training data: the built-in `shapes` set, CIFAR-10 through torchvision, and any folder or .zip of images.

Every source is decoded once into one uint8 tensor (N, C, H, W) with int64 labels (a folder's, and a large shapes
set, is kept for the next run: engine/data_cache.py), except a folder too large for memory, which is decoded batch
by batch (engine/streaming.py); `Batcher` then draws shuffled batches from it (on the GPU when it fits), with a
resumable position in a seeded epoch order."""
from __future__ import annotations

import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch

from ddpm_cli.config import DataConfig, ModelConfig
from ddpm_cli.engine import data_cache
from ddpm_cli.engine.decode import batch_view, decode_files, decode_image, read_file, stack
from ddpm_cli.engine.files import cut_short_message, zip_cut_short
from ddpm_cli.engine.streaming import (StreamedImages, cores_per_rank, decoding_processes, readable_entries,
                                       should_stream, stream_workers)
from ddpm_cli.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SHAPE_CLASSES = ("circle", "square", "triangle", "h-stripes", "v-stripes", "d-stripes", "ring", "cross",
                 "checker", "diamond")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; all zero when unlabelled
    classes: list[str]    # empty when unlabelled
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


# ----------------------------------------------------------------------------------------------------------
# shapes: a procedurally generated 10-class dataset, deterministic by seed, at any size


def _shape_mask(kind: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    # Drawn at 2x and averaged down for soft edges. Coordinates are in units of the shorter side, so a circle
    # stays round in a non-square image; its centre is drawn over the middle of each side.
    side = min(height, width)
    yy, xx = (np.mgrid[0:2 * height, 0:2 * width] + 0.5) / (2 * side)
    cx, cy = rng.uniform(0.35, 0.65, 2) * (width / side, height / side)
    r = rng.uniform(0.18, 0.32)
    dx, dy = xx - cx, yy - cy
    period = rng.uniform(0.12, 0.25)
    phase = rng.uniform(0, 1)
    if kind == 0:
        m = dx**2 + dy**2 < r**2
    elif kind == 1:
        m = (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)
    elif kind == 2:
        m = (dy < r * 0.8) & (dy > -r + 2 * np.abs(dx) * 1.1)
    elif kind == 3:
        m = ((yy / period + phase) % 1) < 0.5
    elif kind == 4:
        m = ((xx / period + phase) % 1) < 0.5
    elif kind == 5:
        m = (((xx + yy) / period + phase) % 1) < 0.5
    elif kind == 6:
        d = np.sqrt(dx**2 + dy**2)
        m = (d < r) & (d > r * 0.55)
    elif kind == 7:
        w = r * 0.3
        m = ((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))
    elif kind == 8:
        m = (((xx / period).astype(int) + (yy / period).astype(int)) % 2) == 0
    else:
        m = np.abs(dx) + np.abs(dy) < r
    return m.reshape(height, 2, width, 2).mean(axis=(1, 3))


def make_shapes(count: int, image_size: int | tuple[int, int], channels: int = 3, seed: int = 0) -> ImageSet:
    """`count` images of image_size (a side, or (height, width)), class i % 10 for image i; colours, positions,
    sizes and stripes drawn per image."""
    height, width = _hw(image_size)
    out = np.empty((count, channels, height, width), dtype=np.uint8)
    labels = np.arange(count) % len(SHAPE_CLASSES)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        mask = _shape_mask(int(labels[i]), height, width, rng)[None]
        bg = rng.uniform(0.0, 0.45, (channels, 1, 1))
        fg = rng.uniform(0.55, 1.0, (channels, 1, 1))
        img = bg + (fg - bg) * mask
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64)), list(SHAPE_CLASSES))


# Sets of at least this many pixels are kept in the data cache: drawing them takes longer than reading them back
# (50,000 at 32 px: seconds a run).
SHAPES_CACHED_PIXELS = 2048 * 32 * 32


def load_shapes(cfg: DataConfig, image_size: int | tuple[int, int], channels: int) -> ImageSet:
    """make_shapes's set for data.shapes_*, drawn once and then read from the data cache."""
    height, width = _hw(image_size)
    big = cfg.shapes_count * height * width >= SHAPES_CACHED_PIXELS
    cache_key = data_cache.shapes_key(cfg.shapes_count, (height, width), channels, cfg.shapes_seed) \
        if big and data_cache.enabled() else None
    warnings = []
    if cache_key is not None:
        hit, problem = data_cache.load(cache_key)
        if hit is not None:
            images, labels, classes, _ = hit
            return ImageSet(images.contiguous(), labels, classes)  # make_shapes's layout: the same tensor
        if problem:
            warnings.append(problem)
    ds = make_shapes(cfg.shapes_count, (height, width), channels, cfg.shapes_seed)
    if cache_key is not None:
        problem = data_cache.save(cache_key, ds.images, ds.labels, ds.classes, [])
        if problem:
            warnings.append(problem)
    ds.warnings += warnings
    return ds


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision


def read_cifar10(root: Path, train: bool, download: bool, how_to: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """torchvision's CIFAR-10 under `root` as uint8 (N, 3, 32, 32), labels and class names; downloaded there when
    missing and `download` is on (its progress goes to stderr, and a failed download leaves no empty folder)."""
    import sys
    from contextlib import redirect_stdout

    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(f"CIFAR-10 not found under {root} and download is off; " + how_to) from None
        made = [p for p in (root, *root.parents) if not p.exists()]  # outermost last
        try:
            with redirect_stdout(sys.stderr):  # torchvision prints its download to stdout
                ds = CIFAR10(str(root), train=train, download=True)
        except BaseException as e:
            if made:  # the failed (or interrupted) download made these: leave neither them nor its partial file
                import shutil

                shutil.rmtree(made[-1], ignore_errors=True)
            if not isinstance(e, (OSError, RuntimeError)):  # URLError and friends: offline, DNS, permissions
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(f"CIFAR-10 is not under {root} and could not be downloaded ({reason}); "
                            + how_to) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return images, list(ds.targets), list(ds.classes)


def load_cifar10(cfg: DataConfig, image_size: int | tuple[int, int], channels: int) -> ImageSet:
    root = Path(cfg.root).expanduser()
    how_to = (f"{'check the network, ' if cfg.download else 'set data.download=true, '}or put CIFAR-10's python "
              f"archive under {root} (data.root), or train on a local copy of the images with data.dataset=folder "
              f"and data.root=PATH (a folder or .zip, e.g. cifar10-jpeg/train.zip)")
    images, targets, classes = read_cifar10(root, cfg.split == "train", cfg.download, how_to)
    images = _fit_tensor(images, image_size, channels)
    return ImageSet(images, torch.tensor(targets, dtype=torch.long), classes)


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def _fit_tensor(images: torch.Tensor, image_size: int | tuple[int, int], channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, height, width): center-cropped to the target's shape (as the folder
    loader's ImageOps.fit does), then resized."""
    if channels in (1, 2) and images.shape[1] == 3:  # gray as PIL's "L" weighs it
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if channels in (2, 4) and images.shape[1] == channels - 1:  # an opaque alpha channel, as PIL's convert adds
        images = torch.cat([images, torch.full_like(images[:, :1], 255)], 1)
    height, width = _hw(image_size)
    H, W = images.shape[-2:]
    if H * width != W * height:  # another shape: keep the largest centred part of the target's shape
        crop_h, crop_w = (round(W * height / width), W) if H * width > W * height else (H, round(H * width / height))
        top, left = (H - crop_h) // 2, (W - crop_w) // 2
        images = images[:, :, top:top + crop_h, left:left + crop_w]
    if images.shape[-2:] != (height, width):
        x = torch.nn.functional.interpolate(images.float(), size=(height, width), mode="bicubic",
                                            antialias=True, align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8)
    return images


# ----------------------------------------------------------------------------------------------------------
# folder / zip: an ImageFolder tree (class subfolders become labels) or a flat folder (unlabelled). ImageFiles
# and decode.decode_image are the one image-file reader: training decodes every file at once (load_folder), evaluation
# streams them batch by batch at their own size (evaluation.sources.files_source).


def folder_files(root: Path) -> list[Path]:
    """Every file under `root`, following symlinked folders (a class folder linked from elsewhere is data), each
    real folder once (a link loop ends); hidden files and folders (.thumbs, .ipynb_checkpoints) are left out."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        # in name order: two links to one folder give it the same (first) name on every machine
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    return found


class ImageFiles:
    """The image files of a folder (recursively, through symlinked folders) or a .zip, in sorted path order;
    hidden files and folders are skipped and files without an image extension counted (`others`). `what` names
    the path in messages (e.g. "data.root")."""

    def __init__(self, root: str | Path, what: str = ""):
        self.root = root = Path(root).expanduser()
        label = f"{what} {root}" if what else str(root)
        if not root.exists():
            raise DataError(f"{label} does not exist; point it at a folder or .zip of images" if what else
                            f"{root} not found; pass a folder or .zip of images")
        self.is_zip = root.is_file()
        if self.is_zip:
            if zip_cut_short(root):
                raise DataError(cut_short_message(label))
            if not zipfile.is_zipfile(root):
                raise DataError(f"{label} is a file but not a .zip; point it at a folder or .zip of images")
            try:
                with zipfile.ZipFile(root) as zf:
                    names = sorted(n for n in zf.namelist() if not n.endswith("/")
                                   and not PurePosixPath(n).name.startswith("."))
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read {label} ({e})") from None
            self.entries: list = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            self.rel = [PurePosixPath(n) for n in self.entries]
        else:
            files = sorted(folder_files(root))
            self.entries = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            names = files
            self.rel = [PurePosixPath(p.relative_to(root).as_posix()) for p in self.entries]
        self.others = len(names) - len(self.entries)
        if not self.entries:
            raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.entries)

    def keep(self, indices: list[int]) -> None:
        """Keep only the files at `indices` of the sorted list, in the order given."""
        self.entries = [self.entries[i] for i in indices]
        self.rel = [self.rel[i] for i in indices]

    def blobs(self, chunk: int) -> Iterator[list[bytes | None]]:
        """The files' bytes, `chunk` files at a time, in order; None for one that cannot be read (a damaged or
        encrypted .zip entry, a file without read permission), which decoding skips as unreadable."""
        zf = zipfile.ZipFile(self.root) if self.is_zip else None
        try:
            for i in range(0, len(self.entries), chunk):
                yield [read_file(zf, e) for e in self.entries[i:i + chunk]]
        finally:
            if zf is not None:
                zf.close()


def _class_layout(paths: list[PurePosixPath]) -> tuple[list[str], list[int] | None]:
    """Strip the common leading folders; if every image then sits in a subfolder, those are the classes."""
    parts = [p.parts for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    rel = [p[common:] for p in parts]
    if all(len(p) >= 2 for p in rel):
        classes = sorted({p[0] for p in rel})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[p[0]] for p in rel]
    return [], None


# From this many files a set is decoded by processes: decoding a small image is mostly Python, so threads of one
# process wait on its lock (CIFAR-10's JPEGs decode slower on two threads than on one, docs/lab-notes.md).
PROCESS_DECODE_MIN = 2048


def _decode(files: ImageFiles, size: tuple[int, int], channels: int, warnings: list[str]) -> list[np.ndarray | None]:
    """Every file of `files` decoded (decode.decode_image; None for one that cannot be read or decoded), in
    order: by processes for a large set on a machine of several cores, else by threads of this process."""
    workers = min(16, cores_per_rank())
    if len(files) >= PROCESS_DECODE_MIN and workers >= 2 and _processes_allowed():
        try:
            return _decode_in_processes(files, size, channels, workers)
        except (OSError, BrokenProcessPool) as e:  # no processes to be had here: threads do the same work
            warnings.append(f"decoding in {workers} processes failed ({e}); decoded in threads instead")
    blobs = [b for chunk in files.blobs(len(files)) for b in chunk]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return [a for a, _ in pool.map(decode_image, blobs, [size] * len(blobs), [channels] * len(blobs))]


def _processes_allowed() -> bool:
    """Whether this process may start decoding processes. A new process runs the main module's file first, and a
    user's script without an `if __name__ == "__main__":` guard would run again in each; so only where that is
    safe: no file to run (`python -c`, a notebook, the REPL), or ddpm's own (the `ddpm` command, `python -m
    ddpm_cli`, torchrun of either)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name.split(".")[0] == "ddpm_cli"
    file = getattr(main, "__file__", None)
    return file is None or Path(file).name == "ddpm"


def _decode_in_processes(files: ImageFiles, size: tuple[int, int], channels: int,
                         workers: int) -> list[np.ndarray | None]:
    names = [str(e) for e in files.entries]
    step = -(-len(names) // (8 * workers))  # eight parts a worker: an even load, few messages
    pool = decoding_processes(files, workers)
    try:
        parts = list(pool.map(decode_files, *zip(*[(names[i:i + step], size, channels)
                                                    for i in range(0, len(names), step)])))
    finally:  # on Ctrl-C too: drop the parts not started rather than wait for them
        pool.shutdown(wait=True, cancel_futures=True)
    arrays: list[np.ndarray | None] = []
    for hwc, bad in parts:
        decoded, bad = iter(batch_view(hwc)) if hwc is not None else iter(()), set(bad)
        count = (0 if hwc is None else len(hwc)) + len(bad)
        arrays += [None if k in bad else next(decoded) for k in range(count)]
    return arrays


def load_folder(cfg: DataConfig, image_size: int | tuple[int, int], channels: int) -> ImageSet:
    files = ImageFiles(cfg.root, "data.root")
    warnings: list[str] = []
    if files.others:
        warnings.append(f"skipped {files.others} file(s) in {files.root} without an image extension")
    classes, labels = _class_layout(files.rel)
    height, width = _hw(image_size)
    size = (width, height)  # PIL's order
    if should_stream(cfg.streaming, len(files), (channels, height, width)):
        keep, bad = readable_entries(files)
        if bad:
            warnings.append(f"skipped {len(bad)} file(s) that are not readable images, e.g. {bad[0]}")
        if not keep:
            raise DataError(f"none of the {len(files)} image files in {files.root} could be read")
        label_t = torch.tensor([labels[i] for i in keep] if labels else [0] * len(keep), dtype=torch.long)
        images = StreamedImages(files, keep, size, channels, stream_workers(cfg.stream_workers))
        return ImageSet(images, label_t, classes, warnings)
    cache_key = data_cache.key(files, (height, width), channels) if data_cache.enabled() else None
    if cache_key is not None:
        hit, problem = data_cache.load(cache_key)
        if hit is not None:
            images, label_t, classes, unreadable = hit
            return ImageSet(images, label_t, classes, warnings + unreadable)
        if problem:
            warnings.append(problem)
    arrays = _decode(files, size, channels, warnings)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    unreadable = []  # what decoding said: kept with the cache entry, said again when it is loaded
    if len(keep) < len(arrays):
        bad = [str(files.rel[i]) for i, a in enumerate(arrays) if a is None]
        unreadable.append(f"skipped {len(bad)} file(s) that are not readable images, e.g. {bad[0]}")
    warnings += unreadable
    if not keep:
        raise DataError(f"none of the {len(arrays)} image files in {files.root} could be decoded")
    images = torch.from_numpy(stack([arrays[i] for i in keep]))
    label_t = torch.tensor([labels[i] for i in keep] if labels else [0] * len(keep), dtype=torch.long)
    if cache_key is not None:
        problem = data_cache.save(cache_key, images, label_t, classes, unreadable)
        if problem:
            warnings.append(problem)
    return ImageSet(images, label_t, classes, warnings)


def load_dataset(data: DataConfig, model: ModelConfig) -> ImageSet:
    if data.dataset == "shapes":
        ds = load_shapes(data, model.image_size, model.in_channels)
    elif data.dataset == "cifar10":
        ds = load_cifar10(data, model.image_size, model.in_channels)
    else:
        ds = load_folder(data, model.image_size, model.in_channels)
    if model.conditional:
        if not ds.classes:
            raise DataError(f"model.conditional is on but {data.root} has no class subfolders; put images in "
                            f"one folder per class or set model.conditional=false")
        if len(ds.classes) != model.num_classes:
            raise DataError(f"model.num_classes is {model.num_classes} but the data has {len(ds.classes)} "
                            f"classes; set model.num_classes={len(ds.classes)}")
    return ds


def split_holdout(ds: ImageSet, holdout: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """A fixed random split: `holdout` images for validation, the rest for training."""
    if holdout >= len(ds):
        raise DataError(f"train.early_stopping.holdout ({holdout}) must be smaller than the dataset "
                        f"({len(ds)} images)")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 12345))
    val, train = perm[:holdout], perm[holdout:]
    streamed = isinstance(ds.images, StreamedImages)  # the training part stays undecoded, the held-out decoded
    return (ImageSet(ds.images.subset(train) if streamed else ds.images[train], ds.labels[train], ds.classes,
                     ds.warnings),
            ImageSet(ds.images[val], ds.labels[val], ds.classes))


def training_batches(cfg, ds: ImageSet, device: torch.device, rank: int = 0,
                     world: int = 1) -> tuple["Batcher", ImageSet | None]:
    """The run's Batcher over `ds` less the held-out images of early stopping (returned second, else None); the
    images live on the device when data.on_device says so (auto: on CUDA under a quarter of its free memory)."""
    tc, val = cfg.train, None
    if tc.early_stopping.enabled:
        holdout, n, batch = tc.early_stopping.holdout, len(ds), tc.batch_size * world
        if holdout < n and n - holdout < batch:  # said here: the Batcher sees only the rest, and calls it the dataset
            fix = (f"hold out at most {n - batch} images (train.early_stopping.holdout) or lower train.batch_size"
                   if n > batch else "lower train.batch_size (the dataset itself holds no more than a batch)")
            raise DataError(f"train.early_stopping.holdout {holdout} leaves {n - holdout} of the dataset's {n} images "
                            f"to train on, fewer than a batch (train.batch_size {tc.batch_size} x {world} "
                            f"process(es)); {fix}")
        ds, val = split_holdout(ds, tc.early_stopping.holdout, tc.seed)
    on_device = cfg.data.on_device == "on" or (
        cfg.data.on_device == "auto" and device.type == "cuda"
        and ds.images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0])
    return Batcher(ds, tc.batch_size, tc.seed, device, on_device, cfg.data.random_flip, rank, world), val


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


class Batcher:
    """Shuffled batches without replacement, epoch by epoch, in an order fixed by (seed, epoch).

    With `world` ranks, each optimizer step consumes world x batch_size images of the epoch order and rank r
    takes its own slice, so no image repeats within an epoch. `state_dict()` is the exact resume point."""

    def __init__(self, ds: ImageSet, batch_size: int, seed: int, device: torch.device, on_device: bool,
                 flip: bool, rank: int = 0, world: int = 1):
        n = len(ds)
        if batch_size * world > n:
            raise DataError(f"train.batch_size {batch_size} x {world} process(es) is larger than the dataset "
                            f"({n} images); lower the batch size")
        self.device, self.flip = device, flip
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.streamed = isinstance(ds.images, StreamedImages)
        on_device = on_device and not self.streamed
        self.images = ds.images.to(device) if on_device else ds.images
        self.labels = ds.labels.to(device) if on_device else ds.labels
        # From the host, each batch goes to the GPU from page-locked memory: from pageable memory the copy would
        # wait for the step already queued. A streamed set decodes into it; a gathered batch is pinned itself.
        self.pin = not on_device and device.type == "cuda"
        if self.pin and self.streamed:
            self.images = self.images.pin_memory()
        self.n = n
        self.epoch, self.pos = 0, 0
        self._perms: dict[int, torch.Tensor] = {}  # epoch -> its order (this epoch's and, streaming, the next)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g).to(self.images.device)
        return self._perms[epoch]

    def _indices(self, epoch: int, pos: int) -> tuple[int, int, torch.Tensor]:
        """This rank's images of the step at (epoch, pos), and the (epoch, pos) after it."""
        step = self.batch_size * self.world
        if pos + step > self.n:  # drop the ragged end of the epoch
            epoch, pos = epoch + 1, 0
        start = pos + self.rank * self.batch_size
        return epoch, pos + step, self._order(epoch)[start:start + self.batch_size]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; where it cannot be made (a streamed file that no longer decodes), the position stays
        before it, so that a checkpoint saved then resumes with this batch."""
        before = self.epoch, self.pos
        try:
            return self._next()
        except BaseException:
            self.epoch, self.pos = before
            raise

    def skip(self) -> None:
        """Move past the next batch without making it: a rank of several whose batch cannot be made keeps its data
        position the step's (engine/train.py)."""
        self.epoch, self.pos, _ = self._indices(self.epoch, self.pos)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.epoch, self.pos, idx = self._indices(self.epoch, self.pos)
        if self.streamed:  # decode the next batches while this one trains (this one first, if not yet asked for)
            self.images.prefetch(idx)
            epoch, pos = self.epoch, self.pos
            for _ in range(self.images.lookahead):
                epoch, pos, ahead = self._indices(epoch, pos)
                self.images.prefetch(ahead)
        x, y = self.images[idx], self.labels[idx]
        if self.pin:
            x, y = (x if x.is_pinned() else x.pin_memory()), y.pin_memory()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x = to_model_range(x)
        if self.flip:
            mask = torch.rand(x.shape[0], device=self.device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x, y

    def close(self) -> None:
        """Stop decoding ahead (a streamed set's workers); in-memory sets hold nothing to stop."""
        if self.streamed:
            self.images.close()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}  # n: the order is the set size's

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
