"""The CUDA defaults (bf16, channels-last graph, torch.compile with CUDA graphs) on a tiny model. Skipped without a
GPU, so CI (CPU only) never runs them; run them on a GPU machine with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine.generate import generate
from ddpm_cli.engine.train import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(tmp_path, name: str, **extra):
    opts = dict(train__device="cuda", train__steps=150, train__seed=3, logging__run_name=name, logging__log_every=50,
                logging__checkpoint_every=10**6, logging__sample_every=10**6)
    cfg = tiny_config(tmp_path, **{**opts, **extra})
    trainer = Trainer(cfg)
    return trainer, trainer.run()


@pytest.mark.slow
def test_cuda_defaults_compile_and_learn_like_eager_fp32(tmp_path):
    from ddpm_cli.nn.unet import Upsample

    fast, res_fast = _train(tmp_path, "fast")  # auto: bf16 + channels-last graph + reduce-overhead + folded upsampling
    assert fast.bf16 and fast.compiled and fast.channels_last
    assert all(m.folded for m in fast.model.modules() if isinstance(m, Upsample))
    slow, res_slow = _train(tmp_path, "eager", train__precision="fp32", train__compile="off",
                            train__channels_last="off", train__fold_upsampling="off")
    assert res_fast.last_loss < 0.5 * res_fast.first_loss
    # Same seed, data and noise draws; the losses of the last 50 steps agree to within bf16 and noise.
    assert abs(res_fast.last_loss - res_slow.last_loss) < 0.2 * res_slow.last_loss, (res_fast.last_loss,
                                                                                      res_slow.last_loss)
    for p in fast.model.parameters():
        assert torch.isfinite(p).all()
    assert fast.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_v_prediction_under_the_cuda_defaults_learns_like_eager_fp32_and_samples(tmp_path):
    """diffusion.prediction v: the compiled bf16 step trains on v as eager fp32 does (v's loss has a higher floor
    than epsilon's: the noisiest steps' target is nearly -x_0), and the samplers turn its output into noise on
    the GPU."""
    fast, res_fast = _train(tmp_path, "v-fast", diffusion__prediction="v")
    slow, res_slow = _train(tmp_path, "v-eager", diffusion__prediction="v", train__precision="fp32",
                            train__compile="off", train__channels_last="off")
    assert fast.compiled and fast.bf16 and fast.diffusion.prediction == "v"
    assert res_fast.last_loss < 0.9 * res_fast.first_loss
    assert abs(res_fast.last_loss - res_slow.last_loss) < 0.2 * res_slow.last_loss, (res_fast.last_loss,
                                                                                      res_slow.last_loss)
    m = fast.cfg.model
    images = torch.cat([b for _, b, _ in generate(fast.ema.model, fast.diffusion, 8, SamplerSpec("dpm++2m", 10),
                                                  image_shape=(3, m.image_size, m.image_size), batch_size=8,
                                                  seed=0, device=fast.device, bf16=True)])
    assert images.dtype == torch.uint8 and images.float().std() > 5  # not a constant or saturated field


@pytest.mark.slow
def test_lognormal_timesteps_train_in_the_compiled_step_like_eager_fp32(tmp_path):
    """diffusion.timestep_sampling lognormal (with v, EDM's objective): the compiled, CUDA-graphed step draws
    its timesteps inside the graph (an inverse-CDF search, no host sync) and learns as eager fp32 does. A draw
    that went wrong in the graph (every t at one end) would move the loss far from eager's."""
    opts = dict(diffusion__prediction="v", diffusion__timestep_sampling="lognormal")
    fast, res_fast = _train(tmp_path, "ln-fast", **opts)
    slow, res_slow = _train(tmp_path, "ln-eager", train__precision="fp32", train__compile="off",
                            train__channels_last="off", **opts)
    assert fast.compiled and fast.bf16 and fast.diffusion.timestep_cdf is not None
    assert res_fast.last_loss < 0.9 * res_fast.first_loss
    assert abs(res_fast.last_loss - res_slow.last_loss) < 0.2 * res_slow.last_loss, (res_fast.last_loss,
                                                                                      res_slow.last_loss)
    t = fast.diffusion.sample_timesteps(100_000, fast.device)
    assert t.device.type == "cuda" and 0 <= int(t.min()) and int(t.max()) < fast.diffusion.num_timesteps


def test_bf16_sampling_on_cuda_is_deterministic_by_seed(tmp_path):
    trainer, _ = _train(tmp_path, "s", train__steps=20)
    m = trainer.cfg.model

    def draw(seed: int) -> torch.Tensor:
        out = [b for _, b, _ in generate(trainer.ema.model, trainer.diffusion, 6, SamplerSpec("ddim", 5),
                                         image_shape=(3, m.image_size, m.image_size), batch_size=3, seed=seed,
                                         device=trainer.device, bf16=True)]
        return torch.cat(out).cpu()

    a, b, c = draw(1), draw(1), draw(2)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, m.image_size, m.image_size)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("compile", [None, "default"])
def test_the_folded_sampling_network_matches_the_unfolded_one_on_cuda(compile):
    """The sampler's network as shipped (bf16, channels-last, folded upsampling, compiled with PDL on Hopper)
    against the same weights unfolded and eager, on a model with random (non-zero) output layers."""
    import copy

    from ddpm_cli.engine.generate import inference_net
    from ddpm_cli.nn.unet import UNet

    torch.manual_seed(0)
    model = UNet(image_size=16, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(8,), norm_groups=8).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref_net = copy.deepcopy(model).eval()  # the model as trained: unfolded, eager, NCHW, torch's GroupNorm
    net = inference_net(model, channels_last=True, compile=compile)
    x, t = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = ref_net(x, t, None).float(), net(x, t, None).float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05 * want.abs().max(), (got - want).abs().max()


def test_only_a_job_large_enough_to_compile_has_cudnn_time_its_algorithms(monkeypatch):
    from ddpm_cli.engine.generate import COMPILE_MIN_NFE, sampling_net
    from ddpm_cli.nn.unet import UNet

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = lambda: UNet(image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,  # noqa: E731
                         attention_resolutions=(), norm_groups=8).cuda()
    sampling_net(model(), torch.device("cuda"), nfe=64 * 40)  # a grid: eager
    assert torch.backends.cudnn.benchmark is False
    sampling_net(model(), torch.device("cuda"), nfe=COMPILE_MIN_NFE)  # compiled (at its first call)
    assert torch.backends.cudnn.benchmark is True


def test_a_compiled_sampler_is_compiled_once_whatever_the_last_batch(monkeypatch):
    """7 images at most 3 a batch: the short last batch is padded, so torch.compile never sees a second shape
    (a recompile would raise), and the images are those of the eager network."""
    import torch._dynamo

    from ddpm_cli.diffusion.gaussian import GaussianDiffusion
    from ddpm_cli.diffusion.schedules import make_betas
    from ddpm_cli.engine.generate import inference_net
    from ddpm_cli.nn.unet import UNet

    torch.manual_seed(0)
    model = UNet(image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 norm_groups=8).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diffusion = GaussianDiffusion(make_betas("linear", 1000)).cuda()
    draw = lambda net: torch.cat([b for _, b, _ in generate(net, diffusion, 7, SamplerSpec(steps=4),  # noqa: E731
                                                            image_shape=(3, 16, 16), batch_size=3, seed=2, device="cuda", bf16=True)])
    eager = draw(inference_net(model, channels_last=True))
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    compiled = draw(inference_net(model, channels_last=True, compile="default"))
    assert compiled.shape == (7, 3, 16, 16)
    assert (compiled.int() - eager.int()).abs().float().mean() < 2.0  # bf16: the same images up to rounding


# the three routes of _trace_sqrt_product: low rank with feature rows, Cholesky, both singular without rows (eigh)
@pytest.mark.parametrize("n1,n2,rows", [(40, 300, True), (300, 200, False), (40, 50, False)])
def test_fid_on_the_gpu_equals_the_cpu(n1, n2, rows):
    import numpy as np

    from ddpm_cli.engine.evaluation import scores as ev

    rng = np.random.default_rng(1)
    a = rng.standard_normal((n1, 64)) @ rng.standard_normal((64, 64)) * 0.3 + 0.5
    b = rng.standard_normal((n2, 64)) * 1.2 + 0.1
    sa, sb = (ev.FeatureStats(x.mean(0), np.cov(x, rowvar=False), len(x), x.astype(np.float32) if rows else None)
              for x in (a, b))
    assert ev.frechet_distance(sa, sb, "cuda") == pytest.approx(ev.frechet_distance(sa, sb), rel=1e-9)


def test_the_cooldown_reaches_the_optimizer_under_the_cuda_defaults(tmp_path):
    """train.lr_cooldown sets each step's rate in the optimizer beside the CUDA-graphed forward and backward: the
    same run with and without it is the same until the decay starts, and its last update is the smaller by the
    rate's ratio there (1/6: the last of 6 decaying steps)."""
    def weights_after(trainer, step: int):
        from ddpm_cli.engine.checkpoint import load_checkpoint

        path = trainer.run_dir / "checkpoints" / f"ckpt-{step:08d}.safetensors"
        state = load_checkpoint(path).model_state
        return torch.cat([state[k].float().flatten() for k in sorted(state)])

    runs = {}
    for name, cooldown in (("flat", 0.0), ("cool", 0.5)):
        trainer = Trainer(tiny_config(tmp_path, train__device="cuda", train__steps=12, train__seed=3,
                                      train__warmup_steps=0, train__lr_cooldown=cooldown, train__ema=False,
                                      logging__run_name=name, logging__checkpoint_every=1, logging__keep_last=20,
                                      logging__sample_every=10**6, logging__log_every=1))
        assert trainer.compiled and trainer.bf16
        res = trainer.run()
        runs[name] = (trainer, res)
    flat, cool = runs["flat"][0], runs["cool"][0]
    # the same until the decay starts, up to the run-to-run noise of compiled bf16 kernels: far below one update
    apart = (weights_after(cool, 6) - weights_after(flat, 6)).norm()
    assert apart < 0.05 * (weights_after(flat, 6) - weights_after(flat, 5)).norm(), apart
    last = {k: (weights_after(t, 12) - weights_after(t, 11)).norm().item() for k, t in (("flat", flat),
                                                                                      ("cool", cool))}
    assert last["cool"] < 0.4 * last["flat"], last  # Adam's update scales with the rate: 1/6, with margin
    assert [r["lr"] for r in runs["cool"][1].metrics][-1] == pytest.approx(flat.peak_lr / 6)


def test_posthoc_ema_follows_the_cuda_graphed_step_and_its_checkpoint_samples(tmp_path):
    """train.posthoc_ema's averages track the weights the CUDA-graphed step updates in place (channels-last), their
    snapshots load back, and `ddpm ema` makes a checkpoint that samples on the GPU."""
    from conftest import ok
    from ddpm_cli.engine.checkpoint import load_checkpoint

    trainer = Trainer(tiny_config(tmp_path, train__device="cuda", train__steps=30, train__seed=3,
                                  train__posthoc_ema=[0.05, 0.1], train__posthoc_ema_every=10,
                                  logging__run_name="phema", logging__checkpoint_every=10**6,
                                  logging__sample_every=10**6))
    assert trainer.compiled and trainer.channels_last
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    res = trainer.run()
    tracked = dict(zip([n for n, _ in trainer.model.named_parameters()], trainer.posthoc.averages[1]))
    final = dict(trainer.model.named_parameters())
    out = tmp_path / "l01.safetensors"
    ok("ema", res.run_dir, "--length", "0.1", "--out", out)
    state = load_checkpoint(out).model_state
    moved = 0
    for name, avg in tracked.items():
        assert torch.isfinite(avg).all()
        assert torch.allclose(state[name], avg.float().cpu(), atol=1e-5), name
        # an average of the 30 steps: neither the weights it started from nor the last ones
        moved += not torch.equal(avg, final[name].detach()) and not torch.equal(avg, initial[name])
    assert moved > len(tracked) // 2
    grid = tmp_path / "g.png"
    ok("sample", out, "-n", "4", "--steps", "3", "--grid", grid, "--device", "cuda")
    assert grid.exists()
