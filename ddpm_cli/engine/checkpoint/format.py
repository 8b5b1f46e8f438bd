"""Reading a checkpoint without torch (fast `ddpm inspect`): its safetensors header, ddpm's metadata (format,
EMA decays, classes, the autoguidance guide) and the stored run config.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON, then the tensor bytes."""
from __future__ import annotations

import json
import re
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

from ddpm_cli import __version__
from ddpm_cli.config import RunConfig, apply_overrides, validate_config
from ddpm_cli.engine.runs import diffusers_error, diffusers_model, resolve_checkpoint, snapshot_error
from ddpm_cli.errors import CheckpointError, ConfigError

FORMAT = "ddpm-cli"
FORMAT_VERSION = 1
MAX_HEADER = 100 * 1024 * 1024


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


def _safetensors_start(head: bytes) -> bool:
    """`head` (a file's first 9 bytes) opens a safetensors file: a header length of at most MAX_HEADER, then the JSON
    header's "{". Told apart from the formats whose magic bytes such a length can spell (below)."""
    return len(head) >= 9 and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER and head[8:9] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    """Legacy torch.save and pickle.dump start with 0x80 PROTO (torch.save's zip is told apart by _zip_kind). So can
    a safetensors header length (384 is 80 01 00 ..); fewer than 9 bytes are too few to tell (read_header says the
    file is cut short)."""
    return len(head) > 1 and head[0] == 0x80 and head[1] <= 5 and not _safetensors_start(head)


def _looks_like_zip(head: bytes) -> bool:
    """A zip opens with a local file header (PK 03 04), or, empty, with its end record (PK 05 06). So can a
    safetensors header length (0x04034B50 is 67,324,752; "PK" alone is any length of 19,280 + k * 65,536); a zip's
    byte 8 is its compression method's low byte, never "{"."""
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06") and not _safetensors_start(head)


def _zip_kind(p: Path) -> str:
    """What a zip (PK..) holds, by its member names, unpickling nothing: "pt2" (a torch.export archive, whose
    `archive_format` entry says pt2), "torch" (torch.save's: its pickle, data.pkl, beside `version` in one folder)
    or "zip" (any other: a dataset's, say, even one holding a file of that name)."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if any(n.endswith("/archive_format") and z.read(n).strip() == b"pt2" for n in names):
                return "pt2"
    except Exception:  # noqa: BLE001 - a zip it cannot read (cut short, odd compression): its first entry's name,
        return "torch" if _saved_pickle(_first_zip_entry(p)) else "zip"  # torch.save's first: FOLDER/data.pkl
    listed = set(names)
    saved = any(_saved_pickle(n) and n[:-len("data.pkl")] + "version" in listed for n in names)
    return "torch" if saved else "zip"


def _saved_pickle(name: str) -> bool:
    """Whether a zip entry is where torch.save puts its pickle: data.pkl, at most one folder down."""
    return name.count("/") <= 1 and name.rpartition("/")[2] == "data.pkl"


def _first_zip_entry(p: Path) -> str:
    """The name in a zip's first local file header (its length at byte 26, the name from byte 30); "" if none."""
    with open(p, "rb") as f:
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return ""
        (n,) = struct.unpack("<H", local[26:28])
        return f.read(n).decode("utf-8", "replace")


def looks_like_a_checkpoint(path: str | Path) -> bool:
    """Whether the file `path` opens as what read_header takes or refuses as a model's weights (safetensors, a
    pickle, torch.save's or torch.export's zip, an ONNX export), by its first bytes whatever its suffix: `ddpm
    eval m.ckpt` samples it as `ddpm sample m.ckpt` does, and a .pt gets the pickle's refusal rather than "not
    images". An .npz or a .zip of images is a zip of another kind."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if _looks_like_zip(head):
        return _zip_kind(p) in ("torch", "pt2")
    return _safetensors_start(head) or _looks_like_pickle(head) or _looks_like_onnx(head)


def _looks_like_onnx(head: bytes) -> bool:
    # An ONNX ModelProto (protobuf) opens with field 1, ir_version (tag 0x08, a one-byte varint), then another field.
    return len(head) > 2 and head[0] == 0x08 and head[1] < 0x80 and head[2] in b"\x12\x1a\x22\x2a\x32\x3a\x42"


def _looks_like_text(f) -> bool:
    """Whether the open file `f` starts with text (UTF-8, no control characters but whitespace): a config or notes
    given where a checkpoint goes, whose first 8 characters would read as a header length of exabytes."""
    import codecs

    f.seek(0)
    chunk = f.read(1024)
    try:  # not final: a character cut at the chunk's end is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(chunk, final=len(chunk) < 1024).removeprefix("\ufeff")
    except UnicodeDecodeError:
        return False
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _not_a_checkpoint(p: Path, what: str, fmt: str, loader: str) -> CheckpointError:
    return CheckpointError(f"{p} is {what} (what `ddpm export --format {fmt}` writes, for {loader}), not a "
                           f"checkpoint; pass ddpm the .safetensors checkpoint it was exported from, or its run "
                           f"directory")


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
            head = f.read(9)  # the header's length, and the "{" that opens it
            pickled = CheckpointError(f"{p} is a pickle (PyTorch .pt/.pth); ddpm loads only safetensors files and "
                                      f"never unpickles, for safety")
            if _looks_like_zip(head):
                kind = _zip_kind(p)
                if kind == "pt2":
                    raise _not_a_checkpoint(p, "a torch.export program", "pt2", "torch.export.load")
                if kind == "torch":
                    raise pickled
                raise CheckpointError(f"{p} is a zip archive, not a checkpoint; pass a .safetensors checkpoint "
                                      f"written by ddpm, or its run directory (a .zip of images is training data: "
                                      f"data.root, with data.dataset=folder)")
            if _looks_like_pickle(head):
                raise pickled
            n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
            fits = 0 < n <= MAX_HEADER and 8 + n <= size
            if not fits and _looks_like_text(f):  # 8 bytes of text are a length of petabytes: never one that fits
                config = f" (a run config starts a run: ddpm train -c {shlex.quote(str(p))})" \
                    if p.suffix in (".yaml", ".yml") else ""
                raise CheckpointError(f"{p} is a text file, not a safetensors checkpoint; pass a .safetensors "
                                      f"checkpoint written by ddpm, or its run directory{config}")
            if len(head) < 8:
                raise CheckpointError(f"{p} is not a safetensors file (only {size} bytes)")
            if not fits:
                if _looks_like_onnx(head):
                    raise _not_a_checkpoint(p, "an ONNX model", "onnx", "onnxruntime")
                raise CheckpointError(f"{p} is not a safetensors file, or it is truncated (header of {n} bytes "
                                      f"in a {size}-byte file)")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror or e}") from None
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
        if metadata.get("format") != FORMAT and (folder := diffusers_model(p)) is not None:
            raise diffusers_error(p, folder)
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


def _version(text: str) -> tuple[int, ...]:
    """'1.2.3rc1' -> (1, 2, 3): the numeric release, enough to tell which of two ddpm versions is newer."""
    return tuple(int(m.group()) for part in text.split(".")[:3] if (m := re.match(r"\d+", part)))


@dataclass
class StoredConfig:
    """The run config a checkpoint stores (JSON in its metadata), read the one way, two strengths: `validated()`
    for what rebuilds a model (sample, export, eval, and `train --resume` with its --set overrides), `sections()`
    for `ddpm inspect`, which shows what it can read of any file and refuses none."""

    path: Path
    metadata: dict[str, str]
    data: dict | None  # the JSON object as written; None when it is missing or not a JSON object

    @classmethod
    def of(cls, header: Header) -> StoredConfig:
        try:
            data = json.loads(header.metadata.get("config") or "null")
        except (ValueError, RecursionError):
            data = None
        return cls(header.path, header.metadata, data if isinstance(data, dict) else None)

    def sections(self) -> dict[str, dict]:
        """Lenient: the model, diffusion and train sections as written, each {} where missing or malformed."""
        data = self.data or {}
        return {k: data[k] if isinstance(data.get(k), dict) else {} for k in ("model", "diffusion", "train")}

    def validated(self, overrides: list[str] | None = None) -> RunConfig:
        """Strict: the config validated for this ddpm, with `overrides` (--set) applied first. A config this ddpm
        cannot read is a CheckpointError naming the version that wrote it; a bad override is blamed on --set."""
        if self.data is None:
            raise CheckpointError(f"{self.path} has no readable stored config (its metadata's `config` is missing "
                                  f"or not a JSON object), so the model cannot be rebuilt; use another checkpoint")
        set_error = None
        if overrides:
            try:
                fresh = json.loads(self.metadata["config"])  # a copy to override (parsed once already)
                return validate_config(apply_overrides(fresh, list(overrides)), f"{self.path} (stored config with --set)")
            except ConfigError as e:  # the override's fault, unless the stored config is bad by itself
                set_error = e
        try:
            cfg = validate_config(self.data, "checkpoint config")
        except ConfigError as e:
            raise self._unreadable(e) from None
        if set_error is not None:
            raise set_error
        return cfg

    def _unreadable(self, e: ConfigError) -> CheckpointError:
        unknown = [x.split(":")[0] for x in e.problems if "unknown field" in x]
        written_by, p = self.metadata.get("ddpm_version", ""), self.path
        if unknown and _version(written_by) > _version(__version__):  # settings of a newer ddpm
            return CheckpointError(f"{p} was written by ddpm {written_by}, whose config has settings this ddpm "
                                   f"{__version__} does not know ({', '.join(unknown)}); upgrade ddpm to read it")
        if unknown and written_by and written_by != __version__:  # settings an older ddpm had, since removed
            return CheckpointError(f"{p} was written by ddpm {written_by}, with settings this ddpm {__version__} no "
                                   f"longer has ({', '.join(unknown)}); read it with ddpm {written_by}")
        return CheckpointError(f"{p}: its stored config is not valid for this ddpm ({'; '.join(e.problems) or e})")


def read_checkpoint_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Path, Header, RunConfig]:
    """A checkpoint (or a run directory's latest) -> (file, header, stored config validated, `overrides` applied),
    without torch."""
    p = resolve_checkpoint(path)
    header = read_header(p)
    refuse_other_kinds(p, header)
    return p, header, StoredConfig.of(header).validated(overrides)


def refuse_other_kinds(p: Path, header: Header) -> None:
    """CheckpointError, naming what to pass instead, for the files of a run that are no checkpoint: a training
    state, a post-hoc EMA snapshot."""
    if header.metadata.get("kind") == "train-state":
        raise CheckpointError(f"{p} is a training-state file: it cannot be resumed or sampled by itself; pass the "
                              f"weights file beside it ({p.name.replace('.state.safetensors', '.safetensors')})")
    if header.metadata.get("kind") == "posthoc-ema-snapshot":  # posthoc_ema.SNAPSHOT_KIND: averages, no config
        raise snapshot_error(p)


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
