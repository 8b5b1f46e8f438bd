"""Writing and loading a checkpoint's tensors (torch, imported inside the functions that need it).

- weights: `model.*` and `ema.*` tensors (and `ema1.*`, `ema2.*`... for train.ema_extra, whose decays the
  metadata's `ema_extra` lists in order; `guide.*` for train.guide_step, its step in `guide_step`), with
  metadata (format, version, the resolved config as JSON, step, images seen, creation time, ddpm version,
  parameter count, classes). Alone, it rebuilds the model.
- training state (beside it, `*.state.safetensors`): optimizer tensors and RNG states as tensors, everything
  else (step, data position, param groups, counters) as JSON metadata.
Both are written atomically (engine.files)."""
from __future__ import annotations

import errno
import json
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_cli import __version__
from ddpm_cli.config import RunConfig, config_to_dict
from ddpm_cli.engine.checkpoint.format import (FORMAT, FORMAT_VERSION, Header, class_names, extra_ema_decays,
                                               read_checkpoint_config, read_header, require_ema_decay,
                                               stored_guide_step)
from ddpm_cli.engine.files import atomic_write_bytes, utf8_name
from ddpm_cli.engine.runs import state_path
from ddpm_cli.errors import CheckpointError, DdpmError

if TYPE_CHECKING:
    import torch

    from ddpm_cli.engine.guidance import Guidance


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file, written atomically; a failed write is one line and leaves earlier files intact."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise DdpmError(f"cannot write {path}: {reason}; earlier checkpoints are intact") from None


def weights_metadata(cfg: RunConfig, step: int, images_seen: int, num_params: int, has_ema: bool,
                     classes: list[str], kind: str = "train", dtype: str = "float32") -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "ddpm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": str(step), "images_seen": str(images_seen),
            "num_params": str(num_params), "has_ema": "true" if has_ema else "false", "kind": kind,
            "dtype": dtype, "classes": json.dumps(classes), "config": json.dumps(config_to_dict(cfg))}


def save_weights(path: Path, model: torch.nn.Module, ema_model: torch.nn.Module | None,
                 metadata: dict[str, str], extra: dict[float, torch.nn.Module] | None = None,
                 guide: tuple[int, dict[str, torch.Tensor]] | None = None) -> None:
    """`extra`: the train.ema_extra averages by decay, stored as ema1.*, ema2.* in the metadata's order;
    `guide`: (step, weights) of the autoguidance guide (train.guide_step), stored as guide.*."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema_model is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
    if extra:
        metadata = {**metadata, "ema_extra": json.dumps(list(extra))}
        for i, m in enumerate(extra.values(), 1):
            tensors.update({f"ema{i}.{k}": v for k, v in m.state_dict().items()})
    if guide is not None:
        metadata = {**metadata, "guide_step": str(guide[0])}
        tensors.update({f"guide.{k}": v for k, v in guide[1].items()})
    write_tensors(path, tensors, metadata)


def save_state(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer tensors + RNG states as tensors; `state` (plain JSON) as metadata."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": "train-state",
            "param_groups": json.dumps(sd["param_groups"]), "state": json.dumps(state)}
    write_tensors(path, tensors, meta)


class Checkpoint:
    """A weights checkpoint: its header and config, and its tensors by group, each group read from the file the
    first time it is asked for. Sampling one set of weights (and a guide) so reads a fraction of a file that also
    holds the raw weights and several averages, and holds no second copy of the whole file in memory. A state
    may be replaced (export picks an average so)."""

    def __init__(self, path: Path, header: Header, config: RunConfig):
        self.path, self.header, self.config = path, header, config
        self._prefixes = {name.split(".", 1)[0] + "." for name in header.tensors}

    def _group(self, prefix: str) -> dict[str, torch.Tensor] | None:
        """The tensors named `prefix`*, the prefix taken off; None when the file has none."""
        return read_tensors(self.path, prefix) if prefix in self._prefixes else None

    @cached_property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self._group("model.")

    @cached_property
    def ema_state(self) -> dict[str, torch.Tensor] | None:
        return self._group("ema.")

    @cached_property
    def extra_ema(self) -> dict[float, dict[str, torch.Tensor]]:
        """train.ema_extra's averages by decay."""
        found = {d: self._group(f"ema{i}.") for i, d in enumerate(extra_ema_decays(self.metadata), 1)}
        return {d: w for d, w in found.items() if w}

    @property
    def has_ema(self) -> bool:
        return "ema." in self._prefixes

    def average(self, decay: float) -> dict[str, torch.Tensor] | None:
        """The EMA weights of `decay`, read alone: one of train.ema_extra's (emaN.*), else train.ema_decay's."""
        extras = extra_ema_decays(self.metadata)
        return self._group(f"ema{extras.index(decay) + 1}.") if decay in extras else self.ema_state

    @cached_property
    def guide_state(self) -> dict[str, torch.Tensor] | None:
        """train.guide_step's weights (autoguidance)."""
        return self._group("guide.")

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))

    @property
    def guide_step(self) -> int:
        return int(self.metadata.get("guide_step", 0))

    @property
    def classes(self) -> list[str]:
        return class_names(self.metadata)


def read_tensors(path: Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or those named `prefix`* with the prefix taken off (read alone)."""
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    try:
        if prefix is None or not utf8_name(path):  # safe_open takes only a UTF-8 path; Python opens any
            tensors = st_load(path.read_bytes())
            return tensors if prefix is None else {k[len(prefix):]: v for k, v in tensors.items()
                                                   if k.startswith(prefix)}
        with safe_open(str(path), framework="pt") as f:  # its tensors map the file: copied, so that a file
            # changed or cut short later (another program's copy over it) cannot change or crash what was read
            return {k[len(prefix):]: f.get_tensor(k).clone() for k in f.keys() if k.startswith(prefix)}
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt payloads
        raise CheckpointError(f"{path} is corrupt ({e}); use an earlier checkpoint") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at `path` (a file, or a run directory's latest), its tensors read as they are used."""
    p, header, cfg = read_checkpoint_config(path)
    if not any(name.startswith("model.") for name in header.tensors):
        raise CheckpointError(f"{p} holds no model weights")
    stored_guide_step(header)  # refuses a guide it could not use
    return Checkpoint(p, header, cfg)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with an architecture mismatch turned into a one-line error."""
    import torch

    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
                  + (f" (e.g. {(wrong or missing or unexpected)[0]})"))
        raise CheckpointError(f"{what} does not match this model's architecture: {detail}; use the config the "
                              f"checkpoint was trained with")
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_state(weights_path: Path) -> tuple[dict[str, torch.Tensor], dict, list]:
    """The training-state file beside a weights checkpoint: (tensors, state JSON, optimizer param groups)."""
    sp = state_path(weights_path)
    if not sp.exists():
        raise CheckpointError(f"{weights_path} has no training state beside it ({sp.name}); it can be sampled "
                              f"but not resumed (exported checkpoints carry no state)")
    header = read_header(sp)
    if header.metadata.get("kind") != "train-state":
        raise CheckpointError(f"{sp} is not a training-state file")
    tensors = read_tensors(sp)
    try:
        state, groups = json.loads(header.metadata["state"]), json.loads(header.metadata["param_groups"])
        if not isinstance(state, dict) or not isinstance(groups, list):
            raise TypeError
        int(state["step"]), int(state["images_seen"])
        int(state["data"]["epoch"]), int(state["data"]["pos"])
        if not isinstance(state.get("early_stopping", {}), dict):
            raise TypeError
    except (KeyError, ValueError, TypeError, RecursionError):
        raise CheckpointError(f"{sp} has unreadable training state metadata") from None
    return tensors, state, groups


def optimizer_state_dict(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def load_optimizer_state(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """Optimizer.load_state_dict with this optimizer's settings kept (a resume's config, --set included, names the
    weight decay, betas and so on: load_state_dict would put the saved ones back), then each moment laid out
    like its parameter. Checkpoints store tensors contiguous, and torch restores a moment's dtype and device but
    not its strides; CUDA's fused Adam refuses moments whose layout differs from a channels-last parameter's."""
    import torch

    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state_dict)
    for group, kept in zip(opt.param_groups, settings):
        group.update(kept)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _network(ckpt: Checkpoint, state: dict[str, torch.Tensor], device: torch.device | str) -> torch.nn.Module:
    """The checkpoint's network with `state` loaded, built on `device` itself: on a GPU its random initialisation,
    overwritten at once, then takes kernels instead of the host's time (a few tenths of a second a network, which
    a small eager `ddpm sample` job pays twice: the model and its guide)."""
    import torch

    from ddpm_cli.engine.build import build_unet

    with torch.device(device):
        model = build_unet(ckpt.config.model)
    load_into(model, state, str(ckpt.path))
    return model.eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True,
               ema_decay: float | None = None):
    """Rebuild (model in eval mode, diffusion, config, checkpoint) from a checkpoint alone. `ema_decay` picks one
    of the checkpoint's EMA weights by its decay (train.ema_decay or one of train.ema_extra)."""
    from ddpm_cli.engine.build import build_diffusion

    ckpt = load_checkpoint(path)
    if ema_decay is not None:
        require_ema_decay(ckpt.header, ckpt.config.train.ema_decay, ema_decay)
        state = ckpt.average(ema_decay)
    else:
        state = ckpt.ema_state if (use_ema and ckpt.has_ema) else ckpt.model_state
    return _network(ckpt, state, device), build_diffusion(ckpt.config.diffusion).to(device), ckpt.config, ckpt


def load_guide(guidance: Guidance, loaded: Checkpoint, device: torch.device | str) -> torch.nn.Module:
    """Autoguidance's weaker network: the stored guide of `loaded` (the checkpoint being sampled), or the EMA
    weights of the checkpoint that --guide-model names."""
    if guidance.stored_step is None:
        return load_model(guidance.guide, device)[0]
    return _network(loaded, loaded.guide_state, device)  # stored_step comes from its guide.* tensors
