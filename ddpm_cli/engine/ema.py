"""Exponential moving average of the weights: its update rule and its schedule (train.ema_start, ema_every,
ema_warmup), updated with fused foreach ops (no per-tensor Python loop)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Holds `model`'s averaged copy. update() does shadow <- shadow + (1 - decay) (param - shadow); after_step()
    applies the schedule: a plain copy of the weights up to step `start`, then an update every `every` steps."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, start: int = 0, every: int = 1):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.start, self.every = decay, warmup, start, every
        self.num_updates = 0
        self._shadow = [p for p in self.model.parameters()]
        self._source: nn.Module | None = None  # the model _listed holds the parameters of
        self._listed: list[nn.Parameter] = []

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def after_step(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number `step` (counting from 1)."""
        if step <= self.start:
            self.copy_from(model)
        elif step % self.every == 0:
            self.update(model)

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        """`model`'s parameters, listed once per model: listing walks every module, the larger part of an update's
        time on the host, which a CUDA-graphed step leaves little of. The Parameter objects themselves, read
        under no_grad: they stay the same objects when .to() moves or re-lays out their data (a detached view
        would keep the old storage)."""
        if model is not self._source:
            self._source, self._listed = model, list(model.parameters())
        return self._listed

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self._shadow, self._params(model), 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        torch._foreach_copy_(self._shadow, self._params(model))
