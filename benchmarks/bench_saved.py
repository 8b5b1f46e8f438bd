"""What a compiled training step keeps for its backward: the bytes of the tensors the partitioned forward graph
hands the backward (AOTAutograd's min-cut partitioner, the one inductor uses), inputs and weights not counted, with
and without the UNet's activation checkpointing (model.checkpointing) and under functorch's
activation_memory_budget (1.0: torch's default; lower: the partitioner recomputes more). Runs on the CPU: the
partition does not depend on the device, and no kernels are compiled (the graphs run as traced).

    PYTHONPATH=. python benchmarks/bench_saved.py [-c examples/ddpm-256.yaml] [--size 64] [--base-channels 32]
        [--batch 4] [--checkpointing] [--budget 1.0] [--cuda-path]

`--cuda-path` traces the step as the CUDA defaults run it (bf16 autocast, channels-last, per-channel GroupNorm
statistics), on the CPU: which of the kept bytes are fp32, where a bf16 copy would halve a pass of the backward.
One `BENCH {json}` line: saved bytes per image (in all and by dtype), and how many tensors."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_cli.config import load_config  # noqa: E402
from ddpm_cli.engine.build import build_unet  # noqa: E402
from ddpm_cli.nn.unet import activation_checkpointing, channel_stats  # noqa: E402


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                       amp: bool = False) -> tuple[int, int, dict[str, int]]:
    """(bytes, count, bytes by dtype) of the tensors the compiled step `model(x, t).square().mean()` keeps from its forward for its
    backward: the partitioned forward graph's outputs but the first (the loss), less those that are the graph's
    own inputs (weights, the batch: kept by reference, not new memory). Runs one forward and backward."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    found = {}

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        kept = [n.meta["val"] for n in output.args[0][1:]
                if n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
        found["bytes"] = sum(v.numel() * v.element_size() for v in kept)
        found["count"] = len(kept)
        by_dtype: dict[str, int] = {}
        for v in kept:
            name = str(v.dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + v.numel() * v.element_size()
        found["by_dtype"] = by_dtype
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    def loss(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(x, t).float().square().mean()

    step = torch.compile(loss, backend=backend)
    step(x, t).backward()
    return found["bytes"], found["count"], found["by_dtype"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default=str(ROOT / "examples" / "ddpm-256.yaml"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--base-channels", type=int, default=32, help="narrower than the config's, for the CPU")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--budget", type=float, default=1.0, help="torch._functorch.config.activation_memory_budget")
    ap.add_argument("--cuda-path", action="store_true",
                    help="bf16 autocast, channels-last and per-channel statistics, as the CUDA defaults train")
    args = ap.parse_args()

    import torch._functorch.config  # (an attribute of torch._functorch only once imported)

    torch._functorch.config.activation_memory_budget = args.budget
    cfg = load_config(args.config, [f"model.image_size={args.size}", f"model.base_channels={args.base_channels}",
                                    "model.norm_groups=8", "model.dropout=0.0"])
    model = build_unet(cfg.model).train()
    activation_checkpointing(model, args.checkpointing)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.cuda_path:
        channel_stats(model.to(memory_format=torch.channels_last))
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (args.batch,))
    saved, count, by_dtype = saved_for_backward(model, x, t, amp=args.cuda_path)
    print("BENCH " + json.dumps({
        "size": args.size, "base_channels": args.base_channels, "checkpointing": args.checkpointing,
        "budget": args.budget, "cuda_path": args.cuda_path, "saved_mib_per_image": round(saved / args.batch / 2**20, 2),
        "by_dtype_mib_per_image": {k: round(v / args.batch / 2**20, 2) for k, v in by_dtype.items()},
        "saved_tensors": count, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
