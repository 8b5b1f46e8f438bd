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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self._shadow, params, 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        torch._foreach_copy_(self._shadow, [p.detach() for p in model.parameters()])
