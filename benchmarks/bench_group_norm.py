"""GroupNorm(+add)+SiLU at the DDPM CIFAR-10 UNet's shapes: our Triton kernel (ddpm_cli/nn/group_norm_act.py)
under several plans against what torch.compile makes of the module path, per shape and summed over one forward.

    python3 benchmarks/bench_group_norm.py [--batch 1000] [--tiles 8192 16384 32768] [--warps 8 16]

Times are GPU times (triton.testing.do_bench_cudagraph: replayed CUDA graphs, so no launch overhead; CUDA only);
bandwidth counts one read and one write of the activation, the least any implementation moves. Configurations
are tried at the shapes of 16x16 and larger; the small ones run the plan only."""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddpm_cli.nn import group_norm_act as gna  # noqa: E402
from ddpm_cli.nn.unet import GroupNorm, ResBlock, UNet  # noqa: E402


def unet_norm_shapes() -> collections.Counter:
    """(channels, size, with an add, with SiLU) of every GroupNorm call in one forward of the DDPM UNet."""
    model = UNet(image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,)).eval()
    norm2 = {id(m.norm2) for m in model.modules() if isinstance(m, ResBlock)}
    attn = {id(m.norm) for m in model.modules() if hasattr(m, "qkv")}
    seen: collections.Counter = collections.Counter()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.update(
        [(i[0].shape[1], i[0].shape[2], id(m) in norm2, id(m) not in attn)]))
        for m in model.modules() if isinstance(m, GroupNorm)]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    for h in hooks:
        h.remove()
    return seen


def reference(x: torch.Tensor, add: torch.Tensor | None, norm: GroupNorm, silu: bool) -> torch.Tensor:
    y = norm(x if add is None else x + add[:, :, None, None])
    return F.silu(y) if silu else y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--tiles", type=int, nargs="+", default=[8192, 16384, 32768], help="persistent: elements")
    p.add_argument("--warps", type=int, nargs="+", default=[8, 16], help="persistent: warps")
    p.add_argument("--looped", type=int, nargs="*", default=[16, 32, 64], help="looped: channels a program")
    p.add_argument("--block-p", type=int, nargs="*", default=[32, 128], help="looped: pixels a step")
    a = p.parse_args()
    from triton.testing import do_bench_cudagraph as do_bench

    shapes = unet_norm_shapes()
    compiled = torch.compile(reference)
    totals: collections.Counter = collections.Counter()
    torch._dynamo.config.recompile_limit = 64  # one graph per shape
    print(f"{'C':>4} {'HxW':>6} {'add':>4} {'silu':>4} {'calls':>5}  {'inductor us':>11}  best ours (config, us, TB/s)")
    for (C, S, has_add, silu), calls in sorted(shapes.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        norm = GroupNorm(32, C).cuda()
        norm.channel_stats = True
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        x = torch.randn(a.batch, C, S, S, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        add = torch.randn(a.batch, C, device="cuda") if has_add else None
        nbytes = 2 * x.numel() * x.element_size()
        with torch.no_grad():
            ref = compiled(x, add, norm, silu)
            t_ref = do_bench(lambda: compiled(x, add, norm, silu))
            configs = [dict(max_tile=t, warps=w) for t in a.tiles for w in a.warps if gna.plan(C, S * S, 32, t)]
            configs += [dict(looped_channels=lc, block_p=bp) for lc in a.looped for bp in a.block_p
                        if C % lc == 0 and lc % (C // 32) == 0]
            planned = gna.plan(C, S * S, 32)
            results = []
            for cfg in configs if S >= 16 else []:
                run = lambda: gna.launch(x, add, norm.weight, norm.bias, 32, norm.eps, silu, **cfg)  # noqa: E731
                err = (run().float() - ref.float()).abs().max().item()
                results.append((do_bench(run), str(cfg), err))
            t_plan = do_bench(lambda: gna.launch(x, add, norm.weight, norm.bias, 32, norm.eps, silu)) if planned else t_ref
        t, cfg, err = min(results, default=(t_ref, "inductor's", 0.0))
        totals["inductor"] += calls * t_ref
        totals["best"] += calls * t
        totals["planned"] += calls * t_plan
        print(f"{C:>4} {S:>3}x{S:<2} {has_add!s:>4} {silu!s:>4} {calls:>5}  {t_ref * 1e3:>11.1f}  "
              f"{cfg} {t * 1e3:.1f} {nbytes / t / 1e9:.2f}  planned {planned} {t_plan * 1e3:.1f} us, "
              f"max |diff| {err:.3f}; inductor {nbytes / t_ref / 1e9:.2f} TB/s (at its least bytes)")
        if len(results) > 1:
            print("      all: " + ", ".join(f"{c} {r * 1e3:.0f}" for r, c, _ in sorted(results)))
    print(f"one forward at batch {a.batch}: inductor {totals['inductor']:.2f} ms, ours as planned "
          f"{totals['planned']:.2f} ms, ours best per shape {totals['best']:.2f} ms")


if __name__ == "__main__":
    main()
