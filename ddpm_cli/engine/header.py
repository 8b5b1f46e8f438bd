"""Reading and checking a checkpoint's safetensors header without torch (fast `ddpm inspect`), finding the
checkpoints of a run directory, and writing files atomically.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON, then the tensor bytes."""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ddpm_cli import __version__
from ddpm_cli.config import RunConfig, config_from_json
from ddpm_cli.errors import CheckpointError, ConfigError, DdpmError

FORMAT = "ddpm-cli"
FORMAT_VERSION = 1
MAX_HEADER = 100 * 1024 * 1024
CKPT_RE = re.compile(r"ckpt-(\d+)\.safetensors$")


@dataclass
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    file_size: int

    @property
    def format_version(self) -> int:
        return int(self.metadata.get("format_version", "0"))


def class_names(metadata: dict[str, str]) -> list[str]:
    """The class names a checkpoint's metadata lists (label i is class i); [] when it lists none or is unreadable."""
    try:
        names = json.loads(metadata.get("classes") or "[]")
    except ValueError:
        return []
    return list(names) if isinstance(names, list) else []


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip (PK..) holding a pickle; legacy torch.save and pickle.dump start with 0x80 PROTO.
    return head[:2] == b"PK" or (len(head) > 1 and head[0] == 0x80 and head[1] <= 5)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid in a safetensors header")


def read_header(path: str | Path, require_ddpm: bool = True) -> Header:
    """Parse and validate the header; raise CheckpointError with the reason and the fix on any problem."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found; pass a .safetensors file written by ddpm or a run "
                              f"directory")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory with no checkpoint in it; pass a .safetensors file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if _looks_like_pickle(head):
                raise CheckpointError(f"{p} is a pickle (PyTorch .pt/.pth); ddpm loads only safetensors files "
                                      f"and never unpickles, for safety")
            if len(head) < 8:
                raise CheckpointError(f"{p} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{p} is not a safetensors file, or it is truncated (header of {n} bytes "
                                      f"in a {size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{p} is not a safetensors file (its header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            lo, hi = info["data_offsets"]
            int(lo), int(hi), info["dtype"], list(info["shape"])
        except (TypeError, KeyError, ValueError, OverflowError):
            raise CheckpointError(f"{p} is not a valid safetensors file (bad entry for tensor {name!r})") from None
        end = max(end, int(hi))
    if 8 + n + end > size:
        raise CheckpointError(f"{p} is truncated: its tensors need {8 + n + end} bytes but the file has {size}; "
                              f"use an earlier checkpoint of the run")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{p} has malformed safetensors metadata")
    h = Header(p, metadata, header, size)
    if require_ddpm:
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{p} is a safetensors file without ddpm's metadata (not written by ddpm); "
                                  f"use a checkpoint from `ddpm train` or `ddpm export`")
        try:
            version = h.format_version
        except ValueError:
            raise CheckpointError(f"{p} has an unreadable format_version") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{p} uses checkpoint format {version}, newer than this ddpm understands "
                                  f"({FORMAT_VERSION}); upgrade ddpm")
    return h


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's weight checkpoints, oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = [p for p in ckpt_dir.glob("ckpt-*.safetensors") if CKPT_RE.search(p.name)] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.search(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest.json` points at (written last, so it names a complete file), else the newest."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest.json"
    if pointer.exists():
        try:
            target = run_dir / json.loads(pointer.read_text())["weights"]
            if target.exists():
                return target
        except (ValueError, KeyError, TypeError, OSError):
            pass
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory -> its latest checkpoint."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p} holds no checkpoints (looked for checkpoints/ckpt-*.safetensors); "
                                  f"pass a run directory of `ddpm train` or a .safetensors file")
        return found
    return p


def extra_ema_decays(metadata: dict[str, str]) -> list[float]:
    """The decays of a checkpoint's train.ema_extra weights (tensors ema1.*, ema2.*, ...), in order; [] if none."""
    try:
        decays = json.loads(metadata.get("ema_extra", "[]"))
        decays = [float(d) for d in decays] if isinstance(decays, list) else []
    except (ValueError, TypeError, OverflowError, RecursionError):
        return []
    return decays if all(0.0 <= d < 1.0 for d in decays) else []  # NaN, inf and nonsense: none


def has_ema_weights(header: Header) -> bool:
    """Whether the file holds the main EMA weights (`ema.*`, train.ema_decay's)."""
    return header.metadata.get("has_ema") == "true" and any(k.startswith("ema.") for k in header.tensors)


def ema_decays(header: Header, main_decay: float | None) -> list[float]:
    """Every EMA decay a checkpoint holds weights for: the main one (train.ema_decay, if its weights are there),
    then the train.ema_extra ones whose ema{i}.* tensors are there."""
    extra = [d for i, d in enumerate(extra_ema_decays(header.metadata), 1)
             if any(k.startswith(f"ema{i}.") for k in header.tensors)]
    return ([main_decay] if main_decay is not None and has_ema_weights(header) else []) + extra


def require_ema_decay(header: Header, main_decay: float | None, decay: float) -> None:
    """The one-line refusal of `--ema-decay D` for a checkpoint without EMA weights of that decay."""
    held = ema_decays(header, main_decay)
    if decay not in held:
        raise CheckpointError(f"{header.path} holds no EMA weights with decay {decay}; it holds "
                              f"{', '.join(map(str, held)) or 'none'} (train.ema_extra keeps more)")


def state_path(weights: Path) -> Path:
    """The training-state file that sits beside a weights checkpoint."""
    return weights.with_name(weights.name.replace(".safetensors", ".state.safetensors"))


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, flush and fsync, then rename into place.

    A crash at any moment leaves either the old file or the new one, never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _version(text: str) -> tuple[int, ...]:
    """'1.2.3rc1' -> (1, 2, 3): the numeric release, enough to tell which of two ddpm versions is newer."""
    return tuple(int(m.group()) for part in text.split(".")[:3] if (m := re.match(r"\d+", part)))


def read_checkpoint_config(path: str | Path) -> tuple[Path, Header, RunConfig]:
    """A checkpoint (or a run directory's latest) -> (file, header, stored config), without torch."""
    p = resolve_checkpoint(path)
    header = read_header(p)
    if header.metadata.get("kind") == "train-state":
        raise CheckpointError(f"{p} is a training-state file; pass the weights file beside it")
    try:
        cfg = config_from_json(header.metadata.get("config", ""))
    except ConfigError as e:
        unknown = [x.split(":")[0] for x in e.problems if "unknown field" in x]
        written_by = header.metadata.get("ddpm_version", "")
        if unknown and _version(written_by) > _version(__version__):  # settings of a newer ddpm
            raise CheckpointError(f"{p} was written by ddpm {written_by}, whose config has settings this ddpm "
                                  f"{__version__} does not know ({', '.join(unknown)}); upgrade ddpm to read it") \
                from None
        if unknown and written_by and written_by != __version__:  # settings an older ddpm had, since removed
            raise CheckpointError(f"{p} was written by ddpm {written_by}, with settings this ddpm {__version__} no "
                                  f"longer has ({', '.join(unknown)}); read it with ddpm {written_by}") from None
        raise CheckpointError(f"{p}: its stored config is not valid for this ddpm ({'; '.join(e.problems) or e})") \
            from None
    return p, header, cfg


def stored_guide_step(header: Header) -> int | None:
    """The step whose weights a checkpoint carries as its autoguidance guide (train.guide_step), or None; a guide
    that cannot be used (no valid step, or not the model's tensors) is a CheckpointError."""
    guide = {k[6:]: v["shape"] for k, v in header.tensors.items() if k.startswith("guide.")}
    if not guide:
        return None
    model = {k[6:]: v["shape"] for k, v in header.tensors.items() if k.startswith("model.")}
    try:
        step = int(header.metadata.get("guide_step", ""))
        if not 1 <= step <= int(header.metadata.get("step", step)):
            raise ValueError
    except ValueError:
        raise CheckpointError(f"{header.path} holds autoguidance guide weights without a valid guide_step in its "
                              f"metadata; use an earlier checkpoint, or export it without the guide") from None
    if guide != model:
        raise CheckpointError(f"{header.path}: its autoguidance guide weights do not match its model weights; use an "
                              f"earlier checkpoint")
    return step


@dataclass
class Guidance:
    """How a checkpoint will be guided: `weight` (1 = not at all); autoguidance when `guide` names the file that
    holds the guide's weights (`stored_step`: the checkpoint's own guide.* weights, of that step), else
    classifier-free."""

    weight: float = 1.0
    guide: Path | None = None
    stored_step: int | None = None

    @property
    def default_sampler(self) -> str:
        """DPM-Solver++(2M) (20 steps) with a stored guide, as measured (BENCHMARKS.md); DDIM (100) otherwise."""
        return "dpm++2m" if self.stored_step is not None else "ddim"

    def describe(self) -> str:
        """A few words for the command's header line ("" when unguided)."""
        if self.weight == 1.0:
            return ""
        if self.guide is None:
            return f"classifier-free guidance {self.weight:g}"
        by = f"its step-{self.stored_step} weights" if self.stored_step is not None else str(self.guide)
        return f"autoguided by {by} at {self.weight:g}"


def _betas(cfg: RunConfig) -> tuple[float, ...]:
    """The noise schedule itself (whatever fields produced it): what two models must share to guide each other."""
    from ddpm_cli.diffusion.schedules import make_betas

    d = cfg.diffusion
    return tuple(make_betas(d.schedule, d.num_timesteps, d.schedule_low, d.schedule_high, d.dns_offset).tolist())


def check_guidance(path: Path, header: Header, cfg: RunConfig, guidance: float | None,
                   guide: str | Path | None) -> Guidance:
    """The one check of `--guidance W` and `--guide-model G|none` against a checkpoint (sample and eval).

    A checkpoint that carries a guide (train.guide_step) is autoguided by it at train.guide_weight unless told
    otherwise; `--guide-model none` turns that off, `--guidance 1` too. With `--guide-model G`, W is autoguidance
    by G, which must draw the same kind of images from the same noise levels (image shape, classes, noise
    schedule); its size and training may differ, that is the point. Otherwise W is classifier-free guidance,
    which needs a class-conditional model."""
    if guidance is not None and not math.isfinite(guidance):
        raise DdpmError(f"--guidance must be a finite number (got {guidance})")
    stored = stored_guide_step(header)
    if guide is None and guidance != 1.0 and stored is not None:
        return Guidance(cfg.train.guide_weight if guidance is None else guidance, path, stored)
    if guide is None or str(guide) == "none":
        weight = 1.0 if guidance is None else guidance
        if weight != 1.0 and not cfg.model.conditional:
            raise DdpmError("--guidance needs a class-conditional checkpoint, or a weaker model to guide with "
                            "(--guide-model, e.g. an earlier checkpoint of the same run); this one is "
                            "unconditional")
        return Guidance(weight)
    if guidance == 1.0:
        raise DdpmError("--guide-model has no effect at --guidance 1; pass a guidance weight above 1 (e.g. "
                        "--guidance 2)")
    try:
        guide_path, guide_header, g = read_checkpoint_config(guide)
    except CheckpointError as e:
        raise CheckpointError(f"--guide-model: {e}") from None
    if guide_path.resolve() == path.resolve():
        raise DdpmError(f"--guide-model {guide} is the checkpoint itself ({guide_path.name}), which guides nothing; "
                        f"pass an earlier checkpoint of the run (its checkpoints/ckpt-*.safetensors)")
    m, gm = cfg.model, g.model
    differ = [what for what, a, b in (
        ("image size", (m.image_size, m.in_channels), (gm.image_size, gm.in_channels)),
        ("classes", (m.conditional, m.conditional and m.num_classes),
         (gm.conditional, gm.conditional and gm.num_classes)),
        ("noise schedule", _betas(cfg), _betas(g))) if a != b]
    names, guide_names = class_names(header.metadata), class_names(guide_header.metadata)
    if m.conditional and gm.conditional and names and guide_names and names != guide_names:
        differ.append("class names")  # the same number of classes, but label i is another class
    if differ:
        raise CheckpointError(f"the guide model {guide_path} differs from the checkpoint in its "
                              f"{' and '.join(differ)}; guide with an earlier checkpoint of the same run, or a model "
                              f"trained on the same data and schedule")
    return Guidance(cfg.train.guide_weight if guidance is None else guidance, guide_path)
