"""A cache folder of entries, each `NAME.bin` (the bytes) with `NAME.json` (its description, whose mtime is its last
use): listing, emptying and pruning to the most recently used. The compile cache (engine/compile_cache.py), the
decoded-data cache (engine/data_cache.py) and eval's reference statistics (engine/evaluation/stats_cache.py) keep
their entries so; no torch import."""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

STALE_TMP_S = 3600  # a temporary file this old is a crashed writer's, not one being written


def _ours(kinds: tuple[str, ...]) -> re.Pattern:
    """What a cache of entries of these kinds writes: `<kind>-<24 hex digits>.bin` and `.json`, and the temporary
    `.<that name>.tmp-<pid>` of an atomic write. Nothing else in the folder is touched: a cache folder pointed at a
    folder of the user's (DDPM_*_CACHE_DIR) must not lose its files, nor one cache another's (one folder for all)."""
    return re.compile(rf"\.?({'|'.join(map(re.escape, kinds))})-[0-9a-f]{{24}}\.(bin|json)(\.tmp-\d+)?")


def entry_name(kind: str, key: dict) -> str:
    """`<kind>-<24 hex digits of the key's hash>`: the kind first, so a listing says what each entry is for."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{kind}-{digest}"


@dataclass
class Entry:
    name: str
    meta: dict  # the JSON description
    size: int  # bytes of NAME.bin
    last_used: float  # the description's mtime: written when saved and on each load


def list_entries(directory: Path, kinds: tuple[str, ...]) -> list[Entry]:
    """The folder's complete entries of these kinds (a description and its bytes), most recently used first;
    unreadable descriptions are listed with an empty `meta`."""
    found, ours = [], _ours(kinds)
    for desc in directory.glob("*.json") if directory.is_dir() else []:
        if not ours.fullmatch(desc.name):
            continue
        blob = desc.with_suffix(".bin")
        try:
            size, used = blob.stat().st_size, desc.stat().st_mtime
        except OSError:
            continue
        try:
            meta = json.loads(desc.read_text())
        except (OSError, ValueError, RecursionError):  # (JSON nested deeper than Python's recursion limit)
            meta = {}
        found.append(Entry(desc.stem, meta if isinstance(meta, dict) else {}, size, used))
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def _our_files(directory: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Every file the cache writes: entries, their descriptions, and temporary files of atomic writes."""
    if not directory.is_dir():
        return []
    ours = _ours(kinds)
    return [p for p in directory.iterdir() if ours.fullmatch(p.name) and p.is_file()]


def clear(directory: Path, kinds: tuple[str, ...]) -> tuple[int, int]:
    """Delete every entry of these kinds; returns (entries, bytes) removed. Files the cache did not write stay."""
    entries, freed = 0, 0
    for p in _our_files(directory, kinds):
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        entries += p.suffix == ".bin"
        freed += size
    return entries, freed


def prune(directory: Path, kinds: tuple[str, ...], max_entries: int, max_bytes: int) -> int:
    """Keep the most recently used entries of these kinds within `max_entries` and `max_bytes`; delete the rest, and
    bytes whose description is missing or temporary files left by a crashed writer, once they are old. Returns
    entries removed."""
    removed, total = 0, 0
    for i, e in enumerate(list_entries(directory, kinds)):
        total += e.size
        if i >= max_entries or total > max_bytes:
            for suffix in (".json", ".bin"):  # the description first: a reader never finds it without its bytes
                (directory / f"{e.name}{suffix}").unlink(missing_ok=True)
            removed += 1
    now = time.time()
    for p in _our_files(directory, kinds):
        orphan = p.suffix == ".bin" and not p.with_suffix(".json").exists()
        try:
            if (orphan or ".tmp-" in p.name) and now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass
    return removed
