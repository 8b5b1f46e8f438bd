"""Image files to uint8 arrays: the one decoder of the in-memory path, the streamed path and evaluation, and the
streamed path's worker processes, which import this module alone (numpy and PIL, no torch)."""
from __future__ import annotations

import hashlib
import io
import signal
import warnings
import zipfile
import zlib

import numpy as np

# PIL's mode for each channel count the network can take (model.in_channels): gray, gray + alpha, RGB, RGBA.
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def fingerprint() -> str:
    """This decoder's identity, for every cache of what it decoded (the data cache, FID reference statistics): the
    source of the functions that make pixels, and Pillow's version, so a change to how images decode reaches cached
    sets without a version bump (and a change elsewhere in this file does not throw them away)."""
    import inspect

    import PIL

    try:
        source = "\n".join(inspect.getsource(f) for f in (decode_image, _wide_to_8_bits)) + repr(MODES)
    except (OSError, TypeError):  # no source to read (a frozen install): the version stands in
        from ddpm_cli import __version__ as source
    return hashlib.sha256(f"{source}\n{PIL.__version__}".encode()).hexdigest()[:16]


def _wide_to_8_bits(a: np.ndarray, mode: str, fmt: str | None) -> np.ndarray:
    """One channel of more than 8 bits -> uint8 gray. 16-bit (PIL's I;16 modes, and a PNG's I) keeps its high
    byte. The range of other 32-bit integers and of floats is not in the file, so it is read off the values: a
    float image within [0, 1] is scaled by 255 (the common convention), integers within 0-255 are taken as they
    are, within 0-65535 as 16-bit, beyond by their maximum; anything else is clipped."""
    if mode.startswith("I;16") or (mode == "I" and fmt == "PNG"):
        return (a.astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64))
    top = float(a.max()) if a.size else 0.0
    if mode == "F" and top <= 1.0:
        a = a * 255.0
    elif mode == "I" and 255 < top <= 65535:
        a = a / 257.0
    elif mode == "I" and top > 65535:
        a = a * (255.0 / top)
    return a.round().clip(0, 255).astype(np.uint8)


def decode_image(blob: bytes | None, size: tuple[int, int] | None = None,
                 channels: int = 3) -> tuple[np.ndarray | None, bool]:
    """An image file -> (uint8 (C, H, W), whether it was resized): turned as its EXIF orientation says (a phone's
    photo stored sideways), gray of more than 8 bits scaled to 8 (_wide_to_8_bits), converted to `channels`
    (MODES), and center-cropped and resized to `size` (W, H) when its own size differs; a JPEG much larger than
    `size` is decoded at a reduced scale first. (None, False) for a file that is not a readable image."""
    from PIL import Image, ImageOps

    if blob is None:  # a file that could not be read (read_file)
        return None, False
    # PIL's two-line advice on images over 89M pixels, printed per image: these are the user's own. Set on every
    # call (a no-op once there), as a caller's catch_warnings may have taken it away since.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(io.BytesIO(blob)) as im:
            stored = im.size
            if size is not None and im.format == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale, each side kept at least the target's longer side (so
                # any crop to the target's shape, after any EXIF turn, still has the target's pixels or more)
                im.draft(None, (max(size), max(size)))
            drafted = im.size != stored
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # convert() would clip or zero them
                im = Image.fromarray(_wide_to_8_bits(np.asarray(im), im.mode, im.format))
            im = im.convert(MODES[channels])
            resized = size is not None and (im.size != tuple(size) or drafted)  # drafted: resized by libjpeg
            if size is not None and im.size != tuple(size):
                im = ImageOps.fit(im, tuple(size), method=Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # PIL raises many types for corrupt files; such a file is skipped with a warning
        return None, False
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), resized


def stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Decoded (C, H, W) arrays -> one (N, C, H, W) batch. np.stack keeps their layout (channels last), so a
    batch is the same array, strides included, whichever path decoded it, and so are the losses, bit for bit."""
    return np.stack(arrays)


# A worker process's source: a zip's handle, opened once by start_worker (None: a folder's files are paths).
_zip: zipfile.ZipFile | None = None


def start_worker(zip_path: str | None) -> None:
    """Initialise a worker process of the streamed path: the zip it reads names from, if any. Ctrl-C is the
    training process's to handle (it finishes the step and checkpoints); the worker must outlive it meanwhile."""
    global _zip
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _zip = zipfile.ZipFile(zip_path) if zip_path else None


def read_file(source, name) -> bytes | None:
    """The bytes of `name` (a path; with `source` a zip, an entry of it), or None when it cannot be read: gone or
    unreadable since the set was listed, or damaged, encrypted (RuntimeError) or compressed in a way zipfile lacks
    (NotImplementedError) inside the zip. The one reader of the in-memory, streamed and evaluation paths."""
    try:
        if source is not None:
            return source.read(name)
        with open(name, "rb") as f:
            return f.read()
    except (OSError, KeyError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError, zlib.error):
        return None


def decode_files(names: list[str], size: tuple[int, int], channels: int) -> tuple[np.ndarray | None, list[int]]:
    """In a worker: the files `names` that decode, as one batch sent back C-contiguous as (N, H, W, C), which
    pickles as it is (`batch_view` turns it back into `stack`'s very array), or None when none does; and the
    positions in `names` of those that cannot be read or decoded."""
    arrays, bad = [], []
    for k, name in enumerate(names):
        blob = read_file(_zip, name)
        array = None if blob is None else decode_image(blob, size, channels)[0]
        if array is None:
            bad.append(k)
        else:
            arrays.append(array)
    return (np.ascontiguousarray(stack(arrays).transpose(0, 2, 3, 1)) if arrays else None), bad


def decode_batch(names: list[str], size: tuple[int, int], channels: int) -> np.ndarray | int:
    """In a worker of the streamed path: decode_files' batch, or the position of the first file that cannot be
    read or decoded (a batch must hold every image asked for)."""
    hwc, bad = decode_files(names, size, channels)
    return bad[0] if bad else hwc


def batch_view(hwc: np.ndarray) -> np.ndarray:
    """(N, H, W, C) from decode_batch -> (N, C, H, W) with `stack`'s strides: a transpose for colour, a reshape for
    one channel (whose size-1 axis a transpose would give other strides)."""
    if hwc.shape[3] == 1:
        return hwc.reshape(hwc.shape[0], 1, *hwc.shape[1:3])
    return hwc.transpose(0, 3, 1, 2)
