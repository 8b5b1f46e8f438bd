"""`ddpm cache info | clear`: the compile cache (engine/compile_cache.py) seen and emptied; no torch import."""
from __future__ import annotations

import json

import typer

from ddpm_cli.cli.inspect_cmd import human_size as _size
from ddpm_cli.cli.ui import console, friendly

app = typer.Typer(help="See or clear the compile cache: torch.compile's code kept between runs, so a later train, "
                       "sample or eval of the same network starts faster.", no_args_is_help=True)


def _count(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def describe() -> dict:
    """Where the cache is, whether it is on, its bounds, and each entry (most recently used first)."""
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
            "bytes": sum(e.size for e in entries), "max_entries": cc.MAX_ENTRIES, "max_bytes": cc.MAX_BYTES}


@app.command("info")
@friendly
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines.")) -> None:
    """Where the cache is, whether it is on, its size, and its entries (most recently used first)."""
    from ddpm_cli.engine.compile_cache import ENV_DIR, ENV_SWITCH

    d = describe()
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


@app.command("clear")
@friendly
def clear() -> None:
    """Delete every entry: each network compiles in full at its next run (torch's own inductor cache, under
    TORCHINDUCTOR_CACHE_DIR, is left alone)."""
    from ddpm_cli.engine.compile_cache import cache_dir, clear as clear_cache

    entries, freed = clear_cache()
    console.print(f"removed {_count(entries)} ({_size(freed)}) from {cache_dir()}",
                  markup=False, soft_wrap=True)
