"""GroupNorm's elementwise part in fp32 or in the activations' dtype: the compiled forward and backward of residual
blocks at one level of a large UNet (ddpm-256's 256 px level: 128 channels), under bf16 autocast and channels-last
as the CUDA defaults train, with each formulation of `GroupNorm.forward`'s per-channel path:

- fp32: nn/unet.GroupNorm's own (when this was written: the scale-and-shift in fp32, cast back to the input's
  dtype at the end);
- centred: the statistics in fp32; the centring, the scale and the bias in the input's dtype, so the elementwise
  part and what follows it are bf16 in the graph;
- shift: as centred, but as one multiply-add with a bf16 shift (bias - mean * scale), which loses the output
  when the mean is large against the spread;
- fp32-saved: fp32, with the bf16 output saved for the backward rather than recomputed.

Reports for each: ms a forward and backward (CUDA events, median of `--iters`), and the activation-sized buffers
the generated code allocates, by dtype (a buffer is written once and read at least once: its bytes are the
lever). Inductor options (`--inductor KEY=VALUE`, bench_speed's) apply to every variant.

    PYTHONPATH=. python benchmarks/bench_norm.py [--variants fp32,centred,shift,fp32-saved] [--size 256]
        [--channels 128] [--batch 8] [--blocks 2] [--inductor realize_reads_threshold=8]

One `BENCH {json}` line a variant. Runs on the CPU too (small sizes; the buffers then are the C++ backend's)."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ddpm_cli.nn import unet  # noqa: E402


def _statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn/unet.GroupNorm's per-channel statistics, per group: (mean, scale = weight / std), fp32, each (N, C, 1, 1)."""
    N, C, G = x.shape[0], x.shape[1], self.num_groups
    var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    var_c, mean_c = var_c.view(N, G, C // G), mean_c.view(N, G, C // G)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = var_c.mean(-1, keepdim=True) + (mean_c - mean_g).square().mean(-1, keepdim=True)
    scale = torch.rsqrt(var_g + self.eps) * self.weight.float().view(1, G, C // G)
    return mean_g.expand(N, G, C // G).reshape(N, C, 1, 1), scale.view(N, C, 1, 1)


def forward_shift(self, x: torch.Tensor) -> torch.Tensor:
    """The elementwise part as one multiply-add in the input's dtype: x * scale + (bias - mean * scale)."""
    if not self.channel_stats:
        return torch.nn.GroupNorm.forward(self, x)
    mean, scale = _statistics(self, x)
    shift = self.bias.float().view(1, -1, 1, 1) - mean * scale
    return x * scale.to(x.dtype) + shift.to(x.dtype)


def forward_centred(self, x: torch.Tensor) -> torch.Tensor:
    """The elementwise part in the input's dtype, centred first: (x - mean) * scale + bias."""
    if not self.channel_stats:
        return torch.nn.GroupNorm.forward(self, x)
    mean, scale = _statistics(self, x)
    d = x.dtype
    return (x - mean.to(d)) * scale.to(d) + self.bias.view(1, -1, 1, 1).to(d)


def _save_bf16_outputs(ctx, op, *args, **kwargs):
    """A selective-checkpoint policy: keep what is cast to bf16 (the normalised output), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op == torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def forward_saved(self, x: torch.Tensor) -> torch.Tensor:
    """nn/unet.GroupNorm's own, with its bf16 output saved for the backward (torch's selective checkpointing)
    instead of recomputed there from the input in fp32 (the partitioner's choice, whose fp32 intermediates the
    backward then keeps between its kernels)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    return checkpoint(VARIANTS["fp32"], self, x, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _save_bf16_outputs))


VARIANTS = {"fp32": unet.GroupNorm.forward, "centred": forward_centred, "shift": forward_shift,
            "fp32-saved": forward_saved}


def activation_buffers(code: str, numel: int) -> dict[str, int]:
    """Buffers of `numel` elements the generated code allocates, counted by dtype."""
    counts: dict[str, int] = {}
    for shape, dtype in re.findall(r"empty_strided_\w+\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)", code):
        n = 1
        for d in (int(v) for v in shape.split(",") if v.strip()):
            n *= d
        if n == numel:
            counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def run(variant: str, args, device: torch.device) -> dict:
    """One variant's BENCH record, with GroupNorm's forward as it was after it."""
    import torch._dynamo

    torch._dynamo.reset()
    unet.GroupNorm.forward = VARIANTS[variant]
    try:
        return _timed(variant, args, device)
    finally:
        unet.GroupNorm.forward = VARIANTS["fp32"]


def _timed(variant: str, args, device: torch.device) -> dict:
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    act = torch.nn.SiLU
    blocks = torch.nn.ModuleList(unet.ResBlock(args.channels, args.channels, 4 * args.channels, 0.0, lambda c:
                                               unet.GroupNorm(32, c), act) for _ in range(args.blocks))
    blocks = unet.channel_stats(blocks).to(device, memory_format=torch.channels_last)
    with torch.no_grad():
        for p in blocks.parameters():  # zero-initialised output convolutions would hide the second norm's work
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    emb = torch.randn(args.batch, args.channels, device=device)

    def step(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            h = x.to(torch.bfloat16)
            for b in blocks:
                h = b(h, emb)
        loss = h.float().square().mean()
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step)
    t0 = time.perf_counter()
    loss, codes = run_and_get_code(compiled, x)
    compile_s = time.perf_counter() - t0
    numel = x.numel()
    buffers = [activation_buffers(c, numel) for c in codes]
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            compiled(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            compiled(x)
            times.append(1000 * (time.perf_counter() - t))
    times.sort()
    grad = x.grad.float().norm().item()
    return {"variant": variant, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "shape": list(x.shape), "blocks": args.blocks, "inductor": args.inductor, "compile_s": round(compile_s, 1),
            "ms": round(times[len(times) // 2], 3), "loss": float(loss), "grad_norm": grad,
            "activation_buffers": {"forward": buffers[0], "backward": buffers[1:]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="fp32,centred,shift,fp32-saved")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch._inductor.config as inductor_config

    from bench_speed import set_inductor_options

    inductor_config.force_disable_caches = True  # each variant compiled afresh
    set_inductor_options(args.inductor)
    for v in args.variants.split(","):
        print("BENCH " + json.dumps(run(v, args, device)), flush=True)


if __name__ == "__main__":
    main()
