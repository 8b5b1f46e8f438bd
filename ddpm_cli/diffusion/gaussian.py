"""The Gaussian forward process q(x_t | x_0), the training loss (Ho et al. 2020), and what the network predicts.

The network predicts the noise epsilon (the DDPM paper) or the velocity v = alpha_t eps - sigma_t x_0 (Salimans &
Ho 2022, "Progressive Distillation", section 4), with alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t).
Samplers see the clean image either way: `x0` turns the network's output into it, a linear map for a given x_t,
so guidance may combine outputs before or after it (its weights sum to 1).

Timesteps are 0-based indices: index i is the paper's t = i + 1. Training draws them uniformly (the paper), or
log-normally in the noise level (`timestep_probs`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cli.diffusion.schedules import timestep_probs


class GaussianDiffusion(nn.Module):
    """Holds the schedule as float32 buffers (computed in float64) so it moves with `.to(device)`."""

    def __init__(self, betas: np.ndarray, loss: str = "l2", min_snr_gamma: float | None = None,
                 prediction: str = "eps", lognormal: tuple[float, float] | None = None):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be eps or v, not {prediction!r}")
        self.prediction = prediction
        betas = np.asarray(betas, dtype=np.float64)
        alpha_bar = np.cumprod(1.0 - betas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        self.num_timesteps = len(betas)
        self.loss_type = loss
        buf = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.register_buffer("betas", buf(betas), persistent=False)
        self.register_buffer("alpha_bar", buf(alpha_bar), persistent=False)
        self.register_buffer("alpha_bar_prev", buf(alpha_bar_prev), persistent=False)
        self.register_buffer("sqrt_alpha_bar", buf(np.sqrt(alpha_bar)), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", buf(np.sqrt(1.0 - alpha_bar)), persistent=False)
        # Min-SNR-gamma (Hang et al. 2023), SNR_t = alpha_bar_t / (1 - alpha_bar_t): w_t = min(SNR_t, gamma) / SNR_t
        # on the epsilon error. For v the same objective: the epsilon error is alpha_t times the v error, with
        # alpha_t^2 = SNR_t / (SNR_t + 1), so the weight on v's error is w_t alpha_t^2 (l2) or w_t alpha_t (l1).
        # None keeps L_simple's uniform weights (on whichever error the network predicts).
        snr = alpha_bar / (1.0 - alpha_bar)
        weight = None if min_snr_gamma is None else np.minimum(snr, min_snr_gamma) / snr
        if weight is not None and prediction == "v":
            weight = weight * (alpha_bar if loss == "l2" else np.sqrt(alpha_bar))
        self.register_buffer("loss_weight", None if weight is None else buf(weight), persistent=False)
        # posterior variance beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)   (eq. 7)
        self.register_buffer("posterior_variance", buf(betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)),
                             persistent=False)
        # Training's timestep draw: uniform (None), or by inverse CDF over timestep_probs (a graph-safe draw: no
        # host sync, so it stays inside a compiled, CUDA-graphed step).
        cdf = None if lognormal is None else np.cumsum(timestep_probs(alpha_bar, *lognormal))
        self.register_buffer("timestep_cdf", None if cdf is None else buf(cdf), persistent=False)

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """n training timesteps (int64 on `device`): uniform, or from the log-normal draw of timestep_probs."""
        if self.timestep_cdf is None:
            return torch.randint(0, self.num_timesteps, (n,), device=device)
        u = torch.rand(n, device=device)
        return torch.searchsorted(self.timestep_cdf, u, right=True).clamp_(max=self.num_timesteps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (eq. 4)."""
        a = self.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at x_t = q_sample(x0, t, noise): the noise, or v."""
        if self.prediction == "eps":
            return noise
        a = self.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
        return a * noise - s * x0

    def x0(self, out: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """The clean image that the network's output `out` at (x_t = `x`, timestep `t`) stands for, clipped to
        [-1, 1]: (x_t - sigma_t eps) / alpha_t, or alpha_t x_t - sigma_t v (direct, so that 1 / alpha_t does not
        amplify the rounding at the noisiest steps)."""
        ab = self.alpha_bar[t]  # an int index: a view on the device, no copy to it
        if self.prediction == "eps":
            return ((x - (1 - ab).sqrt() * out) / ab.sqrt()).clamp(-1, 1)
        return (ab.sqrt() * x - (1 - ab).sqrt() * out).clamp(-1, 1)

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The simplified objective L_simple (eq. 14): || target - model(x_t, t) || (target: eps, or v), t drawn
        by sample_timesteps unless given; each sample's error times loss_weight[t] when a weighting is set."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        out = model(self.q_sample(x0, t, noise), t, y).float()
        target = self.target(x0, t, noise)
        if self.loss_weight is None:
            return F.l1_loss(out, target) if self.loss_type == "l1" else F.mse_loss(out, target)
        err = (out - target).abs() if self.loss_type == "l1" else (out - target).square()
        return (err.mean(dim=tuple(range(1, err.ndim))) * self.loss_weight[t]).mean()
