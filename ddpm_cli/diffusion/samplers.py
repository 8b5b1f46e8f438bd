"""Samplers: free functions from noise x_T to images x_0, given the network `model(x_t, t, y)`, whose output
`diffusion.x0` turns into the clean image it stands for (the network may predict epsilon or v:
diffusion/gaussian.py).

- ddpm: ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2), sigma^2 = beta_t or beta-tilde_t.
- ddim: any number of steps, eta in [0, 1] (Song et al. 2021, eq. 12).
- dpm++2m: DPM-Solver++ multistep, second order, data prediction (Lu et al. 2022, Algorithm 2).
- dpm++3m: the same, third order (Lu et al. 2022, appendix: the multistep third-order update).
- unipc: UniPC, dpm++2m's predictor with a corrector that costs no evaluation (Zhao et al. 2023).
Each network call is one "NFE"; `on_step(i, n)` reports progress. Predicted x_0 is clipped to [-1, 1]."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ddpm_cli.diffusion import sampler_spec
from ddpm_cli.diffusion.gaussian import GaussianDiffusion
from ddpm_cli.diffusion.sampler_spec import SAMPLERS, SamplerSpec

ModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def guided(model: ModelFn, scale: float, null_class: int) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + scale * (eps_c - eps_u), one batched call.

    scale 1 is the plain conditional model, 0 the unconditional one."""
    if scale == 1.0:
        return model

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        null = torch.full_like(y, null_class)
        eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()  # (bf16 under autocast)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return fn


def autoguided(model: ModelFn, guide: ModelFn, scale: float) -> ModelFn:
    """Autoguidance (Karras et al. 2024): eps_g + scale * (eps - eps_g), where the guide is a weaker version of the
    same model (less trained, or smaller). Both make the same kind of errors, the guide more of them, so pushing
    away from it moves samples toward where the model is sure. Works for unconditional models too."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        eps, eps_g = model(x, t, y).float(), guide(x, t, y).float()
        return eps_g + scale * (eps - eps_g)

    return fn


def timesteps(diffusion: GaussianDiffusion, steps: int, spacing: str = "uniform") -> list[int]:
    """Descending 0-based timestep indices at which a few-step sampler calls the network (first T-1, last 0; one
    step: T-1 alone)."""
    return sampler_spec.timesteps(diffusion.alpha_bar, steps, spacing)


@torch.no_grad()
def ddpm_sample(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor | None = None,
                variance: str = "beta", generator: torch.Generator | None = None,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Ancestral sampling through the posterior q(x_{t-1} | x_t, x_0-hat) (eqs. 6-7, Algorithm 2)."""
    T = diffusion.num_timesteps
    var = diffusion.betas if variance == "beta" else diffusion.posterior_variance
    for i, t in enumerate(range(T - 1, -1, -1)):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = diffusion.x0(model(x, tt, y).float(), x, t)
        ab, ab_prev, beta = diffusion.alpha_bar[t], diffusion.alpha_bar_prev[t], diffusion.betas[t]
        mean = (beta * ab_prev.sqrt() / (1 - ab)) * x0 + ((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)) * x
        if t > 0:
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = mean + var[t].sqrt() * noise
        else:
            x = mean
        if on_step:
            on_step(i + 1, T)
    return x


@torch.no_grad()
def ddim_sample(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor | None = None,
                steps: int = 100, eta: float = 0.0, spacing: str = "uniform",
                generator: torch.Generator | None = None,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DDIM: x_{s} = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z, with the last step to ab = 1."""
    ts = timesteps(diffusion, steps, spacing)
    one = torch.ones((), device=x.device)
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = diffusion.x0(model(x, tt, y).float(), x, t)
        ab = diffusion.alpha_bar[t]
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clipped x0
        ab_next = diffusion.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else one
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).clamp(min=0).sqrt()
        x = ab_next.sqrt() * x0 + (1 - ab_next - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        if on_step:
            on_step(i + 1, len(ts))
    return x


@torch.no_grad()
def dpmpp_2m_sample(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor | None = None,
                    steps: int = 20, spacing: str = "logsnr",
                    on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i, with
    D_i = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}, r = h_{i-1} / h_i; first and last steps first order.
    The last step goes to the clean image (sigma = 0), so it returns the final x_0 estimate."""
    ts = timesteps(diffusion, steps, spacing)
    ab = diffusion.alpha_bar.double()
    alpha = lambda t: ab[t].sqrt()  # noqa: E731
    sigma = lambda t: (1 - ab[t]).sqrt()  # noqa: E731
    lam = lambda t: torch.log(alpha(t) / sigma(t))  # noqa: E731
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = diffusion.x0(model(x, tt, y).float(), x, t)
        if i + 1 == len(ts):
            x = x0
        else:
            s = ts[i + 1]
            h = lam(s) - lam(t)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma(s) / sigma(t)).float() * x - (alpha(s) * torch.expm1(-h)).float() * d
            x0_prev, h_prev = x0, h
        if on_step:
            on_step(i + 1, len(ts))
    return x


@torch.no_grad()
def dpmpp_3m_sample(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor | None = None,
                    steps: int = 20, spacing: str = "logsnr",
                    on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(3M): the data prediction's first and second divided differences in logSNR over the last three
    steps, integrated exactly against the exponential (phi_1 = e^{-h} - 1, phi_2 = phi_1 / h + 1,
    phi_3 = phi_2 / h - 1/2):
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i phi_1 x0_{i-1} + alpha_i phi_2 D1 - alpha_i phi_3 D2.
    The first two steps are first and second order (no history yet); the last goes to the clean image, as in
    dpm++2m. Third order pays once the steps are small against how fast the data prediction changes: on a narrow
    Gaussian it trails 2M at 20 steps and leads it at 40 (tests/test_diffusion.py); the paper advises 2M for
    guided sampling. D2 here is the second divided difference itself (the quadratic through the last three
    predictions, integrated exactly); diffusers' and k-diffusion's DPM++ 3M weight that term half as much, which
    lowers their order, so the two do not agree step for step."""
    ts = timesteps(diffusion, steps, spacing)
    ab = diffusion.alpha_bar.double()
    alpha = lambda t: ab[t].sqrt()  # noqa: E731
    sigma = lambda t: (1 - ab[t]).sqrt()  # noqa: E731
    lam = lambda t: torch.log(alpha(t) / sigma(t))  # noqa: E731
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x0, lambda) of the latest steps, newest last
    moves = len(ts) - 1
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = diffusion.x0(model(x, tt, y).float(), x, t)
        history = (history + [(x0, lam(t))])[-3:]
        if i == moves:
            x = x0
        else:
            s = ts[i + 1]
            h = lam(s) - lam(t)
            order = min(3, len(history))
            phi1 = torch.expm1(-h)
            x = (sigma(s) / sigma(t)).float() * x - (alpha(s) * phi1).float() * x0
            if order >= 2:
                phi2 = phi1 / h + 1
                (x0_1, l1), (x0_0, l0) = history[-2], history[-1]
                d1_0 = (x0_0 - x0_1) / float(l0 - l1)  # first divided difference, per unit of logSNR
                if order == 2:
                    x = x + (alpha(s) * phi2 * h).float() * d1_0
                else:
                    phi3 = phi2 / h - 0.5
                    x0_2, l2 = history[-3]
                    d1_1 = (x0_1 - x0_2) / float(l1 - l2)
                    d2 = (d1_0 - d1_1) / float(l0 - l2)  # second divided difference
                    # the data prediction's slope and curvature at the current point, in units of h
                    slope = d1_0 + float(l0 - l1) * d2
                    x = x + (alpha(s) * phi2 * h).float() * slope - (alpha(s) * phi3 * h * h * 2).float() * d2
        if on_step:
            on_step(i + 1, len(ts))
    return x


@torch.no_grad()
def unipc_sample(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor | None = None,
                 steps: int = 10, spacing: str = "logsnr",
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """UniPC-2 (Zhao et al. 2023), data prediction with B(h) = e^{-h} - 1 ("bh2"): the DPM-Solver++(2M) step as
    predictor, then a corrector that refits the step through the network's output at the point just reached, which
    the next step needs anyway, raising the order by one at no extra evaluation. The corrector's coefficients rho
    solve sum_k rho_k r_k^(j-1) = j! phi_{j+1}(h) / B(h) for j = 1..p, r_k being the earlier output's logSNR offset
    in units of h and r = 1 the new point's (the paper's rho = 1/2 on the first step, with no earlier output). The
    last step, to t = 0, is predicted only: its output is the image, as in dpm++2m. The coefficients are worked
    out on the CPU, in float64, so the device never waits for them."""
    ts = timesteps(diffusion, steps, spacing)
    # clipped as the logSNR spacing clips it: a schedule's alpha_bar may reach 0 or round to 1 in float32
    ab = diffusion.alpha_bar.detach().double().cpu().clamp(1e-12, 1 - 1e-12)
    alpha = lambda t: math.sqrt(ab[t])  # noqa: E731
    sigma = lambda t: math.sqrt(1 - ab[t])  # noqa: E731
    lam = lambda t: math.log(alpha(t) / sigma(t))  # noqa: E731

    def x0_at(x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return diffusion.x0(model(x, tt, y).float(), x, t)

    history = [(x0_at(x, ts[0]), lam(ts[0]))]  # (x0, lambda) of the points passed, newest last
    if on_step:
        on_step(1, len(ts))
    if len(ts) == 1:  # one step: straight to the clean image, as dpm++2m's
        return history[0][0]
    for i in range(1, len(ts)):
        s, t = ts[i - 1], ts[i]
        h = lam(t) - lam(s)
        p = len(history)  # 1 on the first step, then 2
        m0, l0 = history[-1]
        rks = [(history[0][1] - l0) / h] if p == 2 else []  # negative: the earlier point
        d1s = [(history[0][0] - m0) / rks[0]] if p == 2 else []
        # b_j = j! phi_{j+1}(-h) / B(h), j = 1..p, through phi_{j+1} = (phi_j - 1/j!) / (-h)
        b_h = math.expm1(-h)
        phi, factorial, b = b_h / -h - 1, 1.0, []
        for j in range(1, p + 1):
            b.append(phi * factorial / b_h)
            factorial *= j + 1
            phi = phi / -h - 1 / factorial
        rows = torch.tensor([[r ** (j - 1) for r in rks + [1.0]] for j in range(1, p + 1)], dtype=torch.float64)
        base = (sigma(t) / sigma(s)) * x - (alpha(t) * b_h) * m0
        scale = alpha(t) * b_h
        x_pred = base - scale * 0.5 * d1s[0] if p == 2 else base  # the DPM-Solver++(2M) step
        m_t = x0_at(x_pred, t)
        if i + 1 == len(ts):
            x = m_t
        else:
            rho_c = [0.5] if p == 1 else torch.linalg.solve(rows, torch.tensor(b, dtype=torch.float64)).tolist()
            x = base - scale * (sum(r * d for r, d in zip(rho_c[:-1], d1s)) + rho_c[-1] * (m_t - m0))
        history = (history + [(m_t, lam(t))])[-2:]
        if on_step:
            on_step(i + 1, len(ts))
    return x


def sample(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor | None = None,
           spec: SamplerSpec = SamplerSpec(), *, generator: torch.Generator | None = None,
           on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the sampler `spec` names from x_T; its None fields mean the defaults (ddim; all T steps for ddpm)."""
    s = spec.resolved()
    if s.sampler == "ddpm":
        return ddpm_sample(model, diffusion, x, y, variance=s.variance, generator=generator, on_step=on_step)
    if s.sampler == "ddim":
        return ddim_sample(model, diffusion, x, y, steps=s.steps, eta=s.eta, spacing=s.spacing, generator=generator,
                           on_step=on_step)
    if s.sampler == "dpm++2m":
        return dpmpp_2m_sample(model, diffusion, x, y, steps=s.steps, spacing=s.spacing, on_step=on_step)
    if s.sampler == "dpm++3m":
        return dpmpp_3m_sample(model, diffusion, x, y, steps=s.steps, spacing=s.spacing, on_step=on_step)
    if s.sampler == "unipc":
        return unipc_sample(model, diffusion, x, y, steps=s.steps, spacing=s.spacing, on_step=on_step)
    raise ValueError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
