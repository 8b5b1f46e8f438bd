"""The reference statistics cache: where `ddpm eval` keeps a reference's statistics, and its entries kept as the
compile and decoded-data caches keep theirs (engine/cache_entries.py: listed, emptied and bounded the same way):
`fid-<hash of the key>.bin`, the statistics as stats.save_stats writes them (an .npz), and `.json`, the key with
the reference's name and image count. No torch: `ddpm cache` lists it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ddpm_cli.engine import cache_entries
from ddpm_cli.engine.cache_entries import Entry
from ddpm_cli.engine.files import atomic_write_bytes

ENV_DIR = "DDPM_CACHE_DIR"
# Kept: the most recently used entries, at most this many and this many bytes together. An entry is ~120 MB (its
# 2048 x 2048 covariance and up to stats.KID_FEATURES_MAX feature rows for KID).
MAX_ENTRIES = 16
MAX_BYTES = 4 * 1024**3
KINDS = ("fid",)  # its entries' names


def cache_dir() -> Path:
    """$DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm/fid-stats, else ~/.cache/ddpm/fid-stats."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / "fid-stats"


def entry_path(directory: Path, key: dict) -> Path:
    """The statistics file of `key`'s entry (its description beside it, .json)."""
    return directory / f"{cache_entries.entry_name(KINDS[0], key)}.bin"


def describe(path: Path, key: dict, source: str, images: int | None) -> None:
    """Write the description that vouches for the statistics just saved at `path` (after them: a reader never
    finds it without its bytes)."""
    meta = {"key": key, "source": source, "images": images, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())


def touch(path: Path) -> None:
    """Mark `path`'s entry used (its description's mtime): pruning keeps the most recently used."""
    try:
        os.utime(path.with_suffix(".json"))
    except OSError:
        pass


def list_entries(directory: Path | None = None) -> list[Entry]:
    """The cache's entries, most recently used first (their `meta`: describe's)."""
    return cache_entries.list_entries(directory or cache_dir(), KINDS)


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Delete every entry; returns (entries, bytes) removed."""
    return cache_entries.clear(directory or cache_dir(), KINDS)


def prune(directory: Path, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> int:
    """Keep the most recently used entries within the bounds; returns the entries removed."""
    return cache_entries.prune(directory, KINDS, max_entries, max_bytes)
