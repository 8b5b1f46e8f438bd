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


def log_sigmas(alpha_bar: np.ndarray) -> np.ndarray:
    """ln sigma_t of each timestep, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the noise level in the
    variance-exploding scale of EDM (Karras et al. 2022), x_t / alpha_t = x_0 + sigma_t eps; increasing in t."""
    alpha_bar = np.asarray(alpha_bar, dtype=np.float64)
    return 0.5 * (np.log1p(-alpha_bar) - np.log(alpha_bar))


def timestep_probs(alpha_bar: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The probability of each timestep when ln sigma is drawn from N(mean, std^2) (EDM's training noise levels,
    P_mean and P_std) and taken to the timestep whose ln sigma is nearest: each timestep gets the normal's mass
    between the midpoints to its neighbours, the first and last also the tails beyond the schedule's range."""
    ls = log_sigmas(alpha_bar)
    edges = np.concatenate([[-np.inf], (ls[1:] + ls[:-1]) / 2, [np.inf]])
    cdf = np.array([0.5 * math.erfc(-(e - mean) / (std * math.sqrt(2))) for e in edges])
    probs = np.diff(cdf)
    return probs / probs.sum()
