"""The decoded-data cache: a folder or .zip of images decoded at a size is kept as the uint8 tensor it became, so a
later run on the same files at the same size loads it instead of decoding every image again (engine/data.py's
load_folder; the streamed path, for sets too large for memory, never caches). The built-in shapes set is kept the
same way once it is large (engine/data.py's load_shapes, keyed by `shapes_key`).

An entry (engine/cache_entries.py) is `data-<hash>.bin`, safetensors with `images` (N, H, W, C) uint8, the memory
of the decoded batch as engine/decode.py lays it out (so a loaded set has the first run's strides, and training
on it the same losses, bit for bit), and `labels` int64; and `data-<hash>.json`, its key and what the decoding said
(classes, skipped files). The key is what the decoded tensor depends on: the files (a .zip's entries by name, CRC
and size; a folder's files by path, size, inode and modification and change times, the last of which no copy tool
sets back), the size and channels decoded to, the decoder (decode.fingerprint: the source of its pixel functions
and Pillow's version, so a fix reaches cached sets without a version bump) and ddpm's version. A damaged entry is
decoded again and replaced, with a warning; nothing the cache does stops a run. No torch import at module level:
`ddpm cache` lists it without."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_cli import __version__
from ddpm_cli.engine import cache_entries
from ddpm_cli.engine.cache_entries import Entry
from ddpm_cli.engine.files import atomic_write_bytes, fsync_dir

if TYPE_CHECKING:
    import torch

    from ddpm_cli.engine.data import ImageFiles

FORMAT = 1
# Kept: the most recently used entries, at most this many and this many bytes together; a set over half of it is
# not kept (CIFAR-10 at 32 px is 154 MB; 10,000 images at 256 px, 2 GB).
MAX_ENTRIES = 16
MAX_BYTES = 8 * 1024**3
# The built-in shapes set, cheap to draw again, is kept apart within bounds of its own, so that a sweep over its
# seeds or sizes does not push out a decoded folder.
SHAPES_MAX_ENTRIES = 4
KINDS = ("data", "shapes")  # its entries' names: decoded sets, the built-in set drawn
ENV_DIR, ENV_SWITCH = "DDPM_DATA_CACHE_DIR", "DDPM_DATA_CACHE"
_OFF = {"off", "0", "false", "no"}


def cache_dir() -> Path:
    """$DDPM_DATA_CACHE_DIR, else $XDG_CACHE_HOME/ddpm/data, else ~/.cache/ddpm/data."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / "data"


def enabled() -> bool:
    """Off with DDPM_DATA_CACHE=off (or 0, false, no)."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in _OFF


def key(files: ImageFiles, hw: tuple[int, int], channels: int) -> dict:
    """What the decoded tensor of `files` at `hw` and `channels` depends on (see the module's docstring)."""
    import zipfile

    from ddpm_cli.engine import decode

    listing = hashlib.sha256()
    if files.is_zip:
        with zipfile.ZipFile(files.root) as zf:
            for name in files.entries:
                info = zf.getinfo(name)
                listing.update(f"{name}\0{info.CRC}\0{info.file_size}\n".encode("utf-8", "surrogateescape"))
        source = {"zip": str(files.root.resolve())}
    else:
        for path, rel in zip(files.entries, files.rel):
            st = path.stat()
            listing.update(f"{rel}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"
                           .encode("utf-8", "surrogateescape"))
        source = {"folder": str(files.root.resolve())}
    source.update(files=len(files), listing=listing.hexdigest())
    return {"format": FORMAT, "ddpm": __version__, "decoder": decode.fingerprint(), "source": source,
            "size": list(hw), "channels": channels}  # the decoder's fingerprint holds Pillow's version


def shapes_key(count: int, hw: tuple[int, int], channels: int, seed: int) -> dict:
    """What the built-in shapes set depends on: its count, seed, size and channels, and how it is drawn
    (`_shapes_code`)."""
    return {"format": FORMAT, "ddpm": __version__, "source": {"shapes": _shapes_code(), "count": count, "seed": seed},
            "size": list(hw), "channels": channels}


@functools.cache
def _shapes_code() -> str:
    """The source of the functions that draw the shapes set, and numpy's version (its generators draw the colours
    and positions): read once a process."""
    import inspect

    import numpy as np

    from ddpm_cli.engine import data

    try:
        drawing = (data.make_shapes, data._shape_mask)
        source = "\n".join(inspect.getsource(f) for f in drawing) + repr(data.SHAPE_CLASSES)
    except (OSError, TypeError):  # no source to read (a frozen install): ddpm's version, in the key, stands in
        source = ""
    return hashlib.sha256(f"{source}\n{np.__version__}".encode()).hexdigest()[:16]


def entry_name(key: dict) -> str:
    return cache_entries.entry_name(_kind(key), key)


def _kind(key: dict) -> str:
    return "shapes" if "shapes" in key.get("source", {}) else "data"


def load(key: dict, directory: Path | None = None) -> tuple[tuple | None, str | None]:
    """((images, labels, classes, warnings), None) for `key`'s entry; (None, None) when there is none; (None, why)
    when there is one that cannot be used (damaged: it is decoded again and replaced)."""
    import torch
    from safetensors import safe_open

    from ddpm_cli.engine.decode import batch_view

    directory = directory or cache_dir()
    name = entry_name(key)
    desc, blob = directory / f"{name}.json", directory / f"{name}.bin"
    if not desc.exists():
        return None, None
    try:
        meta = json.loads(desc.read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None, None  # another version's entry, or a hash collision: a miss
        with safe_open(str(blob), framework="pt") as f:  # copied out of the file's mapping (it may be replaced)
            nhwc, labels = f.get_tensor("images").clone(), f.get_tensor("labels").clone()
        count, shape = meta["count"], tuple(meta["shape"])  # (C, H, W) as decoded
        if (nhwc.dtype != torch.uint8 or tuple(nhwc.shape) != (count, *shape[1:], shape[0])
                or labels.dtype != torch.int64 or tuple(labels.shape) != (count,)):
            raise ValueError(f"it holds {tuple(nhwc.shape)} {nhwc.dtype} images")
        images = torch.from_numpy(batch_view(nhwc.numpy()))  # decode.stack's layout, strides included
        classes, warned = list(meta["classes"]), list(meta["warnings"])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors for a damaged file
        return None, f"data cache: the entry {name} in {directory} is damaged " \
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); decoding the images again " \
                     f"(or drawing the built-in set)"
    try:
        os.utime(desc)  # its last use, for pruning (a read-only cache still serves)
    except OSError:
        pass
    return (images, labels, classes, warned), None


def save(key: dict, images: torch.Tensor, labels: torch.Tensor, classes: list[str], warned: list[str],
         directory: Path | None = None) -> str | None:
    """Keep a decoded set under `key` (then prune to the bounds); returns a warning when it could not, else None.
    A set over half of MAX_BYTES is not kept; of the built-in shapes sets, the SHAPES_MAX_ENTRIES most recent are.
    Under torchrun a host's first process keeps it (every process decodes the same set)."""
    from safetensors.torch import save_file

    if images.numel() + 8 * labels.numel() > MAX_BYTES // 2 or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    directory = directory or cache_dir()
    name = entry_name(key)
    blob = directory / f"{name}.bin"
    tmp = directory / f".{name}.bin.tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        nhwc = images.permute(0, 2, 3, 1).contiguous()  # decode.stack's memory: no copy (the shapes set: one)
        save_file({"images": nhwc, "labels": labels.contiguous()}, str(tmp))
        os.replace(tmp, blob)
        fsync_dir(directory)
        meta = {"format": FORMAT, "key": key, "count": len(images), "shape": list(images.shape[1:]),
                "classes": classes, "warnings": warned, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_bytes(directory / f"{name}.json", json.dumps(meta, indent=1).encode())
        kind = _kind(key)
        cache_entries.prune(directory, (kind,), SHAPES_MAX_ENTRIES if kind == "shapes" else MAX_ENTRIES, MAX_BYTES)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for a full or read-only disk
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder could not be made: there is no temporary file
            pass
        why = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        return f"data cache: could not keep the images in {directory} ({why}); the next run decodes (or draws) " \
               f"them again ({ENV_SWITCH}=off turns the cache off)"
    return None


def list_entries(directory: Path | None = None) -> list[Entry]:
    """The data cache's entries, most recently used first."""
    return cache_entries.list_entries(directory or cache_dir(), KINDS)


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Delete every entry of the data cache; returns (entries, bytes) removed."""
    return cache_entries.clear(directory or cache_dir(), KINDS)
