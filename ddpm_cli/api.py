"""The Python API: a model and its diffusion process in one object, for custom training loops.

    from ddpm_cli.api import Diffusion, load_config, load_data
    cfg = load_config("examples/quickstart.yaml")
    diffusion = Diffusion.from_config(cfg)
    opt = torch.optim.Adam(diffusion.parameters(), lr=2e-4)
    for x, y in torch.utils.data.DataLoader(load_data(cfg), batch_size=32, shuffle=True):
        loss = diffusion.loss(x, y)
        opt.zero_grad(); loss.backward(); opt.step()
        diffusion.update_ema()
    images = diffusion.sample(16, y=torch.arange(16) % 10)   # (16, C, H, W) in [-1, 1]
    diffusion.save("model.safetensors")                       # `ddpm sample model.safetensors` reads it

The CLI runs on the same engine (ddpm_cli.engine)."""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm_cli.config import RunConfig, apply_overrides, config_to_dict, validate_config
from ddpm_cli.config import load_config as _load_config_file
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine import checkpoint as ckpt_io
from ddpm_cli.engine.build import build_diffusion, build_unet, count_params, resolve_device
from ddpm_cli.engine.data import load_dataset, to_model_range
from ddpm_cli.engine.draw import balanced_labels
from ddpm_cli.engine.ema import EMA
from ddpm_cli.engine.generate import generate
from ddpm_cli.errors import UsageError

__all__ = ["Diffusion", "load_config", "load_data"]


def load_config(cfg: RunConfig | dict | str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file, a dict of sections, or a RunConfig, with `overrides` (`--set`'s texts,
    "train.lr=2e-4") applied to it."""
    if isinstance(cfg, RunConfig):
        if not overrides:
            return cfg
        cfg = config_to_dict(cfg)
    if isinstance(cfg, dict):
        data = apply_overrides(copy.deepcopy(cfg), list(overrides or []))  # (the caller's dict stays as it was)
        return validate_config(data, "the config dict", overrides)
    if isinstance(cfg, (str, Path)):
        return _load_config_file(cfg, overrides)
    raise UsageError(f"a config is a YAML file's path, a dict of sections or a RunConfig, not {type(cfg).__name__}")


def _argument(name: str, value: Any) -> str:
    """A sampling option as Diffusion.sample's caller gives it (`steps`, `sampler='ddim'`), for its warnings."""
    return f"{name}={value!r}" if value != "" else name


def _labels(y: Any, n: int, m, what: str) -> torch.Tensor:
    """`y` (a tensor, array, list or one int) as n class indices in [0, num_classes), on the CPU."""
    try:
        labels = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{what}: class labels are integers (a tensor, array or list), not {type(y).__name__}") \
            from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UsageError(f"{what}: class labels are integers, not {labels.dtype}")
    labels = labels.long().cpu().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if labels.numel() != n:
        raise UsageError(f"{what}: {labels.numel()} labels for {n} images")
    if n and not (0 <= int(labels.min()) and int(labels.max()) < m.num_classes):
        raise UsageError(f"{what}: labels must lie in [0, {m.num_classes}) (the model's classes), got "
                         f"{int(labels.min())} to {int(labels.max())}")
    return labels


def load_data(cfg: RunConfig | dict | str | Path) -> torch.utils.data.TensorDataset:
    """The config's dataset as (images in [-1, 1], labels), ready for a DataLoader; its `classes` are the labels'
    names (empty when unlabelled), for `Diffusion.classes`, which a checkpoint keeps."""
    cfg = load_config(cfg)
    ds = load_dataset(cfg.data, cfg.model)
    images = ds.images if isinstance(ds.images, torch.Tensor) else ds.images[:]  # a streamed folder: decode all
    data = torch.utils.data.TensorDataset(to_model_range(images), ds.labels)
    data.classes = list(ds.classes)
    return data


class Diffusion(nn.Module):
    """A UNet, its EMA copy and the diffusion schedule. `parameters()` are the trainable (non-EMA) weights."""

    def __init__(self, cfg: RunConfig, device: str | torch.device = "auto"):
        super().__init__()
        self.cfg = cfg
        self.device = resolve_device(str(device), "device")
        self.model = build_unet(cfg.model).to(self.device)
        self.process = build_diffusion(cfg.diffusion).to(self.device)
        tc = cfg.train
        ema = EMA(self.model, tc.ema_decay, tc.ema_warmup, tc.ema_start, tc.ema_every) if tc.ema else None
        self.__dict__["ema"] = ema  # not a submodule: its weights are not trained and not in parameters()
        self.step = 0
        self.classes: list[str] = []  # class names, and the images trained on: a checkpoint's, kept by save()
        self.images_seen = 0

    @classmethod
    def from_config(cls, cfg: RunConfig | dict | str | Path, device: str | torch.device = "auto") -> "Diffusion":
        return cls(load_config(cfg), device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> "Diffusion":
        ck = ckpt_io.load_checkpoint(path)
        obj = cls(ck.config, device)
        ckpt_io.load_into(obj.model, ck.model_state, str(ck.path))
        if obj.ema is not None:
            ckpt_io.load_into(obj.ema.model, ck.ema_state or ck.model_state, str(ck.path))
        obj.step, obj.classes, obj.images_seen = ck.step, list(ck.classes), int(ck.metadata.get("images_seen", 0))
        return obj

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss for a batch of images in [-1, 1] (labels ignored by unconditional models; dropped to the
        null class at train.label_dropout's rate, as `ddpm train` drops them)."""
        m = self.cfg.model
        if not torch.is_tensor(x):
            raise UsageError(f"loss: images are a float tensor (B, C, H, W) in [-1, 1], not {type(x).__name__}")
        if not x.is_floating_point():
            raise UsageError(f"loss: images are floats in [-1, 1], not {x.dtype} (load_data's are; uint8 pixels "
                             f"p are p / 127.5 - 1)")
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(m.image_shape()):
            raise UsageError(f"loss: images of shape {tuple(x.shape)}; the model takes (B, "
                             f"{', '.join(map(str, m.image_shape()))})")
        from ddpm_cli.engine.train import drop_labels

        self.model.train()
        y = _labels(y, x.shape[0], m, "loss").to(self.device) if (y is not None and m.conditional) else None
        if y is not None:  # train.label_dropout, as `ddpm train` drops them
            y = drop_labels(y, self.cfg.train.label_dropout, m.num_classes)
        if torch.is_grad_enabled():  # a training batch (a loss taken without gradients evaluates): counted
            self.images_seen += x.shape[0]
        return self.process.loss(self.model, x.to(self.device, torch.float32), y)  # (numpy's float64 too)

    forward = loss

    def update_ema(self) -> None:
        """Call after each optimizer step: copies weights before train.ema_start, then averages."""
        self.step += 1
        if self.ema is not None:
            self.ema.after_step(self.model, self.step)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, *, sampler: str = "ddim", steps: int | None = None,
               guidance: float = 1.0, guide: "Diffusion | None" = None, seed: int = 0,
               use_ema: bool = True) -> torch.Tensor:
        """n images in [-1, 1], (n, C, H, W). `y`: class labels for a conditional model (default: the classes in
        turn, 0, 1, ..., as `ddpm sample` draws them); an unconditional model takes none. `guidance` is
        classifier-free, or autoguidance by `guide` (a weaker Diffusion, e.g. a copy saved earlier in training:
        `Diffusion.from_checkpoint`); the API keeps no guide by itself (train.guide_step is the CLI's). Steps
        the sampler cannot take (the ddpm sampler takes all T) are a warning, as in `ddpm sample`."""
        m = self.cfg.model
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"sample: n is the number of images, a positive int, not {n!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
            raise UsageError(f"sample: steps is an int, not {steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) > 2**43:
            raise UsageError(f"sample: seed is an int within +-2^43, not {seed!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise UsageError(f"sample: guidance is a finite number, not {guidance!r}")
        if y is not None and not m.conditional:
            raise UsageError("sample: y gives class labels, and this model is unconditional; drop y")
        self._check_guide(guide, guidance)
        pick = lambda d: d.ema.model if (use_ema and d.ema is not None) else d.model  # noqa: E731
        net = pick(self)
        guide_net = pick(guide).eval() if guide is not None else None
        was_training = net.training
        net.eval()
        if m.conditional:
            labels = _labels(y, n, m, "sample") if y is not None else balanced_labels(n, m.num_classes)
        else:
            labels = None
        spec = SamplerSpec(sampler, steps, variance=self.cfg.diffusion.variance)
        # what the caller gave and the sampler ignores (the variance is the config's, not the caller's)
        for w in SamplerSpec(sampler, steps).warnings(self.cfg.diffusion.num_timesteps, option=_argument):
            warnings.warn(w, stacklevel=3)  # the caller's line: torch's no_grad wrapper is one frame between
        out = [batch for _, batch, _ in generate(
            net, self.process, n, spec, image_shape=m.image_shape(), labels=labels,
            batch_size=min(n, 256), guidance=guidance, null_class=m.num_classes, guide=guide_net, seed=seed,
            device=self.device)]
        net.train(was_training)
        return torch.cat(out).float() / 127.5 - 1.0

    def _check_guide(self, guide: "Diffusion | None", guidance: float) -> None:
        """What `ddpm sample` checks of --guidance and --guide-model (engine/guidance.py), for a guide in memory."""
        from ddpm_cli.engine.guidance import guide_mismatch

        m = self.cfg.model
        if guide is None:
            if guidance != 1.0 and not m.conditional:
                raise UsageError("sample: guidance needs a class-conditional model (classifier-free), or a weaker "
                                 "model to guide with (guide=, e.g. an earlier checkpoint)")
            return
        if not isinstance(guide, Diffusion):
            raise UsageError(f"sample: guide is a Diffusion (e.g. Diffusion.from_checkpoint of an earlier "
                             f"checkpoint), not {type(guide).__name__}")
        if guide is self:
            raise UsageError("sample: the guide is this model itself, which guides nothing; pass an earlier "
                             "checkpoint of it (Diffusion.from_checkpoint)")
        if guidance == 1.0:
            raise UsageError("sample: a guide has no effect at guidance 1; pass a weight above 1 (e.g. guidance=2)")
        differ = guide_mismatch(self.cfg, guide.cfg)
        if differ:
            raise UsageError(f"sample: the guide differs from this model in its {' and '.join(differ)}; guide with "
                             f"an earlier checkpoint of the same run, or a model trained on the same data and "
                             f"schedule")

    def save(self, path: str | Path) -> None:
        """A checkpoint `ddpm sample`, `ddpm inspect` and `Diffusion.from_checkpoint` read: the weights, their EMA,
        the config, step, images trained on and class names (a training run's extra averages and autoguidance
        guide are not held here, so not saved). A training checkpoint of a run (one with its training state
        beside it) is not replaced: its run would no longer resume."""
        from ddpm_cli.cli.outputs import is_run_file, run_holding
        from ddpm_cli.engine.runs import is_training_checkpoint

        path = Path(path)
        if is_training_checkpoint(path):
            raise UsageError(f"save: {path} is a training checkpoint of a run (its training state is beside it), "
                             f"which would no longer resume; save to another path")
        run = run_holding(path)
        if run is not None and is_run_file(run, path):  # its config, metrics, pointer, grids, snapshots
            raise UsageError(f"save: {path} is one of the run's own files, which its run reads; save to another "
                             f"path")
        meta = ckpt_io.weights_metadata(self.cfg, self.step, self.images_seen, count_params(self.model),
                                        self.ema is not None, self.classes, kind="train")
        ckpt_io.save_weights(path, self.model, self.ema.model if self.ema else None, meta)
