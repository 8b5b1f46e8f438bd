"""Image files to uint8 arrays: the one decoder of the in-memory path, the streamed path and evaluation, and the
streamed path's worker processes, which import this module alone (numpy and PIL, no torch)."""
from __future__ import annotations

import io
import zipfile

import numpy as np


def decode_image(blob: bytes, size: tuple[int, int] | None = None,
                 channels: int = 3) -> tuple[np.ndarray | None, bool]:
    """An image file -> (uint8 (C, H, W), whether it was resized): converted to RGB (or L for one channel) and
    center-cropped and resized to `size` (W, H) when its own size differs. (None, False) for a file that is not
    a readable image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            resized = size is not None and im.size != tuple(size)
            if resized:
                im = ImageOps.fit(im, tuple(size), method=Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # PIL raises many types for corrupt files; such a file is skipped with a warning
        return None, False
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), resized


def stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Decoded (C, H, W) arrays -> one (N, C, H, W) batch. np.stack keeps their layout (channels last), so a
    batch is the same array, strides included, whichever path decoded it, and so are the losses, bit for bit."""
    return np.stack(arrays)


# A worker process's files: set once by start_worker, read by decode_batch.
_root: str | None = None
_entries: list[str] = []
_zip: zipfile.ZipFile | None = None


def start_worker(root: str, is_zip: bool, entries: list[str]) -> None:
    """Initialise a worker process of the streamed path with the files it reads (paths, or a zip's names)."""
    global _root, _entries, _zip
    _root, _entries = root, entries
    _zip = zipfile.ZipFile(root) if is_zip else None


def decode_batch(indices: list[int], size: tuple[int, int], channels: int) -> np.ndarray | int:
    """In a worker: the files `indices` decoded into one batch, sent back channels-last and C-contiguous (N, H, W,
    C), which pickles as it is (the parent's view of it as (N, C, H, W) is then `stack`'s very array); or the
    position in `indices` of the first file that is not a readable image."""
    arrays = []
    for k, i in enumerate(indices):
        if _zip is not None:
            blob = _zip.read(_entries[i])
        else:
            with open(_entries[i], "rb") as f:
                blob = f.read()
        array, _ = decode_image(blob, size, channels)
        if array is None:
            return k
        arrays.append(array)
    return np.ascontiguousarray(stack(arrays).transpose(0, 2, 3, 1))
