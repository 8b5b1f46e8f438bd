"""The host's share of a training step: what each piece of the loop outside the compiled forward and backward
costs the Python process, without its kernels' work. The network's parameters are replaced by tensors of one
element, so the figures are dispatch (and on CUDA, launch) time only. Where their sum nears the step's device
time, the loop is host-bound: its rate then follows the host's pace and jitters.

    PYTHONPATH=. python benchmarks/bench_host.py [--config examples/cifar10-15min.yaml] [--device cuda]
        [--set train.posthoc_ema=[0.05,0.1]]

Prints one line per piece (BENCH {...}) and the sum."""
from __future__ import annotations

import argparse
import json
import time

import torch

from ddpm_cli.config.loading import load_config
from ddpm_cli.engine.build import build_unet
from ddpm_cli.engine.ema import EMA
from ddpm_cli.engine.posthoc_ema import PosthocEMA


def timed(fn, repeats: int, device: torch.device) -> float:
    """Microseconds per call of `fn`: the host's time. The device's queue is drained before, not after: with
    one-element tensors its work is too small to hold the host back."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/cifar10-15min.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=500)
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    device = torch.device(a.device)
    model = build_unet(cfg.model)
    for module in model.modules():  # one element per parameter: the same tensors to dispatch, no work in each
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(torch.zeros(1))
    model.to(device)
    params = list(model.parameters())
    for param in params:
        param.grad = torch.zeros_like(param)
    tc = cfg.train
    opt = torch.optim.Adam(params, lr=tc.lr, fused=True)
    emas = [EMA(model, d) for d in (tc.ema_decay, *tc.ema_extra)] if tc.ema_decay else []
    posthoc = PosthocEMA(model, tc.posthoc_ema) if tc.posthoc_ema else None
    pieces = {
        "clip_grad_norm_ (foreach)": lambda: torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=True),
        "fused Adam": opt.step,
        f"{len(emas)} EMA update(s)": lambda: [ema.update(model) for ema in emas],
    }
    if posthoc is not None:
        pieces[f"post-hoc update ({len(tc.posthoc_ema)} averages)"] = lambda: posthoc.update(model, 1000)
    total = 0.0
    print(f"BENCH tensors {len(params)} device {device} torch {torch.__version__}", flush=True)
    for name, fn in pieces.items():
        us = timed(fn, a.repeats, device)
        total += us
        print("BENCH " + json.dumps({"piece": name, "host_us": round(us)}), flush=True)
    print("BENCH " + json.dumps({"piece": "sum", "host_us": round(total)}), flush=True)


if __name__ == "__main__":
    main()
