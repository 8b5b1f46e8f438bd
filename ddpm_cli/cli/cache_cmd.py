"""`ddpm cache info | clear`: the compile cache (engine/compile_cache.py), the decoded-data cache
(engine/data_cache.py) and `ddpm eval`'s reference statistics (engine/evaluation/stats_cache.py) seen and emptied;
no torch import."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.inspect_cmd import human_size as _size
from ddpm_cli.cli.ui import console, friendly
from ddpm_cli.errors import UsageError

app = typer.Typer(help="See or clear the caches kept between runs: torch.compile's code (a later train, sample or "
                       "eval of the same network starts faster), decoded training images (a later run on the "
                       "same folder or .zip skips decoding them) and eval's reference statistics (a later score "
                       "against the same reference skips Inception).", no_args_is_help=True)


def _stats_dir_option():
    return typer.Option(None, "--cache-dir", show_default=False,  # (DDPM_CACHE_DIR: the default's, unchecked)
                        help="The reference statistics' folder, where `ddpm eval --cache-dir` kept them. Default: "
                             "DDPM_CACHE_DIR, else ~/.cache/ddpm/fid-stats.")


def _checked_stats_dir(stats_dir: Path | None) -> Path | None:
    """--cache-dir as given, refused (exit 2) where it names no folder: a typo must not pass for an empty cache,
    nor let `clear` empty the other two caches for nothing."""
    if stats_dir is None:
        return None
    stats_dir = stats_dir.expanduser()
    if stats_dir.is_file():
        raise UsageError(f"--cache-dir {stats_dir} is a file, not a folder; pass the folder eval's --cache-dir named")
    if not stats_dir.is_dir():
        raise UsageError(f"--cache-dir {stats_dir}: no such folder; pass the folder eval's --cache-dir named")
    return stats_dir


def _count(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def describe(stats_dir: Path | None = None) -> dict:
    """Where the cache is, whether it is on, its bounds, and each entry (most recently used first); eval's
    reference statistics from `stats_dir` (None: their default folder)."""
    import time

    from ddpm_cli.engine import compile_cache as cc

    entries, rows = cc.list_entries(), []
    for e in entries:
        key = e.meta.get("key") if isinstance(e.meta.get("key"), dict) else {}
        env = key.get("env") if isinstance(key.get("env"), dict) else {}
        rows.append({"name": e.name, "kind": key.get("kind"), "bytes": e.size, "torch": env.get("torch"),
                     "device": " ".join(str(env[k]) for k in ("device", "capability") if env.get(k)) or None,
                     "created": e.meta.get("created"), "hits": e.meta.get("hits", 0),
                     "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))})
    return {"path": str(cc.cache_dir()), "enabled": cc.enabled(), "entries": rows,
            "bytes": sum(e.size for e in entries), "max_entries": cc.MAX_ENTRIES, "max_bytes": cc.MAX_BYTES,
            "data": describe_data(), "fid_stats": describe_fid_stats(stats_dir)}


def describe_data() -> dict:
    """The decoded-data cache as describe() gives the compile cache: where, on or off, bounds, entries."""
    import time

    from ddpm_cli.engine import data_cache as dc

    entries, rows = dc.list_entries(), []
    for e in entries:
        key = e.meta.get("key") if isinstance(e.meta.get("key"), dict) else {}
        source = key.get("source") if isinstance(key.get("source"), dict) else {}
        size = key.get("size") if isinstance(key.get("size"), list) else []
        shape = e.meta.get("shape") or [key.get("channels"), *size]
        rows.append({"name": e.name, "bytes": e.size, "images": e.meta.get("count"),
                     "source": source.get("zip") or source.get("folder"),  # a path; None for the built-in set
                     "builtin": {"dataset": "shapes", "seed": source.get("seed")} if "shapes" in source else None,
                     "shape": shape if isinstance(shape, list) else None, "created": e.meta.get("created"),
                     "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))})
    return {"path": str(dc.cache_dir()), "enabled": dc.enabled(), "entries": rows,
            "bytes": sum(e.size for e in entries), "max_entries": dc.MAX_ENTRIES, "max_bytes": dc.MAX_BYTES}


def describe_fid_stats(directory: Path | None = None) -> dict:
    """eval's reference statistics as describe() gives the compile cache: where, bounds, entries."""
    import time

    from ddpm_cli.engine.evaluation import stats_cache as sc

    directory = directory or sc.cache_dir()
    entries = sc.list_entries(directory)
    rows = [{"name": e.name, "bytes": e.size, "images": e.meta.get("images"), "source": e.meta.get("source"),
             "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))} for e in entries]
    return {"path": str(directory), "entries": rows, "bytes": sum(e.size for e in entries),
            "max_entries": sc.MAX_ENTRIES, "max_bytes": sc.MAX_BYTES}


@app.command("info")
@friendly
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
         stats_dir: Optional[Path] = _stats_dir_option()) -> None:
    """Where the cache is, whether it is on, its size, and its entries (most recently used first)."""
    from ddpm_cli.engine.compile_cache import ENV_DIR, ENV_SWITCH

    d = describe(_checked_stats_dir(stats_dir))
    if as_json:
        typer.echo(json.dumps(d, indent=2))  # plain: rich would wrap long strings
        return
    state = "on" if d["enabled"] else f"off ({ENV_SWITCH}=off)"
    console.print(f"compile cache: {d['path']}  |  {state}  |  {_count(len(d['entries']))}, {_size(d['bytes'])} "
                  f"(kept: the {d['max_entries']} most recently used, at most {_size(d['max_bytes'])}; move it with "
                  f"{ENV_DIR})", markup=False, soft_wrap=True)
    for e in d["entries"]:
        console.print(f"  {e['name']}  {_size(e['bytes'])}  torch {e['torch']}  {e['device']}  used {e['last_used']}"
                      f"  ({e['hits']} load{'s' if e['hits'] != 1 else ''})", markup=False, soft_wrap=True)
    from ddpm_cli.engine.data_cache import ENV_DIR as DATA_DIR, ENV_SWITCH as DATA_SWITCH

    data = d["data"]
    state = "on" if data["enabled"] else f"off ({DATA_SWITCH}=off)"
    console.print(f"data cache: {data['path']}  |  {state}  |  {_count(len(data['entries']))}, {_size(data['bytes'])} "
                  f"(kept: the {data['max_entries']} most recently used, at most {_size(data['max_bytes'])}; move it "
                  f"with {DATA_DIR})", markup=False, soft_wrap=True)
    for e in data["entries"]:  # a damaged description shows '?' where it says nothing readable
        shape = "x".join(str(v) for v in e["shape"]) if e["shape"] else "?"
        source = e["source"] or (f"built-in shapes, seed {e['builtin']['seed']}" if e["builtin"] else "?")
        console.print(f"  {e['name']}  {_size(e['bytes'])}  {e['images'] if e['images'] is not None else '?'} images "
                      f"of {shape}  from {source}  used {e['last_used']}", markup=False, soft_wrap=True)
    from ddpm_cli.engine.evaluation.stats_cache import ENV_DIR as STATS_DIR

    stats = d["fid_stats"]
    console.print(f"reference statistics (ddpm eval): {stats['path']}  |  {_count(len(stats['entries']))}, "
                  f"{_size(stats['bytes'])} (kept: the {stats['max_entries']} most recently used, at most "
                  f"{_size(stats['max_bytes'])}; move it with {STATS_DIR} or eval's --cache-dir, skip it with "
                  f"--no-cache)", markup=False, soft_wrap=True)
    for e in stats["entries"]:
        console.print(f"  {e['name']}  {_size(e['bytes'])}  {e['images'] if e['images'] is not None else '?'} images "
                      f"of {e['source'] or '?'}  used {e['last_used']}", markup=False, soft_wrap=True)


@app.command("clear")
@friendly
def clear(stats_dir: Optional[Path] = _stats_dir_option()) -> None:
    """Delete every entry of the three caches: each network compiles in full, each folder is decoded again, and
    each reference goes through Inception again, at its next use (torch's own inductor cache, under
    TORCHINDUCTOR_CACHE_DIR, is left alone)."""
    from ddpm_cli.engine import data_cache
    from ddpm_cli.engine.compile_cache import cache_dir, clear as clear_cache
    from ddpm_cli.engine.evaluation import stats_cache

    stats_dir = _checked_stats_dir(stats_dir)
    entries, freed = clear_cache()
    console.print(f"removed {_count(entries)} ({_size(freed)}) from {cache_dir()}",
                  markup=False, soft_wrap=True)
    entries, freed = data_cache.clear()
    console.print(f"removed {_count(entries)} ({_size(freed)}) from {data_cache.cache_dir()}",
                  markup=False, soft_wrap=True)
    stats_dir = stats_dir or stats_cache.cache_dir()
    entries, freed = stats_cache.clear(stats_dir)
    console.print(f"removed {_count(entries)} ({_size(freed)}) from {stats_dir}",
                  markup=False, soft_wrap=True)
