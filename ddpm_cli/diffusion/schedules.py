"""Noise schedules beta_1..beta_T, computed in float64 numpy (no torch, so config validation stays light)."""
import math

import numpy as np

SCHEDULES = ("linear", "cosine", "dns")


def make_betas(kind: str, num_timesteps: int, low: float = 1e-4, high: float = 0.02,
               dns_offset: float = 5.0, cosine_s: float = 0.008) -> np.ndarray:
    """Return the (T,) float64 betas of a schedule.

    linear: DDPM (Ho et al. 2020), low..high scaled by 1000/T so that any T has the same total noise.
    cosine: Nichol & Dhariwal 2021 eq. 17, alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at 0.999.
    dns:    the seed project's quadratic schedule beta_i = low + (high - low) * ((i + offset) / (T + 1 + offset))^2,
            i = 0..T-1, with low/high scaled by 1000/T like linear. offset = T gives the seed's "DNST" variant.
    """
    T = num_timesteps
    if T < 1:
        raise ValueError("num_timesteps must be at least 1")
    if kind == "linear":
        scale = 1000.0 / T
        return np.linspace(low * scale, high * scale, T, dtype=np.float64)
    if kind == "cosine":
        steps = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    if kind == "dns":
        scale = 1000.0 / T
        lo, hi = low * scale, high * scale
        i = np.arange(T, dtype=np.float64)
        return lo + (hi - lo) * ((i + dns_offset) / (T + 1 + dns_offset)) ** 2
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def check_betas(betas: np.ndarray) -> str | None:
    """Return a sentence describing why the betas are unusable, or None when every beta is in (0, 1)."""
    if not np.all(np.isfinite(betas)):
        return "the schedule produces non-finite betas"
    bad = np.flatnonzero((betas <= 0) | (betas >= 1))
    if bad.size:
        i = int(bad[0])
        return (f"beta_{i + 1} = {betas[i]:.4g} is outside (0, 1); with linear/dns schedules low/high are scaled by "
                f"1000/T, so use more timesteps or smaller schedule_low/schedule_high")
    return None
