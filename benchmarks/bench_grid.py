"""Where a small eager `ddpm sample` job (the issue-24 grid: 64 images, no compile) spends its seconds, inside one
fresh process: torch's import, CUDA's start, the checkpoint and its networks (engine.draw.load_drawer, as `ddpm
sample` calls it), then the same batch drawn twice, as `ddpm sample` draws it (the GPU synchronised at each batch's
end). The first batch pays what a process pays once (kernels loaded at their first launch, cuDNN's choice of
algorithm for each convolution shape, cuBLAS's handles); the second is the eager pace alone, so first minus second
is that once-only cost. `--per-step` synchronises after every sampler step too, to say which steps pay it (the
synchronisations may change what the first batch pays: BENCHMARKS.md, "Start-up"); `--profile` runs the first
batch under torch.profiler and prints the host-side calls that took longest.

    PYTHONPATH=. python benchmarks/bench_grid.py CKPT [-n 64] [--per-step] [--profile]

One BENCH JSON line (seconds)."""
from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--per-step", action="store_true", help="synchronise after each sampler step and time it")
    p.add_argument("--profile", action="store_true", help="profile the first batch (adds its own overhead)")
    a = p.parse_args()
    marks = {}
    import torch

    marks["import_torch"] = time.perf_counter() - T0
    from ddpm_cli.engine.build import resolve_device
    from ddpm_cli.engine.draw import DrawOptions, draw, load_drawer, plan_draw

    marks["import_ddpm"] = time.perf_counter() - T0
    device = resolve_device(a.device, "--device")
    cuda = device.type == "cuda"

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t = time.perf_counter()
    if cuda:
        torch.zeros(1, device=device)
    marks["device_start_s"] = sync() - t
    t = time.perf_counter()
    plan = plan_draw(a.checkpoint, DrawOptions())
    drawer, _ = load_drawer(plan, device, a.n, "auto")
    marks["load_s"] = sync() - t

    def one_batch() -> tuple[float, list[float]]:
        steps, last = [], [sync()]

        def on_step(i: int, total: int) -> None:  # noqa: ARG001 - the sampler's progress callback
            now = sync() if a.per_step else time.perf_counter()  # without --per-step: when the host queued it
            steps.append(round(now - last[0], 4))
            last[0] = now

        start = last[0]
        draw(drawer, a.n, batch_size=a.n, on_step=on_step)
        return sync() - start, steps

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            first, first_steps = one_batch()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    else:
        first, first_steps = one_batch()
    second, second_steps = one_batch()
    marks.update(first_batch_s=first, second_batch_s=second, once_only_s=first - second,
                 per_step=a.per_step, first_steps_s=first_steps[:4],
                 second_step_median_s=sorted(second_steps)[len(second_steps) // 2],
                 evaluations_per_step=2 if drawer.guide is not None or drawer.guidance != 1.0 else 1,
                 steps=len(first_steps), device=torch.cuda.get_device_name(device) if cuda else "cpu",
                 torch=torch.__version__, profiled=a.profile, total_s=time.perf_counter() - T0)
    print("BENCH " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in marks.items()}))


if __name__ == "__main__":
    main()
