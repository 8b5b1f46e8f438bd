"""Larger images: training and sampling speed at 64-256 px with the shipped configs, the peer (diffusers'
UNet2DModel built from the same model section, so the same network) beside it, peak memory and the largest batch
that fits, with and without activation checkpointing, and the streamed data path against the in-memory one.

Each subcommand measures one thing in this process and prints one `BENCH {json}` line; benchmarks/bigimg_run.sh
runs the set on a GPU, each in a fresh process, with the peer in the same call.

    PYTHONPATH=. python benchmarks/bench_bigimg.py train  -c examples/ddpm-256.yaml [--size 128] [--set k=v ...]
    PYTHONPATH=. python benchmarks/bench_bigimg.py peer   -c examples/ddpm-256.yaml        # its compiled step
    PYTHONPATH=. python benchmarks/bench_bigimg.py sample -c examples/ddpm-256.yaml [--peer]
    PYTHONPATH=. python benchmarks/bench_bigimg.py largest -c examples/ddpm-256.yaml [--set model.checkpointing=true]
    PYTHONPATH=. python benchmarks/bench_bigimg.py train  -c examples/iddpm-64.yaml --data DIR --set data.streaming=on
    PYTHONPATH=. python benchmarks/bench_bigimg.py folder DIR --size 256 --count 4000     # JPEGs to stream from
    PYTHONPATH=. python benchmarks/bench_bigimg.py train --tiny                           # CPU: checks the script
    PYTHONPATH=. python benchmarks/bench_bigimg.py describe -c examples/ddpm-256.yaml     # CPU: the counts alone

train: `ddpm train`'s Trainer with the config as given (CUDA defaults: bf16, channels-last, compiled step with
CUDA graphs) on random images resident on the GPU, or on the images of --data (in memory or streamed, as
data.streaming says); img/s is the median of the logged intervals after the first two, the first step (compiling)
apart. FLOPs per image are counted by torch's FlopCounterMode on one forward and backward (matrix products and
convolutions, attention included), and the share of the card's bf16 peak is given against `--peak` TFLOP/s.
peer: one plain epsilon-MSE step (AdamW, bf16 autocast, channels-last, torch.compile), as
../shared/bench/peer_diffusers.py times the CIFAR-10 network. sample: DDIM steps through engine.generate (ours)
or the compiled forward (the peer), in network evaluations per second. largest: one eager training step at
growing batches: the peak memory at two batches gives the memory an image takes, the predicted largest batch is
then run to confirm it (eager: compiled steps keep fewer activations, so a compiled run fits at least this much).
describe: the counts every line carries (FLOPs per image; the GroupNorms' least traffic, `norm_min`; the
elementwise floor, the least any kernels outside cuDNN's convolutions, attention and GEMMs could move however
fused, `floor`), for `bound` (train --profile) against a profile's kept time.

--gpu-lock FILE lets several of these processes share one GPU: each compiles and warms up side by side with the
others (compiling is CPU work), then takes an exclusive lock on FILE for its timed part, so only one is timed at a
time. A rate is the median over windows (logged intervals, or groups of calls), which keeps the odd window in
which another process ran its first steps out of the figure. `largest` needs the whole card: run it alone.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ddpm_cli.config import load_config, validate_config  # noqa: E402
from ddpm_cli.config.schema import RunConfig  # noqa: E402
from ddpm_cli.engine.build import (build_diffusion, build_unet, compile_mode, compile_options,  # noqa: E402
                                   count_params, resolve_device)
from ddpm_cli.engine.data import ImageSet  # noqa: E402
from ddpm_cli.engine.train import Trainer  # noqa: E402
from bench_speed import Collect  # noqa: E402  (the logged img/s of a run)

H200_BF16_TFLOPS = 989.0  # the datasheet's dense bf16 rate of an H100/H200 SXM (device/H200.md)
TINY = ["model.image_size=[16,24]", "model.base_channels=16", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
        "model.norm_groups=4", "model.attention_resolutions=[8]", "model.num_heads=1", "model.head_channels=0",
        "train.batch_size=8", "train.warmup_steps=1"]  # (one head: a config's own heads may not divide 32 channels)


def emit(record: dict) -> dict:
    print("BENCH " + json.dumps(record), flush=True)
    return record


class GpuTurn:
    """The timed part's turn on a shared GPU: an exclusive flock on `path` from take() to give() (or exit). With
    `together` = N, take() first waits (at most `patience` s) until N processes of the phase are ready (a file each
    in `path`.ready/) or have failed (`fail()`): then none is compiling while another is timed. The lock alone
    was not enough: a step that is not a CUDA graph (the peer's) ran at half speed while the others compiled on
    every core."""

    def __init__(self, path: str | None, together: int = 0, patience: float = 600.0):
        self.path, self.file, self.waited_s = path, None, 0.0
        self.together, self.patience = together, patience

    def _mark(self, what: str) -> None:
        if self.path and self.together:
            ready = Path(self.path + ".ready")
            ready.mkdir(parents=True, exist_ok=True)
            (ready / f"{what}-{os.getpid()}").touch()

    def fail(self) -> None:
        self._mark("failed")

    def take(self) -> None:
        if self.path and self.file is None:
            sync()
            t = time.perf_counter()
            if self.together:
                self._mark("ready")
                while (len(list(Path(self.path + ".ready").iterdir())) < self.together
                       and time.perf_counter() - t < self.patience):
                    time.sleep(1.0)
            self.file = open(self.path, "a")
            fcntl.flock(self.file, fcntl.LOCK_EX)
            self.waited_s += time.perf_counter() - t  # (a process may take several turns: the peer's profile)

    def give(self) -> None:
        if self.file is not None:
            sync()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


TURN = GpuTurn(None)  # main() sets it from --gpu-lock and --together


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TurnTaking(Collect):
    """Collects the logged rates; takes the GPU turn at the first log (the first interval, which holds the
    compile, is dropped anyway) and gives it back after the last step, before the final checkpoint is written.
    With a profile, a copy's bandwidth (for `bound`) is measured last in the turn, while no other process runs."""

    def __init__(self, turn: GpuTurn, take_at: int, last: int, profile_at: int = 0, window: int = 10):
        super().__init__(profile_at, window)
        self.turn, self.take_at, self.last = turn, take_at, last
        self.copy_tbps: float | None = None
        # peak memory (GiB) of the steps up to the first log (compiling, cuDNN's search over its plans, CUDA graph
        # recording) and of those after it, which is what a long run holds
        self.first_peak_gib = self.steady_peak_gib = 0.0

    def on_step(self, step: int) -> None:
        super().on_step(step)  # (--profile's window)
        if step == self.take_at:
            self.first_peak_gib = _peak_gib()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.turn.take()
        if step == self.last:
            self.steady_peak_gib = _peak_gib()
            if self.profile_at and torch.cuda.is_available():
                self.copy_tbps = copy_tbps()
            self.turn.give()


def config(args) -> RunConfig:
    sets = list(TINY if args.tiny else []) + list(args.set)
    if args.size:
        sets.append(f"model.image_size={args.size}")
    if args.batch:
        sets.append(f"train.batch_size={args.batch}")
    return load_config(args.config, sets)


NORM_PASSES = 5  # the least passes over a GroupNorm's input a training step makes, the norm kept apart from the
# convolutions: the forward reads it and writes the normalised output (its statistics taken in the producer's
# pass, free); the backward reads the output's gradient and the input and writes the input's gradient, in one pass
GROUPNORM_PASSES = 8  # the same with the statistics as kernels must take them (a cuDNN convolution yields none):
# forward, one pass for the statistics and the read and write of the normalised (and SiLU'd) output, kept for the
# next convolution's weight gradient; backward, one pass reading the input and the output's gradient for the
# reductions, then the input's gradient from both (3 + 5)


def flops_per_image(cfg: RunConfig) -> tuple[float, float, int, int]:
    """(forward + backward FLOPs, forward FLOPs, elements into GroupNorms, elementwise floor) for one image,
    counted on the meta device (no memory, no time). The floor is the least elements any kernels outside cuDNN's
    convolutions, attention and GEMMs must read and write in a training step, however fused (GROUPNORM_PASSES
    over each norm's input, residual_floor, concat_floor)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_cli.nn import unet

    h, w = cfg.model.hw
    with torch.device("meta"):
        net = build_unet(cfg.model)
        x, t = torch.randn(1, cfg.model.in_channels, h, w), torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if cfg.model.conditional else None
        normed, floor = [], []
        hooks = [m.register_forward_hook(lambda m, args, out: normed.append(args[0].numel()))
                 for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
        hooks += [m.register_forward_hook(lambda m, args, out: floor.append(residual_floor(args[0], out)))
                  for m in net.modules() if isinstance(m, (unet.ResBlock, unet.Attention))]
        run_group = unet._run_group

        def concatenating(layers, h, skip, *rest):
            if skip is not None:
                floor.append(concat_floor(h, skip, written=not isinstance(layers[0].skip, torch.nn.Identity)))
            return run_group(layers, h, skip, *rest)

        unet._run_group = concatenating
        try:
            with FlopCounterMode(display=False) as fwd:
                net(x, t, y)
        finally:
            unet._run_group = run_group
            for hook in hooks:
                hook.remove()
        with FlopCounterMode(display=False) as both:
            net(x, t, y).float().square().mean().backward()
    return both.get_total_flops(), fwd.get_total_flops(), sum(normed), GROUPNORM_PASSES * sum(normed) + sum(floor)


def residual_floor(x: torch.Tensor, out: torch.Tensor) -> int:
    """The elements a training step must move for a residual sum (a ResBlock's or an Attention's, `x` its input),
    beyond its GroupNorms' GROUPNORM_PASSES, with perfect fusion and cuDNN's convolutions as they are: the forward
    writes the sum (the next norm's statistics pass reads its two terms: one read more), the backward adds the
    skip path's gradient into the input's (one read of the input's size)."""
    return 2 * out.numel() + x.numel()


def concat_floor(h: torch.Tensor, skip: torch.Tensor, written: bool) -> int:
    """The same for an up block's concatenation of the up path's `h` and the down path's `skip`: the forward writes
    it where a 1x1 skip convolution reads it whole (`written`); the backward adds the down path's half of its
    gradient to that tensor's other gradient (one read of that half)."""
    return (h.numel() + skip.numel()) * written + skip.numel()


def describe(cfg: RunConfig, args) -> dict:
    train_flops, fwd_flops, normed, floor = flops_per_image(cfg)
    return {"config": Path(args.config).name if args.config else None, "image_size": list(cfg.model.hw),
            "params_m": round(count_params(build_unet(cfg.model)) / 1e6, 2),
            "train_gflop_per_image": round(train_flops / 1e9, 3), "fwd_gflop_per_image": round(fwd_flops / 1e9, 3),
            "norm_min_mb_per_image": round(NORM_PASSES * 2 * normed / 1e6, 2),  # bf16 passes
            "floor_mb_per_image": round(2 * floor / 1e6, 2),
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}


def cmd_train(args) -> dict:
    cfg = config(args)
    info = describe(cfg, args)
    data = {}
    if args.data:
        data = {"dataset": "folder", "root": args.data}
    with tempfile.TemporaryDirectory() as tmp:
        raw = cfg.model_dump(mode="json")
        raw["data"].update(data)
        raw["train"].update(steps=args.steps, compile_ahead=False)  # the compiled step from the first
        raw["logging"].update(run_dir=tmp, run_name="bench", log_every=args.log_every, checkpoint_every=10**9,
                              sample_every=10**9, sample_count=4, sample_steps=2)
        cfg = validate_config(raw)
        images = None
        if not args.data:  # random images, as many as a few batches, resident like a small real set
            h, w = cfg.model.hw
            n = max(4 * cfg.train.batch_size, 64)
            images = ImageSet(torch.randint(0, 256, (n, cfg.model.in_channels, h, w), dtype=torch.uint8),
                              torch.zeros(n, dtype=torch.long), [])
        window = min(10, args.steps // 3)  # --profile: the steps before the last `window` + 1 are timed
        cb = TurnTaking(TURN, take_at=args.log_every, last=args.steps,
                        profile_at=args.steps - window - 1 if args.profile else 0, window=window)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = Trainer(cfg, callbacks=cb, dataset=images).run()
        total = time.perf_counter() - t0
    steady = cb.rates[2:] if len(cb.rates) > 4 else cb.rates[1:] or cb.rates
    # under CUDA graphs a replay allocates nothing (the graph's pool is taken when it is recorded, among the first
    # steps), so the steps after the first log show no peak of their own: no steady figure then
    device = resolve_device(cfg.train.device)
    mode = compile_mode(cfg, device)
    graphed = mode is not None and compile_options(cfg, device, mode).get("triton.cudagraphs", False)
    rate = statistics.median(steady) if steady else float("nan")
    return emit({"kind": "train", **info, "batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                 "checkpointing": cfg.model.checkpointing, "data": args.data and f"folder, streaming "
                 f"{cfg.data.streaming}", "img_per_s": round(rate, 1), "first_step_s": round(res.compile_s, 1),
                 "run_s": round(total, 1), "peak_mem_gib": round(max(_peak_gib(), cb.first_peak_gib), 2),
                 "first_steps_peak_gib": round(cb.first_peak_gib, 2),
                 "steady_peak_gib": None if graphed else round(cb.steady_peak_gib, 2),
                 "windows": len(steady),
                 "waited_s": round(TURN.waited_s, 1),
                 "tflops": round(rate * info["train_gflop_per_image"] / 1000, 1),
                 "share_of_peak": round(rate * info["train_gflop_per_image"] / 1000 / args.peak, 3),
                 **per_step(cb.breakdown, window, rate and cfg.train.batch_size / rate),
                 **bound(cb.breakdown, window, info["norm_min_mb_per_image"] * cfg.train.batch_size / 1e3,
                         cb.copy_tbps, info["floor_mb_per_image"] * cfg.train.batch_size / 1e3)})


BOUND_KINDS = ("convolution", "attention", "gemm", "optimizer / EMA")  # kept at their measured time


def bound(breakdown: dict[str, float] | None, steps: int, norm_gb: float, tbps: float | None,
          floor_gb: float = 0.0) -> dict:
    """--profile: the least a step could take with cuDNN's convolutions as they ran: the profiled GPU time of the
    convolutions, attention, GEMMs and optimizer, plus the GroupNorms' least traffic (NORM_PASSES passes over each
    input, `norm_gb` a step) at a copy's bandwidth on this card (`tbps`: copy_tbps, in the GPU turn), and nothing
    else (no other elementwise work, no idle time). Where this exceeds half the peer's step, 2x the peer is out of
    reach for any GroupNorm kernel kept apart from the convolutions (the normalisation would have to move into
    them). With `floor_gb` (describe's elementwise floor, a step), the same with that instead of the norms' least
    traffic: `floor_step_ms`, the least a step could take with every elementwise kernel fused as far as it can be."""
    if not breakdown or not tbps:
        return {}
    kept = sum(breakdown.get(k, 0.0) for k in BOUND_KINDS) / steps
    got = {"kept_ms": round(kept, 2), "norm_min_gb": round(norm_gb, 2), "copy_tbps": round(tbps, 3),
           "step_ms": round(kept + norm_gb / tbps, 2)}
    if floor_gb:
        got.update(floor_gb=round(floor_gb, 2), floor_step_ms=round(kept + floor_gb / tbps, 2))
    return {"bound": got}


def copy_tbps(gib: float = 1.0, reps: int = 20) -> float:
    """A device-to-device copy's bandwidth (bytes read and written, TB/s): what a memory-bound kernel can reach."""
    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * x.numel() * 2 * reps / (start.elapsed_time(end) / 1000) / 1e12


def per_step(breakdown: dict[str, float] | None, steps: int, step_s: float) -> dict:
    """--profile's GPU time by kernel kind (bench_speed.KERNEL_KINDS), ms a step, beside the step's wall time: what
    a step's time is spent on, and how much of it the GPU is busy at all."""
    if breakdown is None:
        return {}
    ms = {k: round(v / steps, 2) for k, v in breakdown.items()}
    return {"profile_ms_per_step": ms, "step_ms": round(step_s * 1000, 2),
            "gpu_busy": round(sum(ms.values()) / (step_s * 1000), 3) if step_s else None}


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def peer_unet(cfg: RunConfig, device: str):
    from diffusers import UNet2DModel

    from ddpm_cli.engine.diffusers_format import unet_config_from_model

    unet_cfg = {k: v for k, v in unet_config_from_model(cfg.model).items() if not k.startswith("_")}
    torch.manual_seed(0)
    return UNet2DModel(**unet_cfg).to(device)


def timed(fn, items: int, warm: int, n: int, window: int = 10) -> tuple[float, float]:
    """(items per second, the median over windows of `window` calls, n calls in all, timed in the GPU turn;
    seconds of the first `warm` calls)."""
    t = time.perf_counter()
    for _ in range(warm):
        fn()
    sync()
    first = time.perf_counter() - t
    TURN.take()
    rates = []
    for start in range(0, n, window):
        calls = min(window, n - start)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rates.append(items * calls / (time.perf_counter() - t))
    TURN.give()
    return statistics.median(rates), first


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_peer(args) -> dict:
    """The peer's compiled training step on the same network, batch and image size."""
    import torch.nn.functional as F

    cfg = config(args)
    info = describe(cfg, args)
    device = device_name()
    m = peer_unet(cfg, device).train().to(memory_format=torch.channels_last)
    net = torch.compile(m) if device == "cuda" else m
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.train.lr)
    b, (h, w) = cfg.train.batch_size, cfg.model.hw
    x0 = torch.randn(b, cfg.model.in_channels, h, w, device=device).to(memory_format=torch.channels_last)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)

    def step():
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        with torch.autocast(device, torch.bfloat16):
            out = net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
        loss = F.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate, first = timed(step, b, warm=3, n=args.steps)
    window, breakdown = min(10, args.steps), None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        from bench_speed import kernel_breakdown, triton_kernels

        TURN.take()  # profiled in a turn of its own: the kernels' times are its alone (on 2026-12-07 a profile
        # taken after the turn ran beside the next process's timed steps and slowed both)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])) as prof:
            for _ in range(window):
                step()
            sync()
        TURN.give()
        breakdown = kernel_breakdown(prof)
        print("BENCH profile " + json.dumps(breakdown), flush=True)
        triton_kernels(prof, window, "peer-step")
    return emit({"kind": "peer-train", **info, "batch": b, "img_per_s": round(rate, 1), "first_steps_s":
                 round(first, 1), "peak_mem_gib": round(_peak_gib(), 2), "waited_s": round(TURN.waited_s, 1),
                 "share_of_peak": round(rate * info["train_gflop_per_image"] / 1000 / args.peak, 3),
                 **per_step(breakdown, window, b / rate)})


def cmd_sample(args) -> dict:
    """Network evaluations per second while sampling: ours through engine.generate (DDIM, compiled as `ddpm
    sample` compiles), the peer's compiled forward alone (it does less: no sampler arithmetic)."""
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine.generate import generate, inference_net

    cfg = config(args)
    info = describe(cfg, args)
    device = device_name()
    b, (h, w) = args.sample_batch, cfg.model.hw
    compile_mode = "default" if device == "cuda" else None
    if args.peer:
        m = peer_unet(cfg, device).eval().to(memory_format=torch.channels_last)
        net = torch.compile(m) if compile_mode else m
        xs = torch.randn(b, cfg.model.in_channels, h, w, device=device).to(memory_format=torch.channels_last)
        ts = torch.full((b,), 500, device=device)

        @torch.no_grad()
        def fwd():
            with torch.autocast(device, torch.bfloat16):
                return net(xs, ts).sample
        rate, first = timed(fwd, b, warm=3, n=args.steps)
        return emit({"kind": "peer-sample", **info, "batch": b, "nfe_per_s": round(rate, 1),
                     "first_calls_s": round(first, 1), "waited_s": round(TURN.waited_s, 1)})
    torch.manual_seed(0)
    model = build_unet(cfg.model).to(device)
    with torch.no_grad():  # zero-initialised output layers: perturb them, so no work is trivially skippable
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    diffusion = build_diffusion(cfg.diffusion).to(device)
    net = inference_net(model, channels_last=device == "cuda", compile=compile_mode)

    def run(steps: int) -> None:
        for _ in generate(net, diffusion, b, SamplerSpec("ddim", steps), image_shape=(cfg.model.in_channels, h, w),
                          batch_size=b, seed=1, device=device, bf16=device == "cuda"):
            pass
        sync()

    t = time.perf_counter()
    run(2)
    first = time.perf_counter() - t
    TURN.take()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run(args.steps)
        times.append(time.perf_counter() - t)
    TURN.give()
    return emit({"kind": "sample", **info, "batch": b, "nfe_per_s": round(b * args.steps / statistics.median(times), 1),
                 "first_call_s": round(first, 1), "peak_mem_gib": round(_peak_gib(), 2),
                 "waited_s": round(TURN.waited_s, 1)})


def cmd_largest(args) -> dict:
    """The largest training batch that fits: an eager bf16 channels-last step (forward, backward, Adam) at two
    batches gives fixed + per-image memory; the predicted largest (a multiple of 8) is run to confirm it, and
    smaller ones while it does not fit."""
    from ddpm_cli.nn.unet import activation_checkpointing

    cfg = config(args)
    info = describe(cfg, args)
    device = device_name()
    if device != "cuda":
        raise SystemExit("largest: needs a CUDA GPU")
    model = activation_checkpointing(build_unet(cfg.model), cfg.model.checkpointing).to(device).to(
        memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    (h, w), c = cfg.model.hw, cfg.model.in_channels

    def peak(batch: int) -> float | None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            x = torch.randn(batch, c, h, w, device=device).to(memory_format=torch.channels_last)
            t = torch.randint(0, 1000, (batch,), device=device)
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(x, t).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            return None
        finally:
            x = t = loss = None  # noqa: F841 (frees the activations before the next try)

    small, large = args.probe
    peak(small)  # the first step allocates Adam's state and cuDNN's workspaces
    m_small, m_large = peak(small), peak(large)
    per_image = (m_large - m_small) / (large - small)
    capacity = torch.cuda.get_device_properties(0).total_memory
    fixed = m_small - small * per_image
    batch = int((capacity * 0.98 - fixed) / per_image) // 8 * 8
    tried = []
    while batch > large:
        got = peak(batch)
        tried.append(batch)
        if got is not None:
            break
        batch = int(batch * 0.9) // 8 * 8
    return emit({"kind": "largest", **info, "checkpointing": cfg.model.checkpointing,
                 "mib_per_image": round(per_image / 2**20, 1), "fixed_gib": round(fixed / 2**30, 2),
                 "card_gib": round(capacity / 2**30, 1), "largest_batch": batch, "tried": tried,
                 "peak_gib_at_largest": round((got or 0) / 2**30, 1)})


def cmd_describe(args) -> dict:
    """The network's counts alone, on the CPU (meta tensors: no memory, no time): FLOPs per image, the GroupNorms'
    least traffic and the elementwise floor, for `bound` against a profile taken earlier."""
    return emit({"kind": "describe", **describe(config(args), args)})


def cmd_folder(args) -> None:
    """`count` built-in shapes as JPEG files at `size`, in class folders: a set to stream from."""
    from bench_streaming import make_folder

    make_folder(Path(args.dir), args.count, args.size, ext="jpg")
    print(f"BENCH {json.dumps({'kind': 'folder', 'dir': args.dir, 'count': args.count, 'size': args.size})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "peer", "sample", "largest", "describe"):
        p = sub.add_parser(name)
        p.add_argument("-c", "--config", default=str(ROOT / "examples" / "ddpm-256.yaml"))
        p.add_argument("--size", help="model.image_size instead of the config's (e.g. 128 or [192,256])")
        p.add_argument("--batch", type=int, help="train.batch_size instead of the config's")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
        p.add_argument("--steps", type=int, default=60, help="steps timed (training) or sampler steps")
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--peak", type=float, default=H200_BF16_TFLOPS, help="the card's bf16 TFLOP/s")
        p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
        p.add_argument("--data", help="train: a folder or .zip of images instead of random ones")
        p.add_argument("--peer", action="store_true", help="sample: the peer's forward instead of ours")
        p.add_argument("--profile", action="store_true", help="train, peer: after the timing, profile up to 10 "
                       "steps and add their GPU time by kernel kind (ms a step) to the line")
        p.add_argument("--kernels", action="store_true", help="train, peer: with --profile, the bytes each fused "
                       "Triton kernel moves and the bandwidth it reaches (compiles with inductor's benchmark_kernel)")
        p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                       help="inductor config, e.g. coordinate_descent_tuning=True")
        p.add_argument("--cudnn-limit", type=int, metavar="N", help="cuDNN's benchmark tries this many "
                       "convolution plans (torch.backends.cudnn.benchmark_limit; torch's default 10, 0 = all)")
        p.add_argument("--sample-batch", type=int, default=64)
        p.add_argument("--probe", type=int, nargs=2, default=[16, 48], help="largest: the two batches measured")
        p.add_argument("--together", type=int, default=0, metavar="N",
                       help="with --gpu-lock: N processes share the GPU; time none until all are ready")
        p.add_argument("--gpu-lock", metavar="FILE", help="time only while holding an exclusive lock on FILE, so "
                       "processes compiling side by side on one GPU are timed one at a time")
    p = sub.add_parser("folder")
    p.add_argument("dir")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--count", type=int, default=4000)
    args = ap.parse_args()
    if getattr(args, "tiny", False):
        args.steps = min(args.steps, 6)
        args.log_every = 2
        args.sample_batch = 4
        args.set = ["train.device=cpu", *args.set]
    if getattr(args, "kernels", False) or getattr(args, "inductor", None):
        # compiled afresh: neither ddpm's compile cache (keyed by ddpm's own options) nor inductor's may hand back
        # kernels compiled without these options by an earlier phase
        import torch._inductor.config as inductor_config

        from bench_speed import set_inductor_options

        os.environ["DDPM_COMPILE_CACHE"] = "off"
        inductor_config.force_disable_caches = True
        inductor_config.benchmark_kernel = args.kernels
        set_inductor_options(args.inductor)
    if getattr(args, "cudnn_limit", None) is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_limit
        print(f"BENCH cudnn benchmark_limit={torch.backends.cudnn.benchmark_limit}", flush=True)
    global TURN
    TURN = GpuTurn(getattr(args, "gpu_lock", None), getattr(args, "together", 0))
    try:
        {"train": cmd_train, "peer": cmd_peer, "sample": cmd_sample, "largest": cmd_largest,
         "folder": cmd_folder, "describe": cmd_describe}[args.cmd](args)
    except BaseException:
        TURN.fail()  # the others stop waiting for this one
        raise


if __name__ == "__main__":
    main()
