"""The reference statistics cache: where `ddpm eval` keeps a reference's statistics (each `<name>-<20 hex>.npz`, as
stats.save_stats writes it), how an entry is named, and listing, emptying and bounding the folder. No torch (nor
numpy at import): `ddpm cache` lists it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

ENV_DIR = "DDPM_CACHE_DIR"
# Kept: the most recently used entries, at most this many and this many bytes together. An entry is ~120 MB (its
# 2048 x 2048 covariance and up to stats.KID_FEATURES_MAX feature rows for KID).
MAX_ENTRIES = 16
MAX_BYTES = 4 * 1024**3
STALE_TMP_S = 3600  # a temporary file this old is a crashed writer's, not one being written
# What the cache writes: `<name>-<20 hex digits>.npz`, and the temporary `.<that>.tmp-<pid>` of an atomic write.
# Nothing else in the folder is touched: DDPM_CACHE_DIR may name a folder of the user's.
_OURS = re.compile(r"(\.)?[A-Za-z0-9._-]*-[0-9a-f]{20}\.npz(\.tmp-\d+)?")


def cache_dir() -> Path:
    """$DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm/fid-stats, else ~/.cache/ddpm/fid-stats."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / "fid-stats"


def entry_path(directory: Path, key: dict, name: str) -> Path:
    """`<the source's name, made safe>-<20 hex digits of the key's hash>.npz`: the name first, so a listing says
    which reference each entry is."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name).strip("_")[-48:] or "ref"
    return directory / f"{slug}-{digest}.npz"


def touch(path: Path) -> None:
    """Mark an entry used (its mtime): pruning keeps the most recently used. A failure here loses nothing."""
    try:
        os.utime(path)
    except OSError:
        pass


@dataclass
class Entry:
    name: str
    size: int  # bytes
    last_used: float  # mtime: written when saved and on each load
    images: int | None  # the statistics' image count, where the entry says it
    source: str | None  # the reference it was computed from, where the entry says it


def _describe(path: Path) -> tuple[int | None, str | None]:
    """(images, source) from an entry's `n` and `meta`, reading nothing else (the arrays are loaded lazily)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            n = int(z["n"]) if "n" in z.files else None
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None, None
    source = meta.get("source") if isinstance(meta, dict) else None
    return (n if n is not None and n >= 0 else None), (str(source) if source else None)


def list_entries(directory: Path | None = None, describe: bool = True) -> list[Entry]:
    """The folder's entries, most recently used first."""
    directory = directory or cache_dir()
    found = []
    for p in directory.glob("*.npz") if directory.is_dir() else []:
        if not _OURS.fullmatch(p.name) or p.name.startswith("."):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        images, source = _describe(p) if describe else (None, None)
        found.append(Entry(p.name, st.st_size, st.st_mtime, images, source))
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Delete every entry (and any temporary file of a write); returns (entries, bytes) removed."""
    directory = directory or cache_dir()
    entries = freed = 0
    for p in list(directory.iterdir()) if directory.is_dir() else []:
        if not _OURS.fullmatch(p.name):
            continue
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        if not p.name.startswith("."):
            entries, freed = entries + 1, freed + size
    return entries, freed


def prune(directory: Path, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> int:
    """Keep the most recently used entries within the bounds, and remove temporary files older than STALE_TMP_S;
    returns the entries removed."""
    removed, total = 0, 0
    for i, e in enumerate(list_entries(directory, describe=False)):
        total += e.size
        if i >= max_entries or (i > 0 and total > max_bytes):
            try:
                (directory / e.name).unlink()
                removed += 1
            except OSError:
                pass
    now = time.time()
    for p in directory.glob(".*.tmp-*"):
        try:
            if _OURS.fullmatch(p.name) and now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass
    return removed
