"""Moving models between ddpm and diffusers' folders: `ddpm import` (a UNet2DModel folder, or a DDPMPipeline
folder with unet/ and scheduler/, -> a ddpm checkpoint) and `ddpm export --format diffusers` (a checkpoint -> a
DDPMPipeline folder). The mapping itself is engine.diffusers_format's; no diffusers import here, only safetensors
and JSON. Nothing is written until every check has passed."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.config import RunConfig, validate_config
from ddpm_cli.engine.build import build_unet
from ddpm_cli.engine.diffusers_format import (diffusion_config_from_scheduler, model_config_from_diffusers,
                                              scheduler_config_from_diffusion, tensor_plan, unet_config_from_model)
from ddpm_cli.errors import CheckpointError, ConfigError, DdpmError

WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINE_INDEX = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.30.0",
                  "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


@dataclass
class DiffusersFolder:
    root: Path
    unet_config: dict
    unet_config_text: str
    scheduler_config: dict | None
    scheduler_config_text: str
    weights: Path


def _read_json(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path} is not valid JSON; download the model folder again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not a diffusers config (an object)")
    return data, text


def read_folder(path: str | Path) -> DiffusersFolder:
    """Find the UNet's config and weights and the scheduler's config in a model or pipeline folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} not found; pass a diffusers model folder (e.g. one downloaded with "
                              f"`huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32`)")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder; pass a diffusers model folder (config.json and {WEIGHTS}) or "
                              f"a pipeline folder (unet/ and scheduler/)")
    if (p / "unet" / "config.json").is_file():
        unet, scheduler = p / "unet", p / "scheduler" / "scheduler_config.json"
    elif (p / "config.json").is_file():
        unet, scheduler = p, p / "scheduler_config.json"
        if not scheduler.is_file() and p.name == "unet":
            scheduler = p.parent / "scheduler" / "scheduler_config.json"
    else:
        raise CheckpointError(f"{p} has no config.json (nor unet/config.json); pass the folder of a diffusers "
                              f"UNet2DModel or DDPMPipeline")
    unet_config, unet_text = _read_json(unet / "config.json")
    scheduler_config, scheduler_text = _read_json(scheduler) if scheduler.is_file() else (None, "")
    weights = unet / WEIGHTS
    if not weights.is_file():
        variants = sorted(unet.glob("diffusion_pytorch_model*.safetensors"))
        if any("-of-" in v.name for v in variants) or (unet / f"{WEIGHTS}.index.json").is_file():
            shards = f"{variants[0].name}, ..." if variants else f"{WEIGHTS}.index.json names them"
            raise CheckpointError(f"{unet} holds its weights in shards ({shards}), which ddpm does not join; save "
                                  f"the model again as one {WEIGHTS} (diffusers: "
                                  f"save_pretrained(..., max_shard_size='100GB'))")
        if len(variants) > 1:
            raise CheckpointError(f"{unet} holds {len(variants)} weight files ({', '.join(v.name for v in variants)}) "
                                  f"and no {WEIGHTS}; ddpm cannot tell which is meant: remove the others or name "
                                  f"the one you want {WEIGHTS}")
        if variants:
            weights = variants[0]  # e.g. the one fp16 variant
        elif (unet / "diffusion_pytorch_model.bin").is_file():
            raise CheckpointError(f"{unet} holds its weights only as diffusion_pytorch_model.bin, a pickle, which ddpm "
                                  f"never loads; download the repository's {WEIGHTS} too")
        else:
            raise CheckpointError(f"{unet} has no {WEIGHTS}; download the model's weights into it")
    return DiffusersFolder(p, unet_config, unet_text, scheduler_config, scheduler_text, weights)


def run_config(folder: DiffusersFolder) -> RunConfig:
    """The ddpm config of a diffusers folder: the model and diffusion sections mapped, the rest the defaults."""
    data = {"model": model_config_from_diffusers(folder.unet_config),
            "diffusion": diffusion_config_from_scheduler(folder.scheduler_config)}
    try:
        return validate_config(data, "the imported config")
    except ConfigError as e:
        raise CheckpointError(f"{folder.root}'s configuration has no ddpm equivalent: "
                              f"{'; '.join(e.problems) or e}") from None


def _expected_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return {k: tuple(v.shape) for k, v in build_unet(cfg.model).state_dict().items()}


def to_ddpm(tensors: dict[str, torch.Tensor], cfg: RunConfig, source: str) -> dict[str, torch.Tensor]:
    """diffusers' UNet2DModel tensors -> ddpm's UNet state dict (fp32), every name and shape checked."""
    shapes = _expected_shapes(cfg)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for t in tensor_plan(cfg.model):
        names = t.diffusers if all(n in tensors for n in t.diffusers) else t.legacy
        if not names or not all(n in tensors for n in names):
            raise CheckpointError(f"{source} lacks tensor {t.diffusers[0]}; its weights do not match its config.json")
        if not all(tensors[n].is_floating_point() for n in names):
            raise CheckpointError(f"{source}: tensor {names[0]} holds {tensors[names[0]].dtype} values, not weights "
                                  f"(floating point); the file is not a model's")
        parts = [tensors[n].float() for n in names]
        if not all(bool(torch.isfinite(x).all()) for x in parts):
            raise CheckpointError(f"{source}: tensor {names[0]} holds NaN or infinite values; the model would draw "
                                  f"blank images: take the weights from an earlier or intact copy")
        if t.op == "qkv":
            if len({tuple(x.shape) for x in parts}) != 1:
                raise CheckpointError(f"{source}: tensors {', '.join(names)} differ in shape")
            value = torch.cat(parts)
            value = value[:, :, None, None] if value.dim() == 2 else value
        else:
            value = parts[0][:, :, None, None] if t.op == "conv1x1" and parts[0].dim() == 2 else parts[0]
        want = shapes[t.ddpm]
        if tuple(value.shape) != want:
            if t.op != "same":  # the diffusers shape: a linear layer's, each of q, k, v a third of ddpm's
                want = ((want[0] // 3 if t.op == "qkv" else want[0]),) + want[1:2]
            raise CheckpointError(f"{source}: tensor {names[0]} has shape {list(parts[0].shape)}, but its "
                                  f"config.json makes it {list(want)}")
        out[t.ddpm] = value.contiguous()
        used.update(names)
    extra = sorted(n for n in tensors if n not in used and ".Conv2d_0." not in n)  # Conv2d_0: an old alias
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source} holds tensor {extra[0]}{more} that its config.json does not describe; ddpm "
                              f"cannot tell what it does")
    return out


def from_ddpm(state: dict[str, torch.Tensor], cfg: RunConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ddpm's UNet state dict -> diffusers' UNet2DModel tensors (the inverse of to_ddpm)."""
    out = {}
    for t in tensor_plan(cfg.model):
        value = state[t.ddpm].to(dtype)
        if t.op != "same" and value.dim() == 4:  # a 1x1 convolution's (C_out, C_in, 1, 1) weight as a linear's
            value = value.flatten(1)
        if t.op == "qkv":
            for name, part in zip(t.diffusers, value.chunk(3)):
                out[name] = part.contiguous()
        else:
            out[t.diffusers[0]] = value.contiguous()
    return out


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again") from None


@dataclass
class ImportResult:
    path: Path
    config: RunConfig
    num_params: int
    file_size: int
    scheduler_found: bool  # False: no scheduler_config.json, DDPMScheduler's defaults assumed


def default_import_output(folder: Path) -> Path:
    """Beside the folder, named for it: ddpm-cifar10-32/ -> ddpm-cifar10-32.safetensors."""
    folder = folder.resolve()
    return folder.with_name(f"{folder.name}.safetensors")


def import_diffusers(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> ImportResult:
    """A diffusers UNet2DModel / DDPMPipeline folder -> a ddpm checkpoint (model weights, config, provenance)."""
    from safetensors.torch import save as st_save

    from ddpm_cli.engine.checkpoint import load_model, weights_metadata
    from ddpm_cli.engine.files import as_utf8, atomic_write_bytes, temp_beside

    folder = read_folder(path)
    dst = Path(out) if out is not None else default_import_output(folder.root)
    if dst.is_dir():
        raise DdpmError(f"{dst} is a directory; pass a file name to --out")
    if dst.exists() and not overwrite:
        raise DdpmError(f"{dst} already exists; pass --overwrite or another --out")
    cfg = run_config(folder)
    state = to_ddpm(_load_tensors(folder.weights), cfg, str(folder.weights))
    num_params = sum(v.numel() for v in state.values())
    meta = weights_metadata(cfg, 0, 0, num_params, has_ema=False, classes=[], kind="import")
    meta.update(source="diffusers", source_path=as_utf8(str(folder.root.resolve())),
                source_file=as_utf8(folder.weights.name),
                source_config=folder.unet_config_text, source_scheduler_config=folder.scheduler_config_text)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DdpmError(f"cannot create folder {dst.parent}: {e.strerror or e}") from None
    tmp = temp_beside(dst, ".safetensors")
    try:
        try:
            atomic_write_bytes(tmp, st_save({f"model.{k}": v for k, v in state.items()}, metadata=meta))
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
        load_model(tmp, "cpu")  # it loads as `ddpm sample` will load it
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return ImportResult(dst, cfg, num_params, dst.stat().st_size, folder.scheduler_config is not None)


def default_export_folder(checkpoint: Path, weights: str = "ema") -> Path:
    stem = checkpoint.name.removesuffix(".safetensors")
    if weights != "ema":
        stem += "-raw" if weights == "model" else "-" + weights.replace(" ", "")
    return checkpoint.with_name(f"{stem}-diffusers")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_pipeline(state: dict[str, torch.Tensor], cfg: RunConfig, dst: Path, dtype: torch.dtype,
                   overwrite: bool, tolerance: float = 1e-6) -> tuple[int, float]:
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/) for a ddpm model, check it by importing
    it back and comparing outputs, and only then move it into place. Returns (bytes written, relative error)."""
    from safetensors.torch import save as st_save

    from ddpm_cli.engine.export import check_export
    from ddpm_cli.engine.files import fsync_dir, temp_beside

    unet_config = unet_config_from_model(cfg.model)  # refuses what diffusers cannot express, before any writing
    scheduler_config = scheduler_config_from_diffusion(cfg.diffusion)
    dst = Path(os.path.abspath(dst))  # `-o .` or `x/..` names a folder too
    if dst.exists() and not (overwrite and (dst / "model_index.json").is_file()):
        raise DdpmError(f"{dst} already exists; pass --overwrite or another --out" if not overwrite else
                        f"{dst} exists and is not a diffusers pipeline folder; pass another --out")
    tmp = temp_beside(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            (tmp / "unet").mkdir(parents=True)
            (tmp / "scheduler").mkdir()
            _write_json(tmp / "model_index.json", PIPELINE_INDEX)
            _write_json(tmp / "unet" / "config.json", unet_config)
            _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config)
            (tmp / "unet" / WEIGHTS).write_bytes(st_save(from_ddpm(state, cfg, dtype), metadata={"format": "pt"}))
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
        err, scale = _round_trip_error(state, cfg, tmp)
        check_export(dst, err, tolerance, "the folder read back", scale if dtype == torch.float16 else None)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        try:
            if overwrite and dst.exists():  # the export's own files replaced, each whole; the rest of the folder
                # (a hub clone's .git and README.md, other weight variants) stays as it is
                for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    (dst / f.relative_to(tmp)).parent.mkdir(exist_ok=True)
                    os.replace(f, dst / f.relative_to(tmp))
            else:
                os.rename(tmp, dst)  # refused where a folder with files appeared meanwhile
            fsync_dir(dst.parent)
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return size, err


def _round_trip_error(state: dict[str, torch.Tensor], cfg: RunConfig, folder: Path) -> tuple[float, float]:
    """Import the written folder again and compare its network's output with the source weights' (fp32): the
    relative error, and the source's largest output."""
    from ddpm_cli.engine.checkpoint import load_into
    from ddpm_cli.engine.export import random_inputs, relative_error

    back = read_folder(folder)
    try:  # the model as an import reads it: equal in function, if not always in spelling (norm layer = 1 group)
        back_cfg = validate_config({"model": model_config_from_diffusers(back.unet_config)})
    except (ConfigError, CheckpointError):
        return float("inf"), float("inf")
    nets = []
    for weights, c in ((state, cfg), (to_ddpm(_load_tensors(back.weights), back_cfg, str(back.weights)), back_cfg)):
        net = build_unet(c.model).eval()
        load_into(net, weights, str(folder))
        nets.append(net)
    inputs = random_inputs(cfg, 2)
    with torch.no_grad():
        want = nets[0](*inputs)
        return relative_error(nets[1](*inputs), want), float(want.abs().max())
