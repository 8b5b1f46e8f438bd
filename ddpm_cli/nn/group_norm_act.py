"""GroupNorm, an optional per-(sample, channel) add before it and SiLU after it, in one Triton kernel, for
inference on channels-last CUDA tensors (torch.compile traces it as a custom op and launches the kernel itself).

Why a kernel of our own: inductor computes GroupNorm's statistics in a looped reduction and then applies them in
a second kernel, so a (B, C, H, W) activation is read twice more than needed. The UNet's groups are small (at
32x32 with 128 channels: 1,024 pixels x 4 channels, 8 KB), so one program holds whole groups in registers: it
reads the input once, adds the convolution's bias and the timestep embedding, takes exact two-pass statistics in
fp32, and writes the activated output once. No backward: training keeps the compiled path."""
from __future__ import annotations

import functools
import importlib.util

import torch

TILE = 16384  # elements a program holds (fp32 in registers: 64 a thread with 8 warps)
MIN_ROW = 32  # channels a program reads per pixel: 64 bytes; 16 or 8 ran 2x or 5x slower (H100, BENCHMARKS.md)
MIN_PIXELS = 256  # below 16x16, inductor's kernels were faster than these (1,000 programs, each too small)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan(channels: int, pixels: int, groups: int, max_tile: int | None = None) -> tuple[int, int, int] | None:
    """(channels a program covers, its padded channel block, warps), or None where the kernel does not pay.
    Programs take whole groups, as many (a power of two dividing `groups`) as fit TILE elements, and at least
    MIN_ROW channels (then up to twice TILE, with 16 warps): with channels innermost, a program's run of channels
    at each pixel is its unit of memory access. `max_tile` fixes the tile instead (benchmarks)."""
    cpg, block_hw = channels // groups, next_pow2(pixels)
    per = 1
    while groups % (2 * per) == 0 and block_hw * next_pow2(2 * per * cpg) <= (max_tile or TILE):
        per *= 2
    while max_tile is None and per * cpg < MIN_ROW and groups % (2 * per) == 0:
        per *= 2
    block_c = next_pow2(per * cpg)
    elements = block_hw * block_c
    if max_tile is None and (pixels < MIN_PIXELS or per * cpg < MIN_ROW or elements > 2 * TILE):
        return None
    if elements > 2 * (max_tile or TILE):
        return None
    return per * cpg, block_c, 16 if elements > TILE else 8


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: a CUDA GPU with Triton installed (torch's CUDA wheels bring it)."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def supported(x: torch.Tensor, groups: int) -> bool:
    """Whether group_norm_act takes `x`: 4-d, channels divisible into groups that fit one program."""
    return x.dim() == 4 and x.shape[1] % groups == 0 and plan(x.shape[1], x.shape[2] * x.shape[3], groups) is not None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def group_norm_act_kernel(x_ptr, add_ptr, w_ptr, b_ptr, y_ptr, pixels, channels, cpg, eps,
                              HAS_ADD: tl.constexpr, SILU: tl.constexpr, TILE_C: tl.constexpr,
                              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                              PDL: tl.constexpr):
        if PDL:  # programmatic dependent launch: wait for the kernel before, let the next one get ready
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n, c0 = tl.program_id(0), tl.program_id(1) * TILE_C
        hw, c = tl.arange(0, BLOCK_HW), tl.arange(0, BLOCK_C)
        c_in = c < TILE_C
        inside = (hw < pixels)[:, None] & c_in[None, :]
        offsets = n.to(tl.int64) * pixels * channels + c0 + hw[:, None] * channels + c[None, :]  # (HW, C) tile
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_ADD:  # e.g. the convolution's bias plus the timestep embedding, one value per (sample, channel)
            a = tl.load(add_ptr + n * channels + c0 + c, mask=c_in, other=0.0).to(tl.float32)
            x = tl.where(inside, x + a[None, :], 0.0)
        # per-channel sums -> per-group sums -> back to channels, through a (C, G) membership matrix
        member = ((c // cpg)[:, None] == tl.arange(0, BLOCK_G)[None, :]) & c_in[:, None]
        count = (pixels * cpg).to(tl.float32)
        mean_g = tl.sum(tl.where(member, tl.sum(x, axis=0)[:, None], 0.0), axis=0) / count
        mean_c = tl.sum(tl.where(member, mean_g[None, :], 0.0), axis=1)
        d = tl.where(inside, x - mean_c[None, :], 0.0)  # exact two-pass variance: the tile is in registers
        var_g = tl.sum(tl.where(member, tl.sum(d * d, axis=0)[:, None], 0.0), axis=0) / count
        rstd_c = tl.sum(tl.where(member, (1.0 / tl.sqrt(var_g + eps))[None, :], 0.0), axis=1)
        w = tl.load(w_ptr + c0 + c, mask=c_in, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c0 + c, mask=c_in, other=0.0).to(tl.float32)
        y = d * (rstd_c * w)[None, :] + b[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def group_norm_act_looped(x_ptr, add_ptr, w_ptr, b_ptr, y_ptr, pixels, channels, cpg, eps,
                              HAS_ADD: tl.constexpr, SILU: tl.constexpr, TILE_C: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                              PDL: tl.constexpr):
        """The same function for groups too large for registers: one pass for the statistics, a second that
        applies them, re-reading the program's slice (mostly from L2, as it was just read)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n, c0 = tl.program_id(0), tl.program_id(1) * TILE_C
        p, c = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_C)
        c_in = c < TILE_C
        base = n.to(tl.int64) * pixels * channels + c0
        # sums of x - x[pixel 0] per channel: shifted by one of the channel's own values, so no cancellation
        ref = tl.load(x_ptr + base + c, mask=c_in, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for start in range(0, pixels, BLOCK_P):
            inside = ((start + p) < pixels)[:, None] & c_in[None, :]
            x = tl.load(x_ptr + base + (start + p)[:, None] * channels + c[None, :], mask=inside, other=0.0)
            d = tl.where(inside, x.to(tl.float32) - ref[None, :], 0.0)
            s1 += d
            s2 += d * d
        mean_d = tl.sum(s1, axis=0) / pixels
        var_c = tl.maximum(tl.sum(s2, axis=0) / pixels - mean_d * mean_d, 0.0)
        mean_c = ref + mean_d
        if HAS_ADD:
            a = tl.load(add_ptr + n * channels + c0 + c, mask=c_in, other=0.0).to(tl.float32)
            mean_c += a
        member = ((c // cpg)[:, None] == tl.arange(0, BLOCK_G)[None, :]) & c_in[:, None]
        mean_g = tl.sum(tl.where(member, mean_c[:, None], 0.0), axis=0) / cpg
        mean_gc = tl.sum(tl.where(member, mean_g[None, :], 0.0), axis=1)
        dm = mean_c - mean_gc
        var_g = tl.sum(tl.where(member, (var_c + dm * dm)[:, None], 0.0), axis=0) / cpg  # law of total variance
        rstd_c = tl.sum(tl.where(member, (1.0 / tl.sqrt(var_g + eps))[None, :], 0.0), axis=1)
        w = tl.load(w_ptr + c0 + c, mask=c_in, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c0 + c, mask=c_in, other=0.0).to(tl.float32)
        scale = rstd_c * w
        offset = b - mean_gc * scale
        if HAS_ADD:
            offset += a * scale
        for start in range(0, pixels, BLOCK_P):
            inside = ((start + p) < pixels)[:, None] & c_in[None, :]
            ptrs = base + (start + p)[:, None] * channels + c[None, :]
            y = tl.load(x_ptr + ptrs, mask=inside, other=0.0).to(tl.float32) * scale[None, :] + offset[None, :]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=inside)

    return group_norm_act_kernel, group_norm_act_looped


def launch(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, groups: int,
           eps: float, silu: bool, *, max_tile: int | None = None, warps: int | None = None,
           looped_channels: int = 0, block_p: int = 64, pdl: bool | None = None) -> torch.Tensor:
    """Run the kernel on `x` (any layout; made channels-last) and return the output; `max_tile` and `warps`
    override the plan, `looped_channels` > 0 takes the looped kernel with programs of that many channels and
    `block_p` pixels a step (benchmarks/bench_group_norm.py). `pdl` (default: on Hopper and later) launches it
    as a programmatic dependent, as torch.compile launches its own kernels for the sampler: a kernel without
    it among those ran 5x slower (H100, 2026-11-27: the fused sampler at 18,200 evaluations/s, not 29,700)."""
    N, C, H, W = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    if add is not None:
        add = add.reshape(N, C).contiguous()
    cpg = C // groups
    if pdl is None:
        pdl = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    persistent, looped = _kernel()
    if looped_channels:
        tile_c = looped_channels
        looped[(N, C // tile_c)](
            x, add if add is not None else x, weight, bias, y, H * W, C, cpg, eps,
            HAS_ADD=add is not None, SILU=silu, TILE_C=tile_c, BLOCK_P=block_p, BLOCK_C=next_pow2(tile_c),
            BLOCK_G=next_pow2(tile_c // cpg), PDL=pdl, num_warps=warps or 4, launch_pdl=pdl)
        return y
    tile_c, block_c, planned_warps = plan(C, H * W, groups, max_tile)
    persistent[(N, C // tile_c)](
        x, add if add is not None else x, weight, bias, y, H * W, C, cpg, eps,
        HAS_ADD=add is not None, SILU=silu, TILE_C=tile_c, BLOCK_HW=next_pow2(H * W), BLOCK_C=block_c,
        BLOCK_G=next_pow2(tile_c // cpg), PDL=pdl, num_warps=warps or planned_warps, launch_pdl=pdl)
    return y


@torch.library.custom_op("ddpm::group_norm_act", mutates_args=())
def _group_norm_act(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                    groups: int, eps: float, silu: bool) -> torch.Tensor:
    return launch(x, add, weight, bias, groups, eps, silu)


@_group_norm_act.register_fake
def _(x, add, weight, bias, groups, eps, silu):
    return torch.empty_like(x, memory_format=torch.channels_last)


def group_norm_act(x: torch.Tensor, norm: torch.nn.GroupNorm, *, add: torch.Tensor | None = None,
                   silu: bool = True) -> torch.Tensor:
    """silu(norm(x + add)) (or without silu), `add` of shape (N, C) or (N, C, 1, 1); the output has x's dtype
    and layout (channels-last). Check `supported(x, norm.num_groups)` first."""
    return _group_norm_act(x, add, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
