"""Gradient accumulation (train.grad_accum): one optimizer step's gradients from several micro-batches, so a batch
too large for the device's memory trains as one."""
from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[..., torch.Tensor]  # (x, y, t, noise) -> the micro-batch's mean loss


class GradAccumulator:
    """Runs a step's batch as `k` micro-batches and leaves the sum of their gradients in each parameter's .grad.

    Each micro-batch's loss (a mean over its images) is scaled by 1/k, so the sum is the gradient of the whole
    batch's mean loss. The timesteps and noise are drawn for the whole batch before it is split, in the order
    the loss draws them for one batch, so in eager mode a step sees the same ones whatever k is (a compiled
    loss of one whole batch draws its own, in its graph).

    The sums live in buffers of this class rather than in .grad: a CUDA-graphed backward (compile
    reduce-overhead) hands out gradients in the graph's memory, which its next replay overwrites, so
    autograd's own accumulation into .grad across replays would add into a buffer that is then overwritten."""

    def __init__(self, params: list[torch.Tensor], k: int,
                 draw_timesteps: Callable[[int, torch.device], torch.Tensor]):
        self.params, self.k, self.draw_timesteps = params, k, draw_timesteps
        self.sums: list[torch.Tensor] | None = None

    def __call__(self, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward of every micro-batch of (x, y); returns the batch's mean loss, detached."""
        if self.sums is None:  # in each parameter's layout (channels-last too), as the fused optimizer needs
            self.sums = [torch.zeros_like(p) for p in self.params]
        t = self.draw_timesteps(x.shape[0], x.device)
        noise = torch.randn_like(x)
        ys = y.chunk(self.k) if y is not None else [None] * self.k
        total = torch.zeros((), device=x.device)
        torch._foreach_zero_(self.sums)
        for xs, ys_i, ts, ns in zip(x.chunk(self.k), ys, t.chunk(self.k), noise.chunk(self.k)):
            loss = loss_fn(xs, ys_i, ts, ns)
            (loss / self.k).backward()
            total = total + loss.detach().float()  # a copy now, before the next replay reuses loss's memory
            have = [(s, p.grad) for s, p in zip(self.sums, self.params) if p.grad is not None]
            if have:
                torch._foreach_add_([s for s, _ in have], [g for _, g in have])
            for p in self.params:
                p.grad = None
        for p, s in zip(self.params, self.sums):
            p.grad = s
        return total / self.k
