"""Image sources for evaluation: a stream of uint8 batches of known length, from a folder or .zip, an .npz, images
in memory, CIFAR-10, a run config's dataset or a model's samples; and what a --ref or input path names."""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ddpm_cli.engine.data import ImageFiles, folder_files, read_cifar10
from ddpm_cli.engine.decode import decode_image, fingerprint
from ddpm_cli.engine.evaluation.inception import short_reason
from ddpm_cli.engine.evaluation.stats import FeatureStats, is_stats, load_stats, open_npz
from ddpm_cli.engine.files import cut_short_message, zip_cut_short
from ddpm_cli.errors import DataError

CIFAR10_REFS = ("cifar10-train", "cifar10-test")
NPZ_IMAGE_KEYS = ("images", "samples", "arr_0")


@dataclass
class ImageSource:
    """A stream of uint8 image batches (B, C, H, W) of known length; `key` identifies it for the cache."""

    name: str
    count: int
    batches: Callable[[int], Iterator[torch.Tensor]]
    key: dict | None = None  # None: never cached
    warnings: list[str] = field(default_factory=list)
    prepare: Callable[[], None] | None = None  # fills count and batches when first needed (a cache hit skips it)
    images: Any = None  # where the batches come from images in memory or streamed: them, to be read by index

    def ready(self) -> "ImageSource":
        """Run `prepare` once (decode a dataset only when its images are needed)."""
        if self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            prepare()
        return self




def tensor_source(images: torch.Tensor | np.ndarray, name: str, key: dict | None = None) -> ImageSource:
    """A source over images already in memory, uint8 (N, C, H, W), or streamed from files (StreamedImages)."""
    images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images

    def batches(bs: int) -> Iterator[torch.Tensor]:
        for i in range(0, images.shape[0], bs):
            yield images[i:i + bs]

    return ImageSource(name, int(images.shape[0]), batches, key, images=images)


def _signature(path: Path) -> list:
    """What changes when a file or folder changes: its path, sizes and modification times."""
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    h = hashlib.sha256()
    count = 0
    for p in sorted(folder_files(path)):  # the files ImageFiles reads, linked folders included
        st = p.stat()
        # (surrogateescape: a name that is not UTF-8 keeps its bytes, as the file system gave them)
        h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8",
                                                                                             "surrogateescape"))
        count += 1
    return [str(path), count, h.hexdigest()]


def evenly_spread(total: int, n: int) -> list[int]:
    """Indices of `n` of `total` items, spread evenly over them in order (floor(i * total / n) for i < n); all of
    them when n >= total. Of files in sorted path order (a per-class folder's classes one after another) each class
    keeps its share, where the first n would be the first classes alone."""
    if n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def files_source(path: str | Path, n: int | None = None, option: str = "-n") -> ImageSource:
    """Every image in a folder (recursively, any ImageFolder-like tree) or a .zip, in sorted path order, read by
    the reader training uses (data.ImageFiles, decode.decode_image) but streamed batch by batch. With `n`, only n
    of the files, spread evenly over the sorted paths (evenly_spread); for -n more than it holds are refused, for
    --ref-limit (a limit, not a demand) all of them are used.

    Images are used at their own size (Inception resizes them as TensorFlow does); ones whose size differs from
    the first image's are center-cropped and resized to it (a warning says how many)."""
    root = Path(path)
    if root.is_file() and zip_cut_short(root):
        raise DataError(cut_short_message(str(root)))
    if root.is_file() and not zipfile.is_zipfile(root):
        raise DataError(f"{root} is neither a folder nor a .zip of images")
    files = ImageFiles(root)
    name, key = str(root), {"kind": "files", "path": _signature(root), "decoder": fingerprint()}
    if n is not None and n > len(files) and option == "-n":
        raise DataError(f"-n {n} but {root} holds {len(files)} images; lower -n or leave it out to use all")
    if n is not None and n < len(files):
        name, key["spread"] = f"{root} ({n:,} of {len(files):,} files, spread evenly)", n
        files.keep(evenly_spread(len(files), n))
    src = ImageSource(name, len(files), lambda bs: iter(()), key)

    def batches(bs: int) -> Iterator[torch.Tensor]:
        size: tuple[int, int] | None = None  # (W, H) of the first readable image; the others are fitted to it
        bad = resized = 0
        try:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for blobs in files.blobs(bs):
                    if size is None:
                        for blob in blobs:
                            first, _ = decode_image(blob)
                            if first is not None:
                                size = (first.shape[2], first.shape[1])
                                break
                    decoded = list(pool.map(decode_image, blobs, [size] * len(blobs)))
                    good = [a for a, _ in decoded if a is not None]
                    bad += len(decoded) - len(good)
                    resized += sum(r for _, r in decoded)
                    if good:
                        yield torch.from_numpy(np.stack(good))  # (B, 3, H, W)
        finally:
            if bad:
                src.warnings.append(f"skipped {bad} file(s) in {root} that are not readable images")
            if resized:
                src.warnings.append(f"{resized} image(s) in {root} differ in size from the first one and were "
                                    f"center-cropped and resized to {size[1]}x{size[0]} (height x width)")

    src.batches = batches
    return src


def _npz_images(z, path: Path) -> np.ndarray:
    keys = [k for k in NPZ_IMAGE_KEYS if k in z.files] or [k for k in z.files if z[k].ndim == 4]
    if not keys:
        raise DataError(f"{path} holds no images (looked for a 4-d uint8 array named {', '.join(NPZ_IMAGE_KEYS)})")
    try:
        arr = z[keys[0]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read array {keys[0]!r} of {path} ({short_reason(e)})") from None
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[:, None]
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise DataError(f"{path}: {keys[0]!r} is {arr.dtype} {arr.shape}; expected uint8 images (N, H, W, C) or "
                        f"(N, C, H, W) with values 0-255")
    if arr.shape[-1] in (1, 2, 3, 4) and arr.shape[1] not in (1, 2, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif arr.shape[1] not in (1, 2, 3, 4):
        raise DataError(f"{path}: cannot tell the channel axis of {keys[0]!r} {arr.shape}; expected (N, H, W, C) or "
                        f"(N, C, H, W) with 1 to 4 channels (gray, gray + alpha, RGB, RGBA)")
    return np.ascontiguousarray(arr)


def npz_source(path: str | Path) -> ImageSource:
    """Images in an .npz (`ddpm sample --format npz` writes `arr_0` as (N, H, W, C) uint8)."""
    path = Path(path)
    with open_npz(path) as z:
        arr = _npz_images(z, path)
    return tensor_source(torch.from_numpy(arr), str(path), {"kind": "npz", "path": _signature(path)})


def cifar10_source(split: str, data_root: str | Path) -> ImageSource:
    """torchvision's CIFAR-10 (its python archive under `data_root`; downloaded there when missing and online),
    read as training reads it (data.read_cifar10)."""
    root = Path(data_root).expanduser()
    how_to = (f"put CIFAR-10's python archive (cifar-10-batches-py) under {root} with --data-root, or pass --ref a "
              f"folder or .zip of its images (e.g. cifar10-jpeg/{split}.zip)")
    images, _, _ = read_cifar10(root, split == "train", True, how_to)
    key = {"kind": "cifar10", "split": split, "path": _signature(root / "cifar-10-batches-py")}
    return tensor_source(images, f"cifar10-{split}", key)


def config_source(path: str | Path) -> ImageSource:
    """The dataset a run config's data section names, as `ddpm train` loads it (resized to model.image_size)."""
    from ddpm_cli.config import load_config
    from ddpm_cli.engine.data import load_dataset

    cfg = load_config(path)
    model = cfg.model.model_copy(update={"conditional": False})  # labels play no part in FID
    root = Path(cfg.data.root).expanduser()
    data = cfg.data.model_dump(mode="json")
    for k in ("random_flip", "on_device", "download"):
        data.pop(k, None)
    key = {"kind": "config", "data": data, "image_size": model.image_size, "channels": model.in_channels}
    if cfg.data.dataset == "folder":
        if not root.exists():
            raise DataError(f"{path}: data.root {root} does not exist; point it at a folder or .zip of images")
        key["path"], key["decoder"] = _signature(root), fingerprint()
    elif cfg.data.dataset == "cifar10":
        key["path"] = _signature(root / "cifar-10-batches-py") if (root / "cifar-10-batches-py").exists() else None
    src = ImageSource(f"{path} ({cfg.data.dataset} data)", 0, lambda bs: iter(()), key)

    def prepare() -> None:  # decoding a large folder takes a while: only on a cache miss
        with redirect_stdout(sys.stderr):  # a torchvision download prints to stdout, which holds our JSON
            ds = load_dataset(cfg.data, model)
        loaded = tensor_source(ds.images, src.name)
        src.count, src.batches, src.images = loaded.count, loaded.batches, loaded.images
        src.warnings.extend(ds.warnings)

    src.prepare = prepare
    return src


def samples_source(drawer: Any, n: int, *, seed: int = 0, labels: torch.Tensor | None = None,
                   name: str = "samples", sample_batch: int | None = None) -> ImageSource:
    """`n` fresh samples of a draw.Drawer as an ImageSource, drawn batch by batch as they are consumed.
    `sample_batch`: images per network batch, cut into the consumer's batches (a GPU samples faster at larger
    batches than Inception needs); default the consumer's."""

    def batches(bs: int) -> Iterator[torch.Tensor]:
        held = torch.empty(0, dtype=torch.uint8)  # images of a network batch not yet handed out
        for _, images in drawer.batches(n, batch_size=sample_batch or bs, seed=seed, labels=labels):
            held = torch.cat([held, images]) if len(held) else images
            while len(held) >= bs:  # full batches whatever the network's, as from images already in memory
                out, held = held[:bs], held[bs:]
                yield out
        if len(held):
            yield held

    return ImageSource(name, n, batches, None)


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint file (a .safetensors, or a file of another suffix whose first bytes are a checkpoint's, or a
    pickle's for sampling's refusal: looks_like_a_checkpoint) or a run directory, as opposed to images or
    statistics; and a folder of what stands in for a checkpoint (post-hoc EMA snapshots, a diffusers model), which
    sampling refuses with the fix."""
    from ddpm_cli.engine.checkpoint.format import looks_like_a_checkpoint
    from ddpm_cli.engine.runs import diffusers_model, holds_snapshots, run_folder

    p = run_folder(path)  # a run's checkpoints/ folder stands for the run
    if p.is_dir():
        return ((p / "checkpoints").is_dir() or (p / "latest.json").is_file() or holds_snapshots(p)
                or diffusers_model(p) is not None)
    return p.suffix.lower() == ".safetensors" or (p.is_file() and looks_like_a_checkpoint(p))


def is_stats_file(path: str | Path) -> bool:
    """An .npz of statistics (`mu` and `sigma`, as --save-stats writes), as opposed to one of images."""
    p = Path(path).expanduser()
    if p.suffix.lower() != ".npz" or not p.is_file():
        return False
    with open_npz(p) as z:
        return is_stats(z)


def open_images_or_stats(spec: str | Path, *, data_root: str | Path = "data", role: str = "--ref",
                         n: int | None = None, option: str = "-n") -> ImageSource | FeatureStats:
    """What a --ref (or the samples argument) names: statistics, or a source of images (cheap: nothing decoded
    or run through Inception yet, except an .npz or a dataset, which are read into memory).

    `n` (`option`: -n of the samples, or --ref-limit of a reference): only n of the images, spread evenly over
    them (a folder's or .zip's sorted files, an .npz's or a dataset's images in order: evenly_spread). Statistics
    hold no images to pick: check_request refuses either option with them."""
    text = str(spec)
    p = Path(text).expanduser()
    if text in CIFAR10_REFS and not p.exists():
        src = cifar10_source(text.split("-", 1)[1], data_root)
    elif not p.exists():
        raise DataError(f"{role} {text} not found; pass a folder or .zip of images, an .npz of images or statistics "
                        f"(--save-stats), {' or '.join(CIFAR10_REFS)}, or a run config YAML")
    elif p.is_dir() and (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():  # a run: its training data
        src = config_source(p / "config.yaml")
        src.name = f"{p} (the run's training data: {src.name})"
    elif p.is_dir():
        return files_source(p, n, option)
    elif p.suffix.lower() in (".yaml", ".yml"):
        src = config_source(p)
    elif p.suffix.lower() == ".npz":
        if is_stats_file(p):
            return load_stats(p)
        src = npz_source(p)
    elif zipfile.is_zipfile(p) or zip_cut_short(p):  # files_source says that one is damaged
        return files_source(p, n, option)
    else:
        raise DataError(f"{role} {text}: not a folder, .zip, .npz or .yaml; pass images, statistics or a run config")
    return spread_n(src, n, option) if n is not None else src


def spread_n(src: ImageSource, n: int, option: str = "-n") -> ImageSource:
    """`n` of the images of `src` (one over images in memory or streamed: tensor_source), spread evenly over them
    (evenly_spread: an .npz of `ddpm sample --per-class` or a per-class folder's dataset holds its classes one
    after another, and its first n would be the first classes alone). For `-n` (samples) a source with fewer is
    refused at once; for --ref-limit (a reference) it is a limit: all of a smaller source are used, and a dataset
    is only decoded when its statistics are not in the cache (the limit is part of the cache key)."""
    inner = src

    def batches(bs: int) -> Iterator[torch.Tensor]:
        keep = torch.tensor(evenly_spread(inner.count, out.count), dtype=torch.long)
        for i in range(0, len(keep), bs):
            yield inner.images[keep[i:i + bs]]

    def prepare() -> None:
        inner.ready()
        if option == "-n" and n > inner.count:
            raise DataError(f"-n {n} but {inner.name} holds {inner.count} images; lower -n or leave it out to use "
                            f"all")
        out.count = min(n, inner.count)

    key = {**src.key, "spread": n} if src.key is not None else None
    out = ImageSource(f"{src.name} ({n:,}, spread evenly)", n, batches, key, src.warnings, prepare)
    if option == "-n":
        out.ready()
    return out
