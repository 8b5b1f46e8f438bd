"""What a compiled training step keeps for its backward: the bytes of the tensors the partitioned forward graph
hands the backward (AOTAutograd's min-cut partitioner, the one inductor uses), inputs and weights not counted, with
and without the UNet's activation checkpointing (model.checkpointing) and under functorch's
activation_memory_budget (1.0: torch's default; lower: the partitioner recomputes more). Runs on the CPU: the
partition does not depend on the device, and no kernels are compiled (the graphs run as traced).

    PYTHONPATH=. python benchmarks/bench_saved.py [-c examples/ddpm-256.yaml] [--size 64] [--base-channels 32]
        [--batch 4] [--checkpointing] [--budget 1.0] [--cuda-path] [--inductor-peak] [--norm-stats group]
    PYTHONPATH=. python benchmarks/bench_saved.py --trainer [--checkpointing] [--norm-stats group] [--given-draws]

`--cuda-path` traces the step as the CUDA defaults run it (bf16 autocast, channels-last, per-channel GroupNorm
statistics), on the CPU: which of the kept bytes are fp32, where a bf16 copy would halve a pass of the backward.
One `BENCH {json}` line: saved bytes per image (in all and by dtype), and how many tensors.

`--inductor-peak` also compiles the step with inductor (the channels-last graph forced, as the trainer does) and
gives the peak resident memory of its second call above what was resident before it (Linux's VmHWM, reset through
/proc/self/clear_refs; allocations of 64 KiB and more are mapped apart, so a freed tensor leaves the resident
set): what the compiled code holds, which the partition alone does not say. `--norm-stats group` takes torch's
GroupNorm kernel instead of the per-channel statistics. `--trainer` measures the trainer's own compiled step so
(its loss, with the noise and timesteps drawn in the graph; bf16, channels-last; one BENCH line of its peak).
Minutes of CPU for each compile."""
from __future__ import annotations

import argparse
import json
import os
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


def resident_peak_mib(call) -> float:
    """Peak resident memory (MiB) while `call()` runs, above what was resident before it (Linux's VmHWM, reset
    through /proc/self/clear_refs)."""
    import re

    def status(key: str) -> float:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    call()
    return status("VmHWM") - before


def inductor_peak_mib(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, amp: bool) -> float:
    """The bare network's step compiled by inductor: the peak of its second call."""
    from ddpm_cli.engine.build import force_channels_last_graph

    if x.is_contiguous(memory_format=torch.channels_last):
        force_channels_last_graph()

    def loss(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(x, t).float().square().mean()

    torch._dynamo.reset()
    step = torch.compile(loss, dynamic=False)
    step(x, t).backward()  # compiles
    model.zero_grad(set_to_none=True)
    return resident_peak_mib(lambda: step(x, t).backward())


def trainer_peak_mib(overrides: list[str], args) -> float:
    """The trainer's own compiled step (its loss: noise and timesteps drawn in the graph, bf16, channels-last,
    the chosen statistics, as on CUDA but on the CPU): the peak of its second call."""
    import tempfile

    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.data import ImageSet
    from ddpm_cli.engine.train import Trainer

    raw = load_config(args.config, overrides).model_dump(mode="json")
    raw["model"]["checkpointing"] = args.checkpointing
    raw["train"].update(device="cpu", compile="on", precision="bf16", channels_last="on", norm_stats=args.norm_stats,
                        batch_size=args.batch, steps=1, compile_ahead=False)
    with tempfile.TemporaryDirectory() as tmp:
        raw["logging"].update(run_dir=tmp, run_name="peak")
        images = ImageSet(torch.randint(0, 256, (4 * args.batch, 3, args.size, args.size), dtype=torch.uint8),
                          torch.zeros(4 * args.batch, dtype=torch.long), [])
        trainer = Trainer(validate_config(raw), dataset=images)  # (compile on, not ahead: compiled at set-up)
        x = torch.randn(args.batch, 3, args.size, args.size)
        # --given-draws: the timesteps and noise drawn outside the graph and passed in (as grad_accum does)
        draws = (torch.randint(0, 1000, (args.batch,)), torch.randn_like(x)) if args.given_draws else ()
        trainer.loss_fn(x, None, *draws).backward()  # compiles
        trainer.model.zero_grad(set_to_none=True)
        return resident_peak_mib(lambda: trainer.loss_fn(x, None, *draws).backward())


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
    ap.add_argument("--inductor-peak", action="store_true",
                    help="also the inductor-compiled step's peak resident memory (Linux; minutes of CPU)")
    ap.add_argument("--norm-stats", choices=["channel", "group"], default="channel",
                    help="with --cuda-path or --trainer: the GroupNorm's statistics")
    ap.add_argument("--trainer", action="store_true",
                    help="--inductor-peak of the trainer's compiled step, not the bare network's")
    ap.add_argument("--given-draws", action="store_true",
                    help="with --trainer: the timesteps and noise drawn outside the compiled step")
    args = ap.parse_args()
    if (args.inductor_peak or args.trainer) and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc maps blocks of 64 KiB and more apart, so a freed tensor leaves the resident set (set at start-up:
        # mallopt from inside the process did not give the same figures)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

    import torch._functorch.config  # (an attribute of torch._functorch only once imported)

    torch._functorch.config.activation_memory_budget = args.budget
    overrides = [f"model.image_size={args.size}", f"model.base_channels={args.base_channels}", "model.norm_groups=8",
                 "model.dropout=0.0"]
    if args.trainer:
        print("BENCH " + json.dumps({"size": args.size, "base_channels": args.base_channels, "batch": args.batch,
                                     "checkpointing": args.checkpointing, "norm_stats": args.norm_stats,
                                     "given_draws": args.given_draws,
                                     "trainer_peak_mib": round(trainer_peak_mib(overrides, args), 1),
                                     "torch": torch.__version__}), flush=True)
        return
    cfg = load_config(args.config, overrides)
    model = build_unet(cfg.model).train()
    activation_checkpointing(model, args.checkpointing)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.cuda_path:
        channel_stats(model.to(memory_format=torch.channels_last), args.norm_stats == "channel")
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (args.batch,))
    saved, count, by_dtype = saved_for_backward(model, x, t, amp=args.cuda_path)
    peak = round(inductor_peak_mib(model, x, t, args.cuda_path), 1) if args.inductor_peak else None
    print("BENCH " + json.dumps({
        "size": args.size, "base_channels": args.base_channels, "checkpointing": args.checkpointing,
        "budget": args.budget, "cuda_path": args.cuda_path, "saved_mib_per_image": round(saved / args.batch / 2**20, 2),
        "by_dtype_mib_per_image": {k: round(v / args.batch / 2**20, 2) for k, v in by_dtype.items()},
        "saved_tensors": count, "norm_stats": args.norm_stats if args.cuda_path else "group",
        "inductor_peak_mib": peak, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
