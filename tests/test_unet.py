"""The UNet: shapes, the paper's parameter count, conditioning, and every architecture switch doing something."""
from __future__ import annotations

import pytest
import torch

from ddpm_cli.config import RunConfig, validate_config
from ddpm_cli.engine.build import build_unet, count_params
from ddpm_cli.nn.unet import UNet


def test_default_cifar10_model_has_the_papers_parameter_count():
    n = count_params(build_unet(RunConfig().model))
    assert abs(n - 35_746_307) / 35_746_307 < 0.01


def test_output_shape_matches_input():
    m = UNet(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             norm_groups=4, in_channels=1)
    x = torch.randn(3, 1, 16, 16)
    assert m(x, torch.tensor([0, 5, 99])).shape == (3, 1, 16, 16)


def test_class_embedding_has_a_null_slot_and_changes_output():
    torch.manual_seed(0)
    m = UNet(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4,
             attention_resolutions=(), num_classes=10).eval()
    assert m.class_emb.num_embeddings == 11
    # Zero-initialised output layers make every output 0 at init; perturb them to see conditioning.
    for p in m.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    a, b = m(x, t, torch.tensor([1, 1])), m(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    assert torch.allclose(m(x, t, None), m(x, t, torch.tensor([10, 10])))  # None means the null class


@pytest.mark.parametrize("override", [
    {"num_res_blocks": 2}, {"channel_mults": [1, 2, 2]}, {"base_channels": 32}, {"time_emb_dim": 128},
    {"attention_resolutions": [16, 8]},
])
def test_architecture_fields_change_the_model(override):
    base = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [8], "norm_groups": 4}
    n0 = count_params(build_unet(validate_config({"model": base}).model))
    n1 = count_params(build_unet(validate_config({"model": {**base, **override}}).model))
    assert n1 > n0


@pytest.mark.parametrize("field,value", [("activation", "mish"), ("norm", "layer"), ("dropout", 0.5),
                                         ("num_heads", 4), ("head_channels", 8), ("norm_eps", 1e-2),
                                         ("downsample_padding", "bottom-right"), ("time_embedding_order", "cos-sin"),
                                         ("time_freq_shift", 0.0)])
def test_behaviour_fields_change_the_output(field, value):
    base = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [8], "norm_groups": 4, "dropout": 0.0}
    outs = []
    for cfg in (base, {**base, field: value}):
        torch.manual_seed(0)
        m = build_unet(validate_config({"model": cfg}).model).train()
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)
        torch.manual_seed(1)
        outs.append(m(torch.randn(2, 3, 16, 16), torch.tensor([3, 50])))
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_from_channel_statistics_matches_torchs(channels_last):
    """GroupNorm.channel_stats (per-channel statistics, then per group) is the same function as nn.GroupNorm,
    in its output and in every parameter's gradient, for either memory layout."""
    from ddpm_cli.nn.unet import channel_stats

    torch.manual_seed(0)
    model = UNet(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 norm_groups=4, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers and unit norms would hide mistakes
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 16, 16) * 3 + 1, torch.tensor([3, 500, 999])
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def run():
        model.zero_grad()
        out = model(x, t)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = run()
    channel_stats(model)
    out, grads = run()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5 * r.abs().max().item() + 1e-8, rtol=1e-3)
    channel_stats(model, False)
    assert torch.equal(run()[0], ref)  # and back


def test_group_norm_from_channel_statistics_keeps_bf16_under_autocast():
    from ddpm_cli.nn.unet import GroupNorm

    norm = GroupNorm(4, 16)
    norm.channel_stats = True
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16  # autocast's own GroupNorm would return fp32 (and move twice the bytes)
    ref = torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    assert (y.float() - ref).abs().max() < 0.05


def _attention_by_convolutions(a, x):
    """The attention block as 1x1 convolutions on NCHW tensors (its form before the token-layout rewrite)."""
    import torch.nn.functional as F

    B, C, H, W = x.shape
    qkv = a.qkv(a.norm(x)).reshape(B, 3, a.num_heads, C // a.num_heads, H * W)
    q, k, v = qkv.transpose(-1, -2).unbind(1)
    h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
    return x + a.proj(h)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_computes_what_its_convolutions_would(channels_last):
    from ddpm_cli.nn.unet import Attention, GroupNorm

    torch.manual_seed(0)
    a = Attention(16, 2, lambda c: GroupNorm(4, c)).double()
    torch.nn.init.normal_(a.proj.weight, std=0.2)  # zero-initialised: the block would be the identity
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    if channels_last:
        a, x = a.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = a(x)
    ref = _attention_by_convolutions(a, x)
    assert torch.allclose(y, ref, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *a.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *a.parameters()], g)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_concatenated_tensor_gets_a_dense_gradient(channels_last):
    from ddpm_cli.nn.unet import dense_grad

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    h = torch.randn(2, 8, 4, 4).contiguous(memory_format=fmt).requires_grad_()
    skip = torch.randn(2, 4, 4, 4).contiguous(memory_format=fmt)
    seen = {}
    conv = torch.nn.Conv2d(12, 8, 1).to(memory_format=fmt)

    def keep(name):
        return lambda g: seen.__setitem__(name, g)

    plain = h * 1.0
    plain.register_hook(keep("plain"))
    conv(torch.cat([plain, skip], 1)).sum().backward()
    before = h * 1.0
    before.register_hook(keep("dense"))  # the gradient that dense_grad hands on to the layers before it
    one = torch.ones(())
    dense = dense_grad(before, one)
    assert torch.equal(dense, h)  # the identity forward
    conv(torch.cat([dense, skip], 1)).sum().backward()
    # without it: a channel slice of the concatenation's gradient (12 channels apart); with it: dense memory
    assert not seen["plain"].is_contiguous(memory_format=fmt)
    assert seen["dense"].is_contiguous(memory_format=fmt) and torch.equal(seen["dense"], seen["plain"])
    with torch.no_grad():
        assert dense_grad(h, one) is h  # inference and export never see the product


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampling_matches_interpolate_and_keeps_the_layout(channels_last):
    from ddpm_cli.nn.unet import upsample_nearest2x

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y = upsample_nearest2x(x)
    ref = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    assert y.shape == (2, 6, 6, 10) and torch.equal(y, ref)
    assert y.is_contiguous(memory_format=fmt)  # a layout change here would cost a copy before the convolution
    g = torch.randn_like(y)
    (got,), (want,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (1, 1)])
def test_folded_upsampling_is_the_same_function_and_gradient(size):
    """Upsample.folded (one stride-2 transposed convolution of the folded kernel) equals nearest 2x upsampling
    then the 3x3 convolution, at the edges too, for the output and for both gradients."""
    from ddpm_cli.nn.unet import Upsample, fold_upsampling

    torch.manual_seed(0)
    up = Upsample(6).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64, requires_grad=True)
    outs = {}
    for folded in (False, True):
        fold_upsampling(up, folded)
        y = up(x)
        g = torch.autograd.grad(y, [x, up.conv.weight, up.conv.bias], torch.ones_like(y) + y.detach())
        outs[folded] = (y, *g)
    assert outs[True][0].shape == (2, 6, 2 * size[0], 2 * size[1])
    for a, b in zip(outs[False], outs[True]):
        assert torch.allclose(a, b, atol=1e-12)
    assert Upsample.folded is False  # the switch was per module, the class default untouched


def test_fold_upsampling_switches_every_upsample_and_keeps_the_parameters():
    from ddpm_cli.nn.unet import UNet, Upsample, fold_upsampling

    model = UNet(image_size=8, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(),
                 norm_groups=4).eval()  # eval: no dropout
    keys = set(model.state_dict())
    ups = [m for m in model.modules() if isinstance(m, Upsample)]
    assert len(ups) == 2 and not any(m.folded for m in ups)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers would hide any difference
            p.add_(0.05 * torch.randn_like(p))
        ref = model(x, t)
        fold_upsampling(model)
        assert all(m.folded for m in ups) and set(model.state_dict()) == keys
        assert torch.allclose(model(x, t), ref, atol=1e-5)
        fold_upsampling(model, frozen=True)  # the kernels built once, as unsaved buffers (for exports)
        assert all(m.frozen_kernel is not None for m in ups) and set(model.state_dict()) == keys
        assert torch.allclose(model(x, t), ref, atol=1e-5)
        fold_upsampling(model, False)
        assert not any(m.folded or m.frozen_kernel is not None for m in ups)


@pytest.mark.parametrize("offset", [0.0, 1e3, -2e3])
def test_group_norm_from_channel_statistics_does_not_cancel_under_a_large_mean(offset):
    """Plain sums of x and x^2 in fp32 (~7 digits) lose the variance when the mean is large against the spread; the
    per-channel statistics must not. Output and input gradient against float64, on the input as fp32 holds it."""
    from ddpm_cli.nn.unet import GroupNorm

    torch.manual_seed(0)
    x = (torch.randn(2, 8, 6, 6, dtype=torch.float64) * 0.5 + offset + torch.arange(8.0).view(1, 8, 1, 1))
    x = x.float().double()  # what is left to lose is the statistics' own rounding
    ref_norm = torch.nn.GroupNorm(2, 8).double()
    with torch.no_grad():
        ref_norm.weight.uniform_(0.5, 1.5)
        ref_norm.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_()
    ref = ref_norm(xr)
    w = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).view_as(ref)
    (ref * w).sum().backward()
    norm = GroupNorm(2, 8)
    norm.load_state_dict({k: v.float() for k, v in ref_norm.state_dict().items()})
    norm.channel_stats = True
    xf = x.float().requires_grad_()
    out = norm(xf)
    (out * w.float()).sum().backward()
    assert (out.double() - ref).abs().max() < 2e-3, (out.double() - ref).abs().max()
    assert (xf.grad.double() - xr.grad).abs().max() < 2e-2 * xr.grad.abs().max()


def test_stacked_embeddings_are_the_blocks_own_projections(monkeypatch):
    """stacked_embeddings (every block's embedding projection as one GEMM over their stacked weights, as the UNet
    computes them) gives the same output and the same gradient for every parameter as one projection a block,
    with the same parameter names; a deep copy (how EMA copies the model) projects with its own weights."""
    import copy

    from ddpm_cli.nn import unet

    torch.manual_seed(0)
    model = UNet(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 norm_groups=4, num_classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers would hide any difference
            p.add_(0.05 * torch.randn_like(p))
    assert len(model.res_blocks) == 2 * 1 + 2 + 2 * 2  # down (2 levels x 1), mid, up (one more a level)
    assert not any(".res_blocks." in k for k in model.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    results = {}
    for stacked in (True, False):
        if not stacked:  # one projection a block, in place of the UNet's stacked GEMM
            monkeypatch.setattr(unet, "stacked_embeddings", lambda blocks, emb: [b.emb(emb) for b in blocks])
        model.zero_grad()
        out = model(x, t, y)
        (out * out.detach().sign()).sum().backward()
        results[stacked] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    assert torch.allclose(results[True][0], results[False][0], atol=1e-6)
    emb_grads = [p.grad for n, p in model.named_parameters() if ".emb.1." in n]
    assert emb_grads and all(g.abs().sum() > 0 for g in emb_grads)  # the projections do get gradients
    for a, b in zip(results[True][1], results[False][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)

    twin = copy.deepcopy(model)
    assert all(a is not b for a, b in zip(twin.res_blocks, model.res_blocks))
    with torch.no_grad():
        for blk in twin.res_blocks:
            blk.emb[1].bias.add_(1.0)
        monkeypatch.undo()  # the UNet's own stacked projections again
        assert not torch.allclose(twin(x, t, y), model(x, t, y))


def test_the_default_time_embedding_and_downsampling_are_unchanged():
    """The fields added for diffusers' models default to what every earlier checkpoint was trained with: the DDPM
    code's [sin, cos] embedding with frequencies 10000^(-i / (half - 1)), and padding 1 all round."""
    import math

    from ddpm_cli.nn.unet import Downsample, timestep_embedding

    t, dim = torch.tensor([0, 1, 17, 999]), 128
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    assert torch.equal(timestep_embedding(t, dim), torch.cat([torch.sin(args), torch.cos(args)], dim=1))
    torch.manual_seed(0)
    d = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    assert d.conv.padding == (1, 1) and torch.equal(d(x), torch.nn.functional.conv2d(x, d.conv.weight, d.conv.bias,
                                                                                     stride=2, padding=1))



def test_head_channels_gives_wider_levels_more_heads():
    heads = build_unet(validate_config({"model": {"head_channels": 64, "attention_resolutions": [32, 16]}}).model)
    assert [m.num_heads for m in heads.modules() if hasattr(m, "qkv")] == [2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 2]


def test_bottom_right_padding_pads_only_bottom_and_right():
    from ddpm_cli.nn.unet import Downsample

    d = Downsample(2, bottom_right=True)
    x = torch.randn(1, 2, 6, 6)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), d.conv.weight, d.conv.bias, stride=2)
    assert torch.equal(d(x), want) and d(x).shape == (1, 2, 3, 3)


def _forward_calls(model: UNet) -> list[int]:
    calls = []
    for m in model.modules():
        if m.__class__.__name__ == "ResBlock":
            m.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    """With dropout on (0.1: its masks must be replayed in the recompute). The recompute runs the same kernels on the
    same inputs, so the result is expected bit for bit; the tolerance (1e-6 relative, 1e-7 absolute, fp32) only
    allows for a kernel that picks another summation order on a second call."""
    from conftest import perturbed_unet
    from ddpm_cli.nn.unet import activation_checkpointing

    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 40, 99])
    results = []
    for on in (False, True):
        model = activation_checkpointing(perturbed_unet().train(), on)
        calls = _forward_calls(model)
        torch.manual_seed(3)
        out = model(x, t)
        out.square().mean().backward()
        blocks = sum(1 for m in model.modules() if m.__class__.__name__ == "ResBlock")
        assert len(calls) == (2 if on else 1) * blocks  # each block ran again in the backward
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_leaves_inference_alone():
    from conftest import perturbed_unet
    from ddpm_cli.nn.unet import activation_checkpointing

    model = activation_checkpointing(perturbed_unet())
    calls = _forward_calls(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        model.train()(x, t)
    model.eval()(x, t).sum().backward()
    blocks = sum(1 for m in model.modules() if m.__class__.__name__ == "ResBlock")
    assert len(calls) == 2 * blocks  # once each time: nothing was recomputed


def test_the_fold_sums_the_weights_in_their_own_dtype_under_autocast():
    """fold_nearest2x is a matrix product, which autocast would run in bf16: the fold turns autocast off, so an fp32
    weight folds to the fp32 sums of its taps, as plain adds would."""
    from ddpm_cli.nn.unet import fold_nearest2x

    torch.manual_seed(0)
    w = torch.randn(8, 6, 3, 3)
    want = fold_nearest2x(w.double())
    with torch.autocast("cpu", torch.bfloat16):
        got = fold_nearest2x(w)
    assert got.dtype == torch.float32 and got.shape == (6, 8, 4, 4)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # the four corner taps of an output pixel are single weights, the middle ones sums of two or four
    assert torch.equal(got[:, :, 0, 0], w[:, :, 2, 2].T) and torch.equal(got[:, :, 3, 3], w[:, :, 0, 0].T)
    assert torch.allclose(got[:, :, 1, 1], w[:, :, 1:, 1:].sum((2, 3)).T, atol=1e-6)


def test_the_fold_makes_its_matrix_on_the_weights_device_not_from_a_python_list():
    """No tensor from host data in the fold: on CUDA that is a host-to-device copy and a stream synchronisation
    in every eager forward, and in an exported graph a constant the caller must hand a weightless package (an
    AOTInductor package left without it crashed, 2026-12-07)."""
    from ddpm_cli.nn.unet import Upsample, fold_upsampling

    up = fold_upsampling(Upsample(4).eval())
    with torch.no_grad():
        program = torch.export.export(up, (torch.randn(1, 4, 3, 3),))
    assert list(program.graph_signature.lifted_tensor_constants) == []
