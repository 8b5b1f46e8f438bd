"""The DDPM UNet (Ho et al. 2020, appendix B): residual blocks with a timestep (and optional class) embedding,
self-attention at chosen resolutions, GroupNorm, dropout and skip connections. Reads top to bottom.

Knows nothing of diffusion or configs: `UNet(...)(x_t, t, y) -> epsilon (or v)`, shapes (B, C, H, W), (B,), (B,)."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "mish": nn.Mish}


def timestep_embedding(t: torch.Tensor, dim: int, cos_first: bool = False, freq_shift: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in the DDPM code (Transformer positions):
    [sin, cos] of t * 10000^(-i / (dim/2 - freq_shift)); `cos_first` swaps the halves (diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / max(half - freq_shift, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weights so its residual branch starts as the identity (DDPM's init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same result) with a second way to compute it, for channels-last tensors on
    a GPU: statistics per channel first (a reduction over H*W, which reads memory in order when channels are
    innermost), then per group by the law of total variance, then one fused scale-and-shift. The output keeps
    the input's dtype (bf16 under autocast), while the statistics are fp32. Turned on by `channel_stats(model)`.
    The per-channel statistics are torch.var_mean's (Welford): plain sums of x and x^2 would be cheaper, but lose
    the variance when the mean is large against the spread; sums shifted by one of the channel's own values keep
    it, yet made the compiled sampler slower (BENCHMARKS.md)."""

    channel_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channel_stats:
            return super().forward(x)
        N, C, G = x.shape[0], x.shape[1], self.num_groups
        xf = x.float()  # one fp32 view of the input for both uses (eager autograd then saves it once)
        var_c, mean_c = torch.var_mean(xf, dim=(2, 3), correction=0)  # (N, C)
        var_c, mean_c = var_c.view(N, G, C // G), mean_c.view(N, G, C // G)
        mean_g = mean_c.mean(-1, keepdim=True)
        var_g = var_c.mean(-1, keepdim=True) + (mean_c - mean_g).square().mean(-1, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps) * self.weight.float().view(1, G, C // G)
        shift = self.bias.float().view(1, G, C // G) - mean_g * scale
        return (xf * scale.view(N, C, 1, 1) + shift.view(N, C, 1, 1)).to(x.dtype)


def channel_stats(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch every GroupNorm of `model` to per-channel statistics (or back); returns the model."""
    for m in model.modules():
        if isinstance(m, GroupNorm):
            m.channel_stats = on
    return model


def dense_grad(x: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """`x`, with a dense gradient in training; `x` itself otherwise (inference, export).

    The gradient of a `torch.cat` input is a channel slice of the concatenation's gradient; handed on as such,
    every convolution behind it copies the slice to dense memory in its backward (eager copies, outside the
    compiled graph). Multiplied by `one` (a 0-d tensor of 1), the gradient is that product's: written densely
    by a pointwise kernel inside the compiled graph. `one` is a tensor, not the number 1, so that the compiler
    cannot drop the product as a no-op; a product, not an autograd.Function, so that AOTAutograd's cache keeps
    the training graph (it bypasses any graph with an autograd.Function in it)."""
    return x * one if x.requires_grad and torch.is_grad_enabled() else x


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, norm, act):
        super().__init__()
        self.norm1, self.act1 = norm(in_ch), act()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(act(), nn.Linear(emb_dim, out_ch))
        self.norm2, self.act2 = norm(out_ch), act()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb_out: torch.Tensor) -> torch.Tensor:
        """`emb_out`: this block's projection of the timestep embedding, (B, out_ch): `self.emb(emb)`, which the
        UNet computes for all its blocks at once (stacked_embeddings)."""
        h = self.conv1(self.act1(self.norm1(x)))
        h = h + emb_out[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        return self.skip(x) + h


def stacked_embeddings(blocks: tuple[ResBlock, ...], emb: torch.Tensor) -> list[torch.Tensor]:
    """[b.emb(emb) for b in blocks] as one matrix product over the blocks' Linear weights stacked: the same
    parameters and the same function, but the DDPM CIFAR-10 UNet's 22 blocks then cost one GEMM a forward and
    two a backward instead of 66 small ones, and one activation of the shared embedding instead of 22."""
    linears = [b.emb[1] for b in blocks]
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears])
    return list(F.linear(blocks[0].emb[0](emb), weight, bias).split([lin.out_features for lin in linears], dim=1))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, through scaled_dot_product_attention.

    The 1x1 convolutions q/k/v and out are applied as matrix products on a (B, H*W, C) view of the normalised
    input: for a channels-last tensor that view is free, and so is the way back, so neither the forward nor the
    backward converts layouts (through NCHW-ordered reshapes the backward paid for eager copies of the q/k/v
    gradient). Same parameters and the same function as the convolutions."""

    def __init__(self, ch: int, num_heads: int, norm):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C): channels (3, heads, d)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, C // self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        h = F.linear(h.transpose(1, 2).flatten(2), self.proj.weight.flatten(1), self.proj.bias)  # (B, HW, C)
        return x + h.transpose(1, 2).unflatten(2, (H, W))


class Downsample(nn.Module):
    """A stride-2 3x3 convolution; `bottom_right` pads one pixel on the bottom and right only (TensorFlow's SAME,
    as the DDPM paper's code did) instead of one on every side."""

    def __init__(self, ch: int, bottom_right: bool = False):
        super().__init__()
        self.bottom_right = bottom_right
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if bottom_right else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.bottom_right else x)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, as F.interpolate(x, scale_factor=2, mode="nearest"), written as a
    broadcast: its gradient is then a sum over each 2x2 block, where interpolate's is a scatter-add into zeros
    (faster training; BENCHMARKS.md). A channels-last input is expanded on its (B, H, W, C) view, so the result
    stays channels-last and neither direction changes layout."""
    B, C, H, W = x.shape
    if C > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(B, H, 2, W, 2, C)
        return y.reshape(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)


def fold_nearest2x(w: torch.Tensor) -> torch.Tensor:
    """The (Cin, Cout, 4, 4) kernel of the stride-2 transposed convolution that equals nearest 2x upsampling
    followed by the 3x3, padding-1 convolution of weight `w` (Cout, Cin, 3, 3).

    An even output row 2i sees input rows i-1 (through w's row 0) and i (rows 1 and 2, which both land on it);
    an odd row 2i+1 sees rows i (rows 0 and 1) and i+1 (row 2). A transposed convolution with stride 2 and
    padding 1 reaches rows i-1 and i through its taps 3 and 1, and rows i and i+1 through taps 2 and 0; the same
    holds for columns, and the edges get the same zero padding. So each 4x4 kernel is R w R^T for the 0/1 matrix
    R below, computed for all (Cout, Cin) pairs as one (Cout*Cin, 9) x (9, 16) matrix product in `w`'s dtype
    (autocast off): an extern GEMM, which a compiled training step runs in microseconds, where the same sums as
    stacks and adds became a slow Triton kernel (docs/lab-notes.md, 2026-11-27)."""
    # R[a, r] = 1 where row r of the 3x3 lands on tap a of the 4x4 (taps 0..3 take rows {2}, {1,2}, {0,1}, {0}),
    # made on w's device: a tensor from a Python list would be a host-to-device copy, and with it a stream
    # synchronisation, in every eager forward (and a constant an exported graph must be handed)
    tap, row = torch.arange(4, device=w.device)[:, None], torch.arange(3, device=w.device)
    rows_to_taps = ((row >= (2 - tap).clamp(min=0)) & (row <= (3 - tap).clamp(max=2))).to(w.dtype)
    cout, cin = w.shape[:2]
    with torch.autocast(w.device.type, enabled=False) if w.device.type in ("cuda", "cpu") else nullcontext():
        k = w.reshape(cout * cin, 9) @ torch.kron(rows_to_taps, rows_to_taps).T
    return k.reshape(cout, cin, 4, 4).transpose(0, 1)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution; `folded` computes the same function as one transposed
    convolution on the small input (fold_nearest2x): each output pixel then costs 4 taps, not 9, so the
    layer does 2.25x fewer multiply-adds, and the 4x larger upsampled tensor (and its gradient) is never
    written. The parameters stay those of the 3x3 convolution, so checkpoints do not change. `ddpm sample`,
    `ddpm eval` (engine.generate.inference_net), the ONNX and pt2 exports, and training as
    train.fold_upsampling says, turn it on; the Python API's network leaves it off."""

    folded = False

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.register_buffer("frozen_kernel", None, persistent=False)  # fold_upsampling(frozen=True); not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            kernel = self.frozen_kernel if self.frozen_kernel is not None else fold_nearest2x(self.conv.weight)
            return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)
        return self.conv(upsample_nearest2x(x))


def fold_upsampling(model: nn.Module, on: bool = True, *, frozen: bool = False) -> nn.Module:
    """Switch every Upsample of `model` to the folded transposed convolution (or back); returns the model.
    `frozen` builds each 4x4 kernel once, now, as a buffer (not saved in state dicts), so an export holds a
    plain weight instead of the ops that build it; it does not follow later changes of the 3x3 weights."""
    for m in model.modules():
        if isinstance(m, Upsample):
            m.folded = on
            m.frozen_kernel = fold_nearest2x(m.conv.weight).detach().contiguous() if on and frozen else None
    return model


def activation_checkpointing(model: nn.Module, on: bool = True) -> nn.Module:
    """Make every UNet in `model` recompute its blocks' activations in the backward instead of keeping them (or
    stop); returns the model. Only a forward that builds a graph for training pays for it: with the model in
    eval mode or under no_grad (sampling, evaluation, export) nothing changes."""
    for m in model.modules():
        if isinstance(m, UNet):
            m.checkpointing = on
    return model


class UNet(nn.Module):
    # Activation checkpointing (activation_checkpointing): each group of blocks keeps only its input for the
    # backward, which runs its forward again, so a training step holds about one block's activations per group
    # rather than all of them: larger images or batches in the same memory for roughly one more forward.
    checkpointing = False

    def __init__(self, image_size: int | tuple[int, int] = 32, in_channels: int = 3, base_channels: int = 128,
                 channel_mults: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1, num_heads: int = 1,
                 time_emb_dim: int = 0, norm: str = "group", norm_groups: int = 32, activation: str = "silu",
                 num_classes: int | None = None, head_channels: int = 0, norm_eps: float = 1e-5,
                 downsample_padding: str = "symmetric", time_embedding_order: str = "sin-cos",
                 time_freq_shift: float = 1.0):
        super().__init__()
        self.register_buffer("one", torch.ones(()), persistent=False)  # dense_grad's 1; not in checkpoints
        act = ACTIVATIONS[activation]
        groups = norm_groups if norm == "group" else 1

        def norm_layer(ch: int) -> nn.Module:
            return GroupNorm(groups, ch, eps=norm_eps)

        def attention(ch: int) -> Attention:  # head_channels: as many heads as fit (wider levels get more)
            return Attention(ch, ch // head_channels if head_channels else num_heads, norm_layer)

        self.time_cos_first = time_embedding_order == "cos-sin"
        self.time_freq_shift = time_freq_shift

        self.base_channels = base_channels
        self.num_classes = num_classes
        emb_dim = time_emb_dim or 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), act(), nn.Linear(emb_dim, emb_dim))
        # One extra class slot: the "no label" input used for unconditional / guided sampling.
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        block = dict(emb_dim=emb_dim, dropout=dropout, norm=norm_layer, act=act)

        self.down = nn.ModuleList()
        # `res` names a level for attention_resolutions: its side, the shorter one when (height, width) differ;
        # the convolutions themselves take any height and width that halve as often as there are levels.
        res = min(image_size) if isinstance(image_size, (tuple, list)) else image_size
        skip_chs, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                layers = nn.ModuleList([ResBlock(ch, base_channels * mult, **block)])
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(attention(ch))
                self.down.append(layers)
                skip_chs.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, downsample_padding == "bottom-right")]))
                skip_chs.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, **block), attention(ch),
                                  ResBlock(ch, ch, **block)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                layers = nn.ModuleList([ResBlock(ch + skip_chs.pop(), base_channels * mult, **block)])
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(attention(ch))
                self.up.append(layers)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                res *= 2

        self.out = nn.Sequential(norm_layer(ch), act(), zero_(nn.Conv2d(ch, in_channels, 3, padding=1)))
        # The residual blocks in the order forward() calls them (that of registration: down, mid, up). A tuple
        # attribute, not a submodule list, so parameter names and checkpoints do not change.
        self.res_blocks = tuple(m for m in self.modules() if isinstance(m, ResBlock))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels, self.time_cos_first, self.time_freq_shift))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)

        embs = iter(stacked_embeddings(self.res_blocks, emb))  # each residual block's projection of emb
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._group(layers, h, None, embs, recompute)
            skips.append(h)
        h = self._group(self.mid, h, None, embs, recompute)
        for layers in self.up:
            h = self._group(layers, h, skips.pop() if isinstance(layers[0], ResBlock) else None, embs, recompute)
        return self.out(h)

    def _group(self, layers: nn.ModuleList, h: torch.Tensor, skip: torch.Tensor | None, embs,
               recompute: bool) -> torch.Tensor:
        """One group of layers (a level's residual block with its attention, a down/upsampling, the middle);
        `skip` is the down path's tensor an up block concatenates to its input."""
        emb_outs = [next(embs) for layer in layers if isinstance(layer, ResBlock)]  # taken once, not on recompute
        if recompute and emb_outs:  # a lone down/upsampling convolution keeps no more than its input anyway
            # use_reentrant=False: the supported variant, which torch.compile traces; the recompute replays the
            # forward's RNG state, so dropout draws the same masks and the gradients are those without it.
            return checkpoint(_run_group, layers, h, skip, self.one, *emb_outs, use_reentrant=False)
        return _run_group(layers, h, skip, self.one, *emb_outs)


def _run_group(layers: nn.ModuleList, h: torch.Tensor, skip: torch.Tensor | None, one: torch.Tensor,
               *emb_outs: torch.Tensor) -> torch.Tensor:
    if skip is not None:  # inside the checkpointed function, so the concatenation is not kept either
        h = torch.cat([dense_grad(h, one), skip], dim=1)
    emb_outs_left = iter(emb_outs)
    for layer in layers:
        h = layer(h, next(emb_outs_left)) if isinstance(layer, ResBlock) else layer(h)
    return h
