"""The compile cache: torch.compile's portable artifacts (torch.compiler.save_cache_artifacts) kept per user, so a
later `ddpm train`, `sample` or `eval` of the same network and shapes loads what an earlier process compiled.

torch checks its own artifacts (each carries its graph's key, the torch and Triton versions and the GPU), so a wrong
entry costs time, never a wrong result: our key only picks the entry, one per compiled callable, named by a hash of
what changes its graphs (network, first call's shapes and dtypes, precision, layout, compile mode and options,
device, versions). An entry is `NAME.bin`, torch's bytes, handed only to torch.compiler.load_cache_artifacts, and
`NAME.json`, the key and a checksum of the bytes. No torch import at module level: `ddpm cache` does without it."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from ddpm_cli import __version__
from ddpm_cli.engine import cache_entries
from ddpm_cli.engine.cache_entries import Entry
from ddpm_cli.engine.files import atomic_write_bytes
from ddpm_cli.errors import DdpmWarning

FORMAT = 1  # of the JSON description; an entry of another format is ignored
# Kept: the most recently used entries, at most this many and this many bytes together. A compiled training step
# of the CIFAR-10 model with CUDA graphs holds many kernels; a few dozen networks and shapes cover one user's work.
MAX_ENTRIES = 32
MAX_BYTES = 2 * 1024**3
KINDS = ("train", "sample")  # its entries' names: the compiled training step, the sampling network
ENV_DIR, ENV_SWITCH = "DDPM_COMPILE_CACHE_DIR", "DDPM_COMPILE_CACHE"
_OFF = {"off", "0", "false", "no"}
# Entries this process loaded or saved, with their artifact keys: torch's caches hold them already, so a second
# network of the same key (autoguidance's guide shares the model's architecture) does not load them again.
_IN_PROCESS: dict[Path, dict[str, list[str]]] = {}


def cache_dir() -> Path:
    """$DDPM_COMPILE_CACHE_DIR, else $XDG_CACHE_HOME/ddpm/compile, else ~/.cache/ddpm/compile. (Not under
    $DDPM_CACHE_DIR: that variable names the FID statistics folder itself.)"""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / "compile"


def enabled() -> bool:
    """Off with DDPM_COMPILE_CACHE=off (or 0, false, no)."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in _OFF


def supported() -> bool:
    """torch.compiler's portable artifacts exist from torch 2.7; before, nothing is cached (compiling still works)."""
    import torch

    return all(hasattr(torch.compiler, f) for f in ("save_cache_artifacts", "load_cache_artifacts"))


# -- the key -----------------------------------------------------------------------------------------------------


def entry_name(key: dict) -> str:
    """`train-<hash of the key>` or `sample-<hash>` (cache_entries.entry_name)."""
    return cache_entries.entry_name(key.get("kind", "entry"), key)


def environment(device) -> dict:
    """What makes compiled code of one machine unusable on another: torch (its CUDA), Python, the device kind and
    its compute capability (the kernels are built for it), Triton, and this package (the network's code)."""
    import torch

    env = {"torch": torch.__version__, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
           "ddpm": __version__, "device": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["capability"] = f"sm{major}{minor}"
        env["cuda"] = torch.version.cuda
    else:
        env["machine"] = platform.machine()
    try:
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a CPU-only torch: no Triton to record
        pass
    return env


def network_fingerprint(module) -> str:
    """A hash of a network's structure: each submodule's type, its settings (extra_repr and plain attributes such as
    the training flag, the heads of attention, the folded upsampling) and every tensor's name, shape, dtype and
    strides (channels-last shows there). Two networks with one fingerprint compile to the same graphs."""
    h = hashlib.sha256()
    for name, m in module.named_modules():
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})".encode())
        for k, v in sorted(vars(m).items()):
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))):
                h.update(f"{k}={v!r};".encode())
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{tuple(t.stride())};".encode())
    return h.hexdigest()[:24]


def call_signature(args: tuple, device) -> dict:
    """What torch.compile specialises on at the first call besides the code: each argument's shape, dtype and
    strides (a tensor) or value (anything else), and the grad and autocast modes around the call."""
    import torch

    def one(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return {"shape": list(a.shape), "dtype": str(a.dtype), "stride": list(a.stride()),
                    "requires_grad": a.requires_grad}
        return repr(a)

    try:
        autocast = (torch.is_autocast_enabled(device.type), str(torch.get_autocast_dtype(device.type)))
    except (AttributeError, TypeError):  # a torch without the per-device autocast queries
        autocast = (torch.is_autocast_enabled(), "")
    return {"args": [one(a) for a in args], "grad": torch.is_grad_enabled(), "autocast": list(autocast)}


# -- entries on disk ----------------------------------------------------------------------------------------------


def list_entries(directory: Path | None = None) -> list[Entry]:
    """The compile cache's entries, most recently used first (engine/cache_entries.py)."""
    return cache_entries.list_entries(directory or cache_dir(), KINDS)


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Delete every entry of the compile cache; returns (entries, bytes) removed."""
    return cache_entries.clear(directory or cache_dir(), KINDS)


def prune(directory: Path, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> int:
    """Keep the most recently used entries within the bounds (engine/cache_entries.py)."""
    return cache_entries.prune(directory, KINDS, max_entries, max_bytes)


def read_entry(directory: Path, key: dict, data: bool = True) -> tuple[bytes | None, dict | None, str | None]:
    """(torch's bytes, the description, None) for `key`'s entry; (None, None, None) when there is none; (None,
    None, why) when there is one that must not be loaded: unreadable, damaged, made for another key or torch, or
    not the user's own (torch unpickles what it loads: only the user's own files are trusted). `data` False
    reads only the description and the bytes' size, not the bytes: (b"", description, None) for an entry that
    looks sound, which the load then checks in full."""
    name = entry_name(key)
    desc, blob = directory / f"{name}.json", directory / f"{name}.bin"
    if not desc.exists():
        return None, None, None
    try:
        meta = json.loads(desc.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return None, None, f"{desc} is not an entry of this version of ddpm"
        theirs = (meta.get("key") or {}).get("env", {}).get("torch")
        if theirs != key["env"]["torch"]:
            return None, None, f"{desc} was made by torch {theirs}, and this is torch {key['env']['torch']}"
        if meta.get("key") != json.loads(json.dumps(key, default=str)):
            return None, None, f"{desc} describes another network or shape than its name says"
        stat = blob.stat()
        if hasattr(os, "getuid") and stat.st_uid != os.getuid():
            return None, None, f"{blob} belongs to another user"
        if not data:
            ok = stat.st_size == meta.get("bytes")
            return (b"", meta, None) if ok else (None, None, f"{blob} is damaged (not the size its entry says)")
        blob_bytes = blob.read_bytes()
    except FileNotFoundError:
        return None, None, f"{blob} is missing"
    except (OSError, ValueError, AttributeError, TypeError, RecursionError) as e:
        return None, None, f"{desc} cannot be read ({type(e).__name__ if isinstance(e, RecursionError) else e})"
    if len(blob_bytes) != meta.get("bytes") or hashlib.sha256(blob_bytes).hexdigest() != meta.get("sha256"):
        return None, None, f"{blob} is damaged (truncated or changed since it was written)"
    return blob_bytes, meta, None


def write_entry(directory: Path, key: dict, data: bytes, artifacts: dict[str, list[str]]) -> Path:
    """Write `key`'s entry atomically, bytes first and then the description that vouches for them (a reader checks
    the checksum, so two processes writing one entry at once leave a good entry or one that is ignored)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # private: torch unpickles what it loads from here
    name = entry_name(key)
    atomic_write_bytes(directory / f"{name}.bin", data)
    meta = {"format": FORMAT, "key": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hits": 0,
            "artifacts": {kind: sorted(keys) for kind, keys in artifacts.items()}}
    atomic_write_bytes(directory / f"{name}.json", json.dumps(meta, indent=1, default=str).encode())
    return directory / f"{name}.bin"


def _artifact_keys(info: Any) -> dict[str, list[str]]:
    """torch's CacheInfo -> {artifact kind: [keys]}: `artifacts` on newer torch, one list field per kind on older."""
    arts = getattr(info, "artifacts", None)
    if isinstance(arts, dict):
        return {str(k): [str(x) for x in v] for k, v in arts.items()}
    try:
        return {f.name: [str(x) for x in getattr(info, f.name) or []] for f in fields(info)}
    except TypeError:  # not a dataclass: nothing known, so the entry is saved again after each load
        return {}


# -- the compiled callable's cache ----------------------------------------------------------------------------------


class CompileCache:
    """Wraps a compiled callable: at its first call, keys the entry by `static` plus the call's inputs and the
    machine, loads the entry into torch's caches, then calls it (torch then finds what it would compile); `save()`
    after the first call, or the first step when a backward also compiles (training), stores what was compiled
    unless the loaded entry already held all of it.

    `state`: "off" (disabled, or a torch without portable artifacts), "miss", "hit" (loaded and complete),
    "saved". Problems are one warning each (`on_warning`; else a DdpmWarning) and never stop the run."""

    def __init__(self, fn: Callable, static: dict, device, *, module=None, save: bool = True,
                 save_after_first_call: bool = False, on_warning: Callable[[str], None] | None = None,
                 on_message: Callable[[str], None] | None = None, directory: Path | None = None):
        self.fn, self.static, self.device, self.module = fn, static, device, module
        self.may_save, self.save_after_first_call = save, save_after_first_call
        self.on_warning, self.on_message = on_warning, on_message
        self.directory = directory or cache_dir()
        self.state = "off" if not (enabled() and supported()) else "pending"
        self.key: dict | None = None  # set at the first call (unless off)
        self.called = False
        self.loaded: dict[str, list[str]] = {}
        self.load_s = self.first_call_s = 0.0  # seconds: loading the entry; the first call (compiling) after it

    def __call__(self, *args):
        if self.called:
            return self.fn(*args)
        self.called = True
        t = time.perf_counter()
        if self.state != "off":
            self.key = self.key_for(args)
            self.load()
        self.load_s = time.perf_counter() - t
        out = self.fn(*args)
        self.first_call_s = time.perf_counter() - t - self.load_s
        if self.save_after_first_call:
            self.save()
        return out

    def key_for(self, args: tuple) -> dict:
        """The entry's key for a first call with `args`, in the grad and autocast modes of the moment."""
        static = {**self.static, "network": network_fingerprint(self.module)} if self.module is not None \
            else self.static
        return {**static, "inputs": call_signature(args, self.device), "env": environment(self.device)}

    def has_entry(self, args: tuple) -> bool:
        """Whether a first call with `args` would load an entry (this process's, or a sound one on disk), without
        calling anything: what `train.compile_ahead: auto` asks before it starts a helper."""
        if self.state == "off":
            return False
        key = self.key_for(args)
        return (self.directory / entry_name(key) in _IN_PROCESS
                or read_entry(self.directory, key, data=False)[0] is not None)  # the load reads the bytes

    def _warn(self, text: str) -> None:
        text = f"compile cache: {text}"
        if self.on_warning is not None:
            self.on_warning(text)
        else:
            warnings.warn(text, DdpmWarning, stacklevel=3)

    def load(self) -> bool:
        import torch

        where = self.directory / entry_name(self.key)
        if where in _IN_PROCESS:
            self.loaded, self.state = _IN_PROCESS[where], "hit"
            return True
        data, meta, problem = read_entry(self.directory, self.key)
        if problem:
            self._warn(f"ignored {problem}; compiling afresh (it is replaced after this compile)")
        if data is None:
            self.state = "miss"
            return False
        quiet = logging.getLogger("torch.compiler._cache")  # torch logs its own failures with a traceback: ours says it
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # torch refused its own format (another build): compile as if there were no entry
            info, problem = None, f"{type(e).__name__}: {e}"
        finally:
            quiet.setLevel(level)
        if info is None:
            self._warn(f"torch could not load {self.directory / entry_name(self.key)}.bin"
                       f"{f' ({problem})' if problem else ''}; compiling afresh")
            self.state = "miss"
            return False
        self.loaded = _IN_PROCESS[where] = _artifact_keys(info)
        self.state = "hit"
        self._touch(meta)
        if self.on_message:
            self.on_message(f"compile cache: loaded {self.directory / entry_name(self.key)}.bin (compiled before)")
        return True

    def _touch(self, meta: dict) -> None:
        """Count the hit and mark the entry recently used (pruning keeps those); a failure here loses nothing."""
        try:
            meta["hits"] = int(meta.get("hits") or 0) + 1
        except (TypeError, ValueError):  # a count spoiled by hand: counting starts again
            meta["hits"] = 1
        try:
            atomic_write_bytes(self.directory / f"{entry_name(self.key)}.json",
                               json.dumps(meta, indent=1, default=str).encode())
        except OSError:
            pass

    def save(self) -> bool:
        """Store what this process compiled (once). Skipped when the loaded entry held every artifact torch used."""
        if self.state not in ("miss", "hit") or not self.may_save:
            return False
        import torch

        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:  # nothing compiled through torch's caches (they may be off): nothing to keep
                return False
            data, info = saved
            made = _artifact_keys(info)
            if self.state == "hit" and all(set(v) <= set(self.loaded.get(k, ())) for k, v in made.items()):
                return False
            path = write_entry(self.directory, self.key, data, made)
            _IN_PROCESS[self.directory / entry_name(self.key)] = made
        except Exception as e:  # a full disk, a read-only home, a torch that cannot serialise: the run goes on
            self._warn(f"could not save the compiled code to {self.directory} ({type(e).__name__}: {e})")
            return False
        try:
            prune(self.directory)
        except OSError:  # another process pruned the same files first
            pass
        self.state = "saved"
        if self.on_message:
            self.on_message(f"compile cache: saved {path} ({len(data) / 2**20:.1f} MB) for the next run")
        return True


def state_of(fn: Any) -> str:
    """The compile cache's state for a network from generate.inference_net ("" when it was not compiled)."""
    cache = getattr(fn, "compile_cache", None)
    return cache.state if cache is not None else ""


def for_training(trainer, mode: str) -> CompileCache:
    """The training step's cache: wraps `trainer.loss_fn` (compiled), keyed by the network, the diffusion (its
    loss is inside the compiled graph), precision, layout, compile mode and inductor options, and the gradient
    sync; the batch's shape is read at the first call. Rank 0 saves, after the first step (its backward compiles
    at the first loss.backward()); notes and warnings go to the trainer's callbacks."""
    from ddpm_cli.config import config_to_dict
    from ddpm_cli.engine.build import compile_options

    cfg = trainer.cfg
    sections = config_to_dict(cfg)
    static = {"kind": "train", "model": sections["model"], "diffusion": sections["diffusion"],
              "bf16": trainer.bf16, "channels_last": trainer.channels_last, "mode": mode,
              "options": compile_options(cfg, trainer.device, mode), "world": trainer.dist.world,
              "grad_sync": trainer.grad_sync}
    return CompileCache(trainer.loss_fn, static, trainer.device, module=trainer.model, save=trainer.main,
                        on_warning=trainer.cb.on_warning, on_message=trainer.cb.on_message)


def for_sampling(net: Callable, model, mode: str, options: dict, device, channels_last: bool) -> CompileCache:
    """The sampler network's cache: wraps the compiled `net` of `model`, keyed by the network (its switches
    included), the first batch's shapes and autocast, the mode and options; saved right after that first call.
    Under torchrun only rank 0 saves and warns (every rank compiles the same graphs, and reads the same entry)."""
    static = {"kind": "sample", "mode": mode, "options": options, "channels_last": channels_last}
    main = int(os.environ.get("RANK", "0")) == 0
    return CompileCache(net, static, device, module=model, save=main, save_after_first_call=True,
                        on_warning=None if main else lambda text: None)
