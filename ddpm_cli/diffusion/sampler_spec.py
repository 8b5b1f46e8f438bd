"""The sampler vocabulary, without torch: the samplers' names, defaults and timestep spacings, and SamplerSpec, the
one bundle of sampler options that goes from the command line to the sampler, checked once when it is made.
The CLI's choices are built from these tuples; diffusion.samplers runs them."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ddpm_cli.errors import UsageError

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "unipc")
SPACINGS = ("uniform", "quadratic", "logsnr")
VARIANCES = ("beta", "posterior")  # the ddpm sampler's sigma^2: beta_t, or the posterior's beta-tilde_t
# Steps and spacing of the few-step samplers when not given (ddpm always takes all T steps).
DEFAULTS = {"ddim": (100, "uniform"), "dpm++2m": (20, "logsnr"), "dpm++3m": (20, "logsnr"), "unipc": (20, "logsnr")}


@dataclass(frozen=True)
class SamplerSpec:
    """How to sample. None means "the default": the checkpoint's guidance policy picks the sampler, the sampler
    its steps and spacing (DEFAULTS), the checkpoint its variance. Invalid values raise UsageError (exit 2)."""

    sampler: str | None = None  # ddpm, ddim, dpm++2m, dpm++3m or unipc
    steps: int | None = None  # network steps of ddim and the dpm++ samplers (ddpm: always T)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 like DDPM
    spacing: str | None = None  # timestep spacing of ddim and the dpm++ samplers
    variance: str | None = None  # ddpm's sigma^2

    def __post_init__(self) -> None:
        for name, value, choices in (("--sampler", self.sampler, SAMPLERS), ("--spacing", self.spacing, SPACINGS),
                                     ("--variance", self.variance, VARIANCES)):
            if value is not None and value not in choices:
                raise UsageError(f"unknown {name[2:]} {value!r}; choose one of {', '.join(choices)}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if not (math.isfinite(self.eta) and 0.0 <= self.eta <= 1.0):
            raise UsageError(f"--eta must be between 0 and 1 (got {self.eta})")

    def resolved(self, sampler: str = "ddim", variance: str = "beta") -> "SamplerSpec":
        """Every None filled: `sampler` and `variance` where not given, then the sampler's steps and spacing."""
        name = self.sampler or sampler
        steps, spacing = DEFAULTS.get(name, (None, None))
        return replace(self, sampler=name, steps=self.steps or steps, spacing=self.spacing or spacing,
                       variance=self.variance or variance)

    def warnings(self, num_timesteps: int, default_sampler: str = "ddim",
                 option: Callable[[str, Any], str] = lambda name, value: f"--{name} {value}".rstrip()) -> list[str]:
        """Options that will be ignored, in words (`default_sampler`: the one used when none is given), each named
        by `option(name, value)` as the caller gives it (`--steps 50` on the command line; `value` "": the name alone)."""
        out, name = [], self.sampler or default_sampler
        if name == "ddpm" and self.steps is not None and self.steps != num_timesteps:
            out.append(f"the ddpm sampler always takes all T = {num_timesteps} steps; {option('steps', '')} is ignored "
                       f"(use {option('sampler', 'ddim')} or {option('sampler', 'dpm++2m')} for fewer)")
        if name != "ddpm" and self.steps is not None and self.steps > num_timesteps:
            out.append(f"{option('steps', self.steps)} is more than the model's T = {num_timesteps} "
                       f"timesteps; {name} takes {num_timesteps}")
        if name == "ddpm" and self.spacing is not None:
            out.append(f"the ddpm sampler always takes all T steps; {option('spacing', '')} is ignored")
        if name != "ddim" and self.eta != 0.0:
            why = (f" (the default sampler of a checkpoint with a stored guide; pass {option('sampler', 'ddim')})"
                   if self.sampler is None else "")
            out.append(f"{option('eta', '')} applies to ddim only, and this samples with {name}{why}; ignored")
        if name != "ddpm" and self.variance is not None:  # the other samplers take no sigma^2
            why = f" (the default sampler; pass {option('sampler', 'ddpm')})" if self.sampler is None else ""
            out.append(f"{option('variance', '')} applies to the ddpm sampler only, and this samples with "
                       f"{name}{why}; ignored")
        return out

    def evaluations(self, alpha_bar: Any, guided: bool = False) -> int:
        """Network evaluations per image: all T for ddpm, else one per distinct timestep (steps above T, or
        rounding onto the same timestep, give fewer than asked: logSNR spacing of 100 steps is 94 at T = 1000);
        twice that when guided (two networks, or a doubled batch, a step). `alpha_bar`: the schedule's (T,)."""
        s = self.resolved()
        per_image = len(alpha_bar) if s.sampler == "ddpm" else len(timesteps(alpha_bar, s.steps, s.spacing))
        return per_image * (2 if guided else 1)


def timesteps(alpha_bar: Any, steps: int, spacing: str = "uniform") -> list[int]:
    """Descending 0-based timestep indices at which a few-step sampler calls the network (first T-1, last 0).
    `alpha_bar`: the schedule's cumulative products (T,), a sequence, array or CPU tensor."""
    import numpy as np

    if hasattr(alpha_bar, "detach"):  # a torch tensor, on any device
        alpha_bar = alpha_bar.detach().double().cpu().numpy()
    T = len(alpha_bar)
    steps = max(1, min(steps, T))
    if spacing == "uniform":
        ts = np.linspace(T - 1, 0, steps)
    elif spacing == "quadratic":
        ts = (T - 1) * np.linspace(1, 0, steps) ** 2
    elif spacing == "logsnr":
        # clipped: a zero-terminal-SNR schedule's alpha_bar ends at 0, whose logSNR is -inf
        ab = np.clip(np.asarray(alpha_bar, dtype=np.float64), 1e-12, 1 - 1e-12)
        lam = 0.5 * np.log(ab / (1 - ab))  # increasing as t decreases
        targets = np.linspace(lam[-1], lam[0], steps)
        ts = np.interp(targets, lam[::-1], np.arange(T)[::-1].astype(np.float64))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    out: list[int] = []
    for t in np.round(ts).astype(int).tolist():
        if not out or t < out[-1]:
            out.append(int(t))
    return out
