"""The Gaussian forward process q(x_t | x_0) and the epsilon-prediction training loss (Ho et al. 2020).

Timesteps are 0-based indices: index i is the paper's t = i + 1."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class GaussianDiffusion(nn.Module):
    """Holds the schedule as float32 buffers (computed in float64) so it moves with `.to(device)`."""

    def __init__(self, betas: np.ndarray, loss: str = "l2", min_snr_gamma: float | None = None):
        super().__init__()
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
        # Min-SNR-gamma (Hang et al. 2023) for epsilon prediction: w_t = min(SNR_t, gamma) / SNR_t, SNR_t =
        # alpha_bar_t / (1 - alpha_bar_t); None keeps L_simple's uniform weights.
        snr = alpha_bar / (1.0 - alpha_bar)
        self.register_buffer("loss_weight", None if min_snr_gamma is None else
                             buf(np.minimum(snr, min_snr_gamma) / snr), persistent=False)
        # posterior variance beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)   (eq. 7)
        self.register_buffer("posterior_variance", buf(betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)),
                             persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (eq. 4)."""
        a = self.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
        return a * x0 + s * noise

    def loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The simplified objective L_simple (eq. 14): || eps - eps_theta(x_t, t) ||, t uniform; each sample's
        error times loss_weight[t] when a weighting is set."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        eps = model(self.q_sample(x0, t, noise), t, y).float()
        if self.loss_weight is None:
            return F.l1_loss(eps, noise) if self.loss_type == "l1" else F.mse_loss(eps, noise)
        err = (eps - noise).abs() if self.loss_type == "l1" else (eps - noise).square()
        return (err.mean(dim=tuple(range(1, err.ndim))) * self.loss_weight[t]).mean()
