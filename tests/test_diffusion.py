"""The training objective of diffusion/gaussian.py: L_simple and its Min-SNR-gamma weighting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm_cli.config import DiffusionConfig
from ddpm_cli.engine.build import build_diffusion


def _fixed_model(x, t, y):
    return 0.5 * x + 0.01 * t.view(-1, 1, 1, 1).float()


def _inputs(n=6):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 100, 400, 800, 999][:n])
    return x0, noise, t


def test_uniform_weighting_is_the_papers_l_simple():
    d = build_diffusion(DiffusionConfig())
    x0, noise, t = _inputs()
    got = d.loss(_fixed_model, x0, t=t, noise=noise)
    want = F.mse_loss(_fixed_model(d.q_sample(x0, t, noise), t, None), noise)
    assert d.loss_weight is None and torch.allclose(got, want)


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_min_snr_weights_each_sample_by_min_snr_gamma_over_snr(loss):
    gamma = 5.0
    d = build_diffusion(DiffusionConfig(loss=loss, loss_weight="min-snr", min_snr_gamma=gamma))
    ab = d.alpha_bar.double()
    snr = ab / (1 - ab)
    w = d.loss_weight.double()
    noisy = snr <= gamma
    assert noisy.any() and (~noisy).any()
    assert torch.allclose(w[noisy], torch.ones_like(w[noisy]))  # the noisy steps keep their weight
    # the clean ones are scaled down (SNR recomputed from the float32 alpha_bar: 1 - alpha_bar loses digits)
    assert torch.allclose(w[~noisy], gamma / snr[~noisy], rtol=2e-3)
    assert w[0] < 0.01  # t = 1: SNR ~ 1e4

    x0, noise, t = _inputs()
    err = _fixed_model(d.q_sample(x0, t, noise), t, None) - noise
    per_sample = (err.abs() if loss == "l1" else err.square()).mean(dim=(1, 2, 3))
    got = d.loss(_fixed_model, x0, t=t, noise=noise)
    assert torch.allclose(got, (per_sample * d.loss_weight[t]).mean())
    uniform = build_diffusion(DiffusionConfig(loss=loss)).loss(_fixed_model, x0, t=t, noise=noise)
    assert got < uniform  # every weight is at most 1, the first samples' far below


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", None), ("ddim", 7), ("ddim", 5000),
                                           ("dpm++2m", None), ("dpm++2m", 50), ("dpm++2m", 100), ("dpm++3m", None),
                                           ("dpm++3m", 100), ("unipc", None), ("unipc", 5)])
def test_the_spec_s_evaluation_count_is_the_calls_its_sampler_makes(sampler, steps):
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.diffusion.samplers import sample

    d = build_diffusion(DiffusionConfig(schedule="linear", num_timesteps=1000))
    calls = []

    def model(x, t, y):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    spec = SamplerSpec(sampler, steps)
    sample(model, d, torch.randn(1, 1, 2, 2), spec=spec)
    assert spec.evaluations(d.alpha_bar) == len(calls) == len(set(calls))
    if sampler.startswith("dpm++") and steps == 100:  # logSNR spacing rounds some steps onto the same timestep
        assert len(calls) < 100



@pytest.mark.parametrize("schedule,T", [("linear", 50), ("linear", 1000), ("cosine", 50), ("zero-terminal", 50)])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "logsnr"])
def test_every_spacing_gives_descending_timesteps_from_T_minus_1_to_0(schedule, T, spacing):
    """A schedule whose alpha_bar ends at 0 (zero terminal SNR, as Lin et al. 2024 train with) has a logSNR of
    -inf there: the logsnr spacing cast NaN to int and returned one garbage timestep."""
    from ddpm_cli.diffusion.sampler_spec import timesteps

    if schedule == "zero-terminal":
        alpha_bar = torch.linspace(0.999, 0.0, T).double()
    else:
        alpha_bar = build_diffusion(DiffusionConfig(schedule=schedule, num_timesteps=T)).alpha_bar
    for steps in (2, 5, 10, T):
        ts = timesteps(alpha_bar, steps, spacing)
        assert ts[0] == T - 1 and ts[-1] == 0, (steps, ts)
        assert all(0 <= b < a for a, b in zip(ts, ts[1:])) and len(ts) <= steps, (steps, ts)


def _gaussian_problem(spread: float):
    """Data N(0.1, spread^2) per pixel: the exact epsilon-prediction is linear in x_t, and the probability-flow
    ODE's image of x_T, then the exact x_0 prediction at t = 0, is known in closed form, so a sampler's error
    against it is its own discretisation error alone."""
    d = build_diffusion(DiffusionConfig(schedule="linear", num_timesteps=1000))
    ab, mu = d.alpha_bar.double(), 0.1

    def model(x, t, y):
        a, sg = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        x0 = mu + a * spread**2 / (a**2 * spread**2 + sg**2) * (x.double() - a * mu)
        return ((x.double() - a * x0) / sg).float()

    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    (a_T, s_T), (a_0, s_0) = [(ab[i].sqrt(), (1 - ab[i]).sqrt()) for i in (-1, 0)]
    x_0 = a_0 * mu + (a_0**2 * spread**2 + s_0**2).sqrt() / (a_T**2 * spread**2 + s_T**2).sqrt() * (x_T - a_T * mu)
    exact = mu + a_0 * spread**2 / (a_0**2 * spread**2 + s_0**2) * (x_0 - a_0 * mu)
    return d, model, x_T, exact


@pytest.mark.parametrize("spread", [0.2, 0.05])
def test_each_deterministic_sampler_converges_at_its_order(spread):
    """Doubling the steps from 20 to 40 divides DDIM's error by about 2 (first order), DPM-Solver++(2M)'s by more
    (second order; at the narrow spread it meets the floor that the integer timesteps near t = 0 set) and
    DPM-Solver++(3M)'s by at least 8 (third order), which at 40 steps is well below 2M's."""
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.diffusion.samplers import sample

    d, model, x_T, exact = _gaussian_problem(spread)

    def error(sampler: str, steps: int) -> float:
        out = sample(model, d, x_T.clone(), spec=SamplerSpec(sampler, steps, spacing="logsnr"))
        return float((out.double() - exact).pow(2).mean().sqrt())

    e = {(s, n): error(s, n) for s in ("ddim", "dpm++2m", "dpm++3m") for n in (20, 40)}
    assert 1.7 < e["ddim", 20] / e["ddim", 40] < 2.3, e
    assert e["dpm++2m", 40] < 0.1 * e["ddim", 40] and e["dpm++2m", 20] / e["dpm++2m", 40] > 1.4, e
    assert e["dpm++3m", 20] / e["dpm++3m", 40] > 8, e
    assert e["dpm++3m", 40] < 0.2 * e["dpm++2m", 40], e


def test_unipc_s_corrector_raises_dpm_solver_s_order_at_no_extra_evaluation():
    """UniPC's predictor is the DPM-Solver++(2M) step; its corrector, fitted through the output the next step
    needs anyway, makes it third order: doubling 20 steps to 40 divides its error by about 8 (2M's by about 4),
    and at 40 steps it is well below 2M's, for the same number of network calls."""
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.diffusion.samplers import sample

    d, model, x_T, exact = _gaussian_problem(0.2)
    calls = []

    def counted(x, t, y):
        calls.append(1)
        return model(x, t, y)

    def error(sampler: str, steps: int) -> float:
        calls.clear()
        out = sample(counted, d, x_T.clone(), spec=SamplerSpec(sampler, steps, spacing="logsnr"))
        assert len(calls) == SamplerSpec(sampler, steps, spacing="logsnr").evaluations(d.alpha_bar)
        return float((out.double() - exact).pow(2).mean().sqrt())

    e = {(s, n): error(s, n) for s in ("dpm++2m", "unipc") for n in (1, 20, 40)}
    assert e["unipc", 20] / e["unipc", 40] > 5 > e["dpm++2m", 20] / e["dpm++2m", 40], e
    assert e["unipc", 40] < 0.5 * e["dpm++2m", 40], e
    assert e["unipc", 1] == e["dpm++2m", 1], e  # one step is the clean image of the first call (was the noise)


def test_unipc_on_a_mixture_beats_dpm_solver_at_the_same_calls():
    """On a mixture of Gaussians (the exact denoiser is a softmax over modes, so the ODE bends as real data's does)
    UniPC lands closer to the ODE's exact end than DPM-Solver++(2M) at 8 to 20 calls: the median image's error,
    which the few images that a coarse step sends to another mode do not swamp (at 5 calls the two are even).
    benchmarks/sampler_accuracy.py prints the whole table."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sampler_accuracy import mixture_problem, per_image_error

    problem = mixture_problem()
    for steps in (8, 10, 20):
        err = {s: float(per_image_error(problem, s, steps).median()) for s in ("dpm++2m", "unipc")}
        assert err["unipc"] < 0.85 * err["dpm++2m"], (steps, err)


def _v_network(d, eps_model):
    """The v-predicting network equivalent to `eps_model`: v = (eps - sigma_t x_t) / alpha_t."""
    ab = d.alpha_bar.double()

    def model(x, t, y):
        a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        return ((eps_model(x, t, y).double() - s * x.double()) / a).float()

    return model


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_v_prediction_trains_on_v_and_min_snr_keeps_the_epsilon_objective(loss):
    """The v target is alpha_t eps - sigma_t x_0; under min-snr a v-network's loss is the loss of the
    epsilon-network it stands for (the weighting is one objective in either parameterisation, l2 or l1)."""
    d_eps = build_diffusion(DiffusionConfig(loss_weight="min-snr", loss=loss))
    d_v = build_diffusion(DiffusionConfig(loss_weight="min-snr", prediction="v", loss=loss))
    x0, noise, t = _inputs()
    a = d_v.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
    s = d_v.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(d_v.target(x0, t, noise), a * noise - s * x0)
    assert torch.equal(d_eps.target(x0, t, noise), noise)
    v_net = _v_network(d_eps, _fixed_model)
    got, want = d_v.loss(v_net, x0, t=t, noise=noise), d_eps.loss(_fixed_model, x0, t=t, noise=noise)
    assert torch.allclose(got, want, rtol=1e-4), (got, want)
    # uniform weights are L_simple on each parameterisation's own error: not the same objective
    uniform_v = build_diffusion(DiffusionConfig(prediction="v", loss=loss)).loss(v_net, x0, t=t, noise=noise)
    error = F.mse_loss if loss == "l2" else F.l1_loss
    assert torch.allclose(uniform_v, error(v_net(d_v.q_sample(x0, t, noise), t, None), d_v.target(x0, t, noise)))
    uniform_eps = build_diffusion(DiffusionConfig(loss=loss)).loss(_fixed_model, x0, t=t, noise=noise)
    assert not torch.allclose(uniform_v, uniform_eps)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "dpm++3m", "unipc"])
def test_every_sampler_draws_the_same_images_from_a_v_network_as_from_its_epsilon_twin(sampler):
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.diffusion.samplers import sample

    d_eps, eps_model, x_T, _ = _gaussian_problem(0.2)
    d_v = build_diffusion(DiffusionConfig(schedule="linear", num_timesteps=1000, prediction="v"))
    spec = SamplerSpec(sampler, None if sampler == "ddpm" else 10)
    draw = lambda d, m: sample(m, d, x_T.clone(), spec=spec, generator=torch.Generator().manual_seed(1))  # noqa: E731
    want, got = draw(d_eps, eps_model), draw(d_v, _v_network(d_eps, eps_model))
    assert (want - x_T).abs().mean() > 0.1  # the sampler moved
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_options_a_sampler_will_not_use_are_said():
    """--steps beyond T and --spacing with ddpm were dropped without a word (a helper's second sweep); --steps with
    ddpm and --eta off ddim were already said."""
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec

    assert any("more than the model's T = 10" in w for w in SamplerSpec("ddim", 50).warnings(10))
    assert SamplerSpec("ddim", 10).warnings(10) == []
    assert any("--spacing is ignored" in w for w in SamplerSpec("ddpm", spacing="logsnr").warnings(10))
    assert any("--steps is ignored" in w for w in SamplerSpec("ddpm", 5).warnings(10))


def test_variance_off_the_ddpm_sampler_is_said():
    """--variance is the ancestral ddpm sampler's sigma^2; with any other sampler (the default one included) it was
    dropped without a word."""
    from ddpm_cli.diffusion.sampler_spec import SAMPLERS, SamplerSpec

    assert SamplerSpec("ddpm", variance="posterior").warnings(10) == []
    for name in SAMPLERS[1:]:
        said = SamplerSpec(name, variance="beta").warnings(10)
        assert said == [f"--variance applies to the ddpm sampler only, and this samples with {name}; ignored"]
    for default in ("ddim", "dpm++2m"):  # no --sampler: the checkpoint's default (dpm++2m with a stored guide)
        said = SamplerSpec(variance="posterior").warnings(10, default)
        assert len(said) == 1 and f"samples with {default} (the default sampler" in said[0]
        assert "pass --sampler ddpm" in said[0]
    assert SamplerSpec(variance="posterior").warnings(10, "ddpm") == []


def test_uniform_timesteps_are_drawn_as_before():
    """The default draw is torch.randint's, the same numbers from the same seed: runs and their resumes do not
    change under the default."""
    d = build_diffusion(DiffusionConfig())
    torch.manual_seed(1)
    a = d.sample_timesteps(64, "cpu")
    torch.manual_seed(1)
    assert torch.equal(a, torch.randint(0, 1000, (64,)))


@pytest.mark.parametrize("mean,std", [(-1.2, 1.2), (2.5, 0.5)])
def test_lognormal_timesteps_draw_ln_sigma_from_the_normal_asked_for(mean, std):
    """timestep_sampling lognormal: the drawn timesteps' ln sigma has the asked mean and spread (up to the
    schedule's discrete levels), and each timestep comes up as often as timestep_probs says (400,000 draws;
    5 standard errors)."""
    import numpy as np

    from ddpm_cli.diffusion.schedules import log_sigmas, make_betas, timestep_probs

    d = build_diffusion(DiffusionConfig(timestep_sampling="lognormal", lognormal_mean=mean, lognormal_std=std))
    alpha_bar = np.cumprod(1.0 - make_betas("linear", 1000))
    ls, probs = log_sigmas(alpha_bar), timestep_probs(alpha_bar, mean, std)
    torch.manual_seed(0)
    n = 400_000
    t = d.sample_timesteps(n, "cpu")
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 999
    drawn = torch.from_numpy(ls)[t]
    assert float(drawn.mean()) == pytest.approx(mean, abs=0.02)
    assert float(drawn.std()) == pytest.approx(std, abs=0.03)
    freq = torch.bincount(t, minlength=1000).double().numpy() / n
    assert np.abs(freq - probs).max() < 5 * np.sqrt(probs.max() / n)
    uniform = torch.from_numpy(ls)[torch.randint(0, 1000, (n,))]
    assert abs(float(uniform.mean()) - mean) > 0.5  # the check tells the two draws apart
