"""Speed benchmark: the full training step as `ddpm train` runs it, and the sampler's UNet evaluations/s.

    PYTHONPATH=. python benchmarks/bench_speed.py                       # every variant
    PYTHONPATH=. python benchmarks/bench_speed.py --train bf16-cl-compile --sample bf16-cl-compile
    PYTHONPATH=. python benchmarks/bench_speed.py --e2e                 # also 10,000 images with DDIM-100
    PYTHONPATH=. python benchmarks/bench_speed.py --train bf16-cl-cudagraphs \
        --set train.ema_extra=[0.9998,0.9999] --set train.max_time=100000   # a recipe's own training settings

Training: the engine's own Trainer (data resident on the GPU, random flips, bf16 autocast, clipping, fused Adam,
EMA, metrics) on a CIFAR-sized random uint8 dataset, DDPM CIFAR-10 model (35.7M), batch 128 unless --set says
otherwise; `--set` changes the config of every training variant as `ddpm train --set` does. img/s is the median
of the logged intervals after warm-up, as the progress bar shows it, with their 10th and 90th percentiles (a
spread that a host-bound loop widens); the first step (compilation) is reported apart. Sampling: DDIM steps at
batch 1000 through engine.generate.
Prints one line per figure (BENCH ...) and a table at the end. Run it in the same call as the peer script."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from ddpm_cli.config import validate_config
from ddpm_cli.config.loading import apply_overrides
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine.build import build_diffusion, build_unet, count_params
from ddpm_cli.engine.data import ImageSet
from ddpm_cli.engine import generate as generate_mod
from ddpm_cli.engine.generate import generate, inference_net
from ddpm_cli.engine.train import TrainCallbacks, Trainer
from ddpm_cli.nn import unet

TRAIN_VARIANTS = {
    "fp32": {"precision": "fp32", "compile": "off", "channels_last": "off"},
    "bf16": {"precision": "bf16", "compile": "off", "channels_last": "off"},
    "bf16-cl": {"precision": "bf16", "compile": "off", "channels_last": "on"},
    "bf16-cl-compile": {"precision": "bf16", "compile": "on", "channels_last": "on"},
    "bf16-compile": {"precision": "bf16", "compile": "on", "channels_last": "off"},
    "bf16-cl-cudagraphs": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "on"},
    "bf16-cudagraphs": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "off"},
    "bf16-cudagraphs-clgraph": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "off",
                             "_force_layout": True},  # NCHW weights, channels-last graph
    "bf16-cl-autotune": {"precision": "bf16", "compile": "max-autotune", "channels_last": "on"},
    # the previous default: torch's GroupNorm (autocast runs it in fp32) instead of per-channel statistics
    "bf16-cl-cudagraphs-gngroup": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "on",
                                   "norm_stats": "group"},
    "bf16-cl-compile-gngroup": {"precision": "bf16", "compile": "on", "channels_last": "on", "norm_stats": "group"},
    # the default without combo kernels (train.combo_kernels, on by default since 2026-11-27)
    "bf16-cl-cudagraphs-nocombo": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "on",
                                   "combo_kernels": "off"},
    # before upsample_nearest2x: F.interpolate, whose backward is a scatter-add
    "bf16-cl-cudagraphs-interp": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "on",
                                  "_interpolate": True},
    # the upsamplings unfolded (nearest 2x, then a 3x3 convolution of the 4x larger tensor), as training ran before
    # train.fold_upsampling (2026-12-07)
    "bf16-cl-cudagraphs-nofold": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "on",
                                  "fold_upsampling": "off"},
    # one embedding projection a residual block (66 small GEMMs a step), as before unet.stacked_embeddings (2026-11-27)
    "bf16-cl-cudagraphs-nostack": {"precision": "bf16", "compile": "reduce-overhead", "channels_last": "on",
                                   "_nostack": True},
    "bf16-cl-compile-nobench": {"precision": "bf16", "compile": "on", "channels_last": "on",
                                "cudnn_benchmark": False},
}
SAMPLE_VARIANTS = {
    "fp32": dict(bf16=False, channels_last=False, compile=None),
    "bf16": dict(bf16=True, channels_last=False, compile=None),
    "bf16-cl": dict(bf16=True, channels_last=True, compile=None),
    "bf16-cl-compile": dict(bf16=True, channels_last=True, compile="default"),
    "bf16-cl-cudagraphs": dict(bf16=True, channels_last=True, compile="reduce-overhead"),
    "bf16-compile": dict(bf16=True, channels_last=False, compile="default"),
    "bf16-cudagraphs": dict(bf16=True, channels_last=False, compile="reduce-overhead"),
    "bf16-cl-autotune": dict(bf16=True, channels_last=True, compile="max-autotune"),
    "bf16-cl-compile-force": dict(bf16=True, channels_last=True, compile="default", force_layout=True),
    "bf16-cl-cudagraphs-force": dict(bf16=True, channels_last=True, compile="reduce-overhead", force_layout=True),
    "bf16-cl-compile-gngroup": dict(bf16=True, channels_last=True, compile="default", norm_stats=False),
    # the default folds each upsampling into a transposed convolution and compiles with PDL on Hopper (since
    # 2026-11-27); these take one or both back
    "bf16-cl-compile-nofold": dict(bf16=True, channels_last=True, compile="default", fold=False),
    "bf16-cl-compile-nopdl": dict(bf16=True, channels_last=True, compile="default", pdl=False),
    "bf16-cl-compile-before": dict(bf16=True, channels_last=True, compile="default", fold=False, pdl=False),
    # each 4x4 kernel built once, before compiling (as exports do), not in every forward
    "bf16-cl-compile-frozen": dict(bf16=True, channels_last=True, compile="default", frozen=True),
    # one embedding projection a residual block, as before unet.stacked_embeddings (2026-11-27)
    "bf16-cl-compile-nostack": dict(bf16=True, channels_last=True, compile="default", stack=False),
    "bf16-cl-cudagraphs-nostack": dict(bf16=True, channels_last=True, compile="reduce-overhead", stack=False),
}
PEAK_TFLOPS = 790.0      # measured bf16 matmul peak of an H100 here (KINDS.md)
TRAIN_GFLOP = 37.5       # forward + backward per image, DDPM CIFAR-10 UNet
FWD_GFLOP = 12.5         # forward per image


def per_block_embeddings(blocks: tuple[unet.ResBlock, ...], emb: torch.Tensor) -> list[torch.Tensor]:
    """One embedding projection a residual block (66 small GEMMs a training step): what unet.stacked_embeddings
    replaced, patched in for the -nostack variants. The package ships no switch for it."""
    return [b.emb(emb) for b in blocks]


def inference_net_variant(model: torch.nn.Module, *, channels_last: bool, compile: str | None,
                          norm_stats: bool | None = None, fold: bool = True, pdl: bool = True):
    """engine.generate.inference_net with one of its speed switches taken back, for the variants that measure
    them (the package ships no switches for them): torch's GroupNorm (`norm_stats` False), no upsampling fold,
    no programmatic dependent launch. inference_net sets the first two on the model itself and torch.compile
    traces at the first call, so switching them back right after it is in time."""
    options = generate_mod.sampler_compile_options
    if not pdl:
        generate_mod.sampler_compile_options = lambda mode, device: {
            k: v for k, v in options(mode, device).items() if k != "triton.enable_pdl"}
    try:
        net = inference_net(model, channels_last=channels_last, compile=compile)
    finally:
        generate_mod.sampler_compile_options = options
    if norm_stats is not None:
        unet.channel_stats(model, norm_stats)
    if not fold:
        unet.fold_upsampling(model, False)
    return net


class Collect(TrainCallbacks):
    """The logged img/s and losses of a run; with `profile_at`, a profile of the `window` steps after that step
    (printed, and its kernel breakdown kept in `breakdown`, ms over the window)."""

    def __init__(self, profile_at: int = 0, window: int = 10):
        self.rates: list[float] = []
        self.losses: list[float] = []
        self.prof = None
        self.profile_at, self.window = profile_at, window
        self.breakdown: dict[str, float] | None = None

    def on_step(self, step: int) -> None:
        if not self.profile_at:
            return
        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if step == self.profile_at:
            from torch.profiler import ProfilerActivity, profile

            sync()
            kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.prof = profile(activities=kinds, record_shapes=True)
            self.prof.__enter__()
        elif step == self.profile_at + self.window and self.prof is not None:
            sync()
            self.prof.__exit__(None, None, None)
            print(self.prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                                 row_limit=30, max_name_column_width=70), flush=True)
            self.breakdown = kernel_breakdown(self.prof)
            print("BENCH profile " + json.dumps(self.breakdown), flush=True)
            print("BENCH copies " + json.dumps(copy_shapes(self.prof)), flush=True)
            triton_kernels(self.prof, self.window, "train-step")
            print_copy_sources(self.prof)
            self.prof = None

    def on_log(self, rec: dict) -> None:
        if "img_per_s" in rec:
            self.rates.append(rec["img_per_s"])
            self.losses.append(round(rec["loss"], 5) if rec.get("loss") is not None else None)


# First match wins. Triton kernels come before convolutions: inductor names a fused kernel after the ops it
# fuses (`triton_poi_fused_add_convolution_...` adds a convolution's bias); cuDNN's attention kernels
# (`cudnn_generated_..._sdpa_...`) come before the convolutions' "cudnn". Before 2026-11-27 the order was
# convolution first, which counted both as convolution time.
KERNEL_KINDS = (("layout transposes", ("nchwToNhwc", "nhwcToNchw")),
                ("fused triton", ("triton",)),
                ("attention", ("flash", "fmha", "attention", "sdpa")),
                ("convolution", ("conv", "xmma", "cudnn", "implicit_gemm", "dgrad", "wgrad", "fprop", "cutlass")),
                ("gemm", ("gemm", "sm90", "nvjet")),
                ("optimizer / EMA", ("adam", "foreach", "multi_tensor", "lerp")),
                ("copies", ("copy", "memcpy", "memset", "fill")))


def kernel_breakdown(prof) -> dict:
    """GPU time of the profiled window by kernel kind, in ms: where a step's time goes."""
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CPU"):
            continue
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        ranges = ("Torch-Compiled Region", "CompiledFunction")  # and "## Call CompiledFxGraph", "Optimizer.step#"
        if not us or getattr(e, "is_user_annotation", False) or "#" in e.key or e.key.startswith(ranges):
            continue  # a range around kernels, not a kernel: counting it would count its kernels twice
        name = e.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(x.lower() in name for x in keys)), "other")
        out[kind] = out.get(kind, 0.0) + us / 1000
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def set_inductor_options(pairs: list[str]) -> None:
    """Inductor's global config from KEY=VALUE pairs (`functorch.KEY` for AOTAutograd's, e.g. the partitioner's
    activation_memory_budget; values read as JSON where they parse: true/false, numbers), each said in a BENCH
    line; an option this torch lacks is said and skipped, so a run measures without it rather than failing."""
    import torch._functorch.config as functorch_config

    for kv in pairs:
        key, _, value = kv.partition("=")
        config, name = (functorch_config, key[len("functorch."):]) if key.startswith("functorch.") else \
            (inductor_config, key)
        try:
            parsed = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except ValueError:
            parsed = value
        try:
            setattr(config, name, parsed)  # (torch's config modules refuse a name they lack)
        except AttributeError:
            print(f"BENCH inductor has no option {key} in torch {torch.__version__}; running without it", flush=True)
            continue
        print(f"BENCH inductor {key}={getattr(config, name)!r}", flush=True)


def pointer_dtypes(signature: dict) -> str | None:
    """A kernel's buffers by role and dtype from its Triton signature ({'in_ptr0': '*bf16', ...}), as 'in bf16
    fp32, in-out bf16, out 2 fp32': which of the bytes it moves are fp32 (twice a bf16 activation's)."""
    roles: dict[str, dict[str, int]] = {}
    for arg, kind in signature.items():
        role = next((r for r in ("in_out", "in", "out") if arg.startswith(f"{r}_ptr")), None)
        if role is not None and isinstance(kind, str) and kind.startswith("*"):
            counts = roles.setdefault(role.replace("_", "-"), {})
            counts[kind[1:]] = counts.get(kind[1:], 0) + 1
    if not roles:
        return None
    return ", ".join(f"{role} " + " ".join(f"{n} {t}" if n > 1 else t for t, n in counts.items())
                     for role, counts in sorted(roles.items(), key=lambda kv: ("in", "in-out", "out").index(kv[0])))


def kernel_meta() -> dict[str, tuple[float | None, str | None, str | None]]:
    """Each compiled Triton kernel by name: the GB it moves per call as inductor estimates it (recorded only when
    `inductor_config.benchmark_kernel` was on while compiling: `--kernels`), the file of its source, and its
    buffers' dtypes (`pointer_dtypes`). Found among
    the live objects: torch 2.11's PyCodeCache no longer lists the modules it loaded (its `modules` was empty on the
    device, 2026-12-06, and a 256 px profile came back without a byte count)."""
    import gc

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    out = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), CachingAutotuner):  # (type(): isinstance fails on a dead weak proxy)
            continue
        meta = getattr(obj, "inductor_meta", None) or {}
        source = getattr(getattr(obj, "fn", None), "fn", None)  # the kernel's JITFunction, then its Python function
        name = meta.get("kernel_name") or getattr(source, "__name__", None)
        if name:
            code = getattr(source, "__code__", None)
            # the autotuner's own `filename` first: its function's code object names no file once the kernel came
            # from inductor's cache (a 256 px profile's sources were all unreadable so, 2026-12-06)
            file = getattr(obj, "filename", None) or (code.co_filename if code else None)
            signature = (getattr(obj, "triton_meta", None) or {}).get("signature") or {}
            out[name] = (meta.get("kernel_num_gb"), file, pointer_dtypes(signature))
    return out


def print_slow_kernel_sources(rows: list[dict], label: str, most: int = 3, longest: int = 3) -> None:
    """The generated source of the slowest-per-byte kernels that cost a step real time (over 1 TB/s short of
    the ~3 TB/s the others reach, and over 0.1 ms a step): its load and store index expressions show which
    input is read across the grain; and of the `longest` kernels of a step (`rows` is longest first), at the
    roof or not: their loads and stores count the passes a step's largest kernels make."""
    slow = [r for r in rows if r["gb"] and r["us"] > 100 and r["gb"] / r["us_per_call"] * 1e3 < 1.0][:most]
    for r in slow + [r for r in rows[:longest] if r not in slow]:
        print(f"BENCH kernel-source {label} {r['name']} ({r['us']:.0f} us a step):", flush=True)
        try:
            lines = Path(r["file"]).read_text().splitlines()
        except (OSError, TypeError) as e:
            print(f"BENCH kernel-source unreadable: {e}", flush=True)
            continue
        # the file may be a graph's whole wrapper, holding every kernel's source: start at this one's decorators
        at = next((i for i, line in enumerate(lines) if line.startswith(f"def {r['name']}(")), None)
        if at is None:
            print(f"BENCH kernel-source: no def {r['name']} in {r['file']}", flush=True)
            continue
        start = at  # back over the decorators and their arguments, up to the blank line before them
        while start > 0 and lines[start - 1].strip() and lines[start - 1].startswith(("@", " ", ")")):
            start -= 1
        # each line marked, so that the scripts that keep only BENCH lines (bigimg_run.sh's log) keep the source
        print("\n".join(f"BENCH src {line}" for line in lines[start:at + 120]), flush=True)


def triton_kernels(prof, per: int, label: str, top: int = 30) -> None:
    """The fused Triton kernels of the profiled window, per step (or forward): how many, how long, and the
    bandwidth each reached from the bytes inductor says it moves. Kernels far below the ~3 TB/s a copy reaches
    are the ones worth rewriting; many short calls mean time lost to kernel tails, not to bytes."""
    try:
        meta = kernel_meta()
    except (ImportError, AttributeError) as e:  # inductor internals: a table without bytes beats no table
        print(f"BENCH triton {label}: no byte counts ({type(e).__name__}: {e})", flush=True)
        meta = {}
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if e.key.startswith("triton_") and us and not str(getattr(e, "device_type", "")).endswith("CPU"):
            gb, file, dtypes = meta.get(e.key, (None, None, None))
            rows.append({"name": e.key, "calls": e.count / per, "us": us / per, "us_per_call": us / e.count,
                         "gb": gb, "file": file, "dtypes": dtypes})
    rows.sort(key=lambda r: -r["us"])
    known = [r for r in rows if r["gb"]]
    moved = sum(r["gb"] * r["calls"] for r in known)
    summary = {"kernels": len(rows), "calls": round(sum(r["calls"] for r in rows), 1),
               "ms": round(sum(r["us"] for r in rows) / 1000, 2),
               "ms_in_calls_under_10us": round(sum(r["us"] for r in rows if r["us_per_call"] < 10) / 1000, 2),
               "gb_moved": round(moved, 2), "with_bytes": len(known),
               "tb_per_s": round(moved / max(sum(r["us"] for r in known), 1e-9) * 1e3, 2) if known else None}
    print(f"BENCH triton-summary {label} " + json.dumps(summary), flush=True)
    for r in rows[:top]:
        bw = f"{r['gb'] / r['us_per_call'] * 1e3:6.2f} TB/s" if r["gb"] else "   ?"
        gbs = f"{r['gb'] * 1e3:7.1f} MB" if r["gb"] else "      ?"
        print(f"BENCH triton {label} {r['us']:7.1f} us {r['calls']:5.1f}x {r['us_per_call']:7.1f} us/call {gbs} "
              f"{bw}  {r['name'][:90]}" + (f"  [{r['dtypes']}]" if r.get("dtypes") else ""), flush=True)
    print_slow_kernel_sources(rows, label)


def copy_shapes(prof, top: int = 12) -> list[dict]:
    """The eager copies of the profiled window by input shape (which tensors get converted or made contiguous:
    where the ~2 ms a step of copies come from), largest time first (GPU time on CUDA, CPU time elsewhere)."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::_to_copy", "aten::clone", "aten::copy_", "aten::contiguous"):
            continue
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) or e.cpu_time_total
        if us:
            rows.append({"op": e.key, "calls": e.count, "ms": round(us / 1000, 2),
                         "shapes": str(e.input_shapes)[:160]})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def _tensor_meta(v) -> str | None:
    if hasattr(v, "sizes") and hasattr(v, "strides"):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.sizes)}s{list(v.strides)}"
    return None


def print_copy_sources(prof, top: int = 15) -> None:
    """Which op makes the eager copies of the profiled window, and of what: each copy with its input's dtype,
    shape and strides, under its parent op with the parent's tensor inputs (e.g. a convolution backward making
    its grad_output contiguous), counted over the window."""
    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    def metas(n) -> list[str]:
        return [m for v in getattr(n.extra_fields, "inputs", []) if (m := _tensor_meta(v))]

    def numel(v) -> int:
        return math.prod(v.sizes) if hasattr(v, "sizes") else 0

    seen: dict[tuple, list[int]] = {}  # -> [count, elements copied]
    for n in walk(prof.profiler.kineto_results.experimental_event_tree()):
        if n.name not in ("aten::contiguous", "aten::_to_copy"):  # clone/copy_ sit under these
            continue
        size = sum(numel(v) for v in getattr(n.extra_fields, "inputs", [])[:1])
        if size < 2:  # scalars (step counters, flags): not the activation-sized copies this hunts
            continue
        par = n.parent
        while par is not None and par.name in ("aten::to", "aten::contiguous"):
            par = par.parent
        key = (n.name, tuple(metas(n)), par.name if par is not None else "-", tuple(metas(par)) if par else ())
        entry = seen.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += size
    for (name, ins, parent, pins), (count, size) in sorted(seen.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"BENCH copy-source {count}x {name} {list(ins)} <- {parent} {list(pins)[:4]}", flush=True)


TINY = {"image_size": 32, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
        "attention_resolutions": [16], "norm_groups": 4}


def bench_train(name: str, sets: dict, batch: int, steps: int, log_every: int, images: ImageSet,
                model: dict, profile: bool = False, overrides: list[str] = ()) -> dict:
    sets = dict(sets)
    inductor_config.force_layout_optimization = sets.pop("_force_layout", False)  # the Trainer may set it again
    upsample, stacked = unet.Upsample.forward, unet.stacked_embeddings
    if sets.pop("_nostack", False):
        unet.stacked_embeddings = per_block_embeddings
    if sets.pop("_interpolate", False):
        unet.Upsample.forward = lambda self, x: self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0))
    try:
        return _bench_train(name, sets, batch, steps, log_every, images, model, profile, list(overrides))
    finally:
        unet.Upsample.forward = upsample
        unet.stacked_embeddings = stacked
        torch._dynamo.reset()  # no later variant may reuse a graph traced with other switches


def _bench_train(name: str, sets: dict, batch: int, steps: int, log_every: int, images: ImageSet,
                 model: dict, profile: bool, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate_config(apply_overrides({
            "model": dict(model),
            "data": {"dataset": "shapes"},  # replaced by `images` below
            # compile_ahead off: the steps timed are the compiled step's from the first (cold caches included)
            "train": {"steps": steps, "batch_size": batch, "warmup_steps": 100, "compile_ahead": False, **sets},
            "logging": {"run_dir": tmp, "run_name": name, "log_every": log_every, "checkpoint_every": 10**9,
                        "sample_every": 10**9, "sample_count": 16, "sample_steps": 2},
        }, overrides), "bench_speed.py", overrides)
        cb = Collect(profile_at=steps - 20 if profile else 0)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, callbacks=cb, dataset=images)
        res = trainer.run()
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    steady = cb.rates[2:] if len(cb.rates) > 4 else cb.rates[1:]
    rate = statistics.median(steady)
    spread = statistics.quantiles(steady, n=10)[::8] if len(steady) > 1 else [rate, rate]  # 10th, 90th percentile
    out = {"kind": "train", "variant": name, "batch": batch, "img_per_s": rate, "img_per_s_p10_p90": spread,
           "sets": overrides, "first_step_s": res.compile_s,
           "run_s": total, "peak_mem_gib": peak,
           "share_of_peak": rate * TRAIN_GFLOP / 1000 / PEAK_TFLOPS, "last_loss": res.last_loss,
           "loss_curve": cb.losses}
    print("BENCH " + json.dumps(out), flush=True)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def bench_sample(name: str, opts: dict, batch: int, steps: int, e2e: bool, model_cfg: dict,
                 device: str, profile: bool = False) -> list[dict]:
    stacked = unet.stacked_embeddings
    if not opts.get("stack", True):
        unet.stacked_embeddings = per_block_embeddings
    try:
        return _bench_sample(name, opts, batch, steps, e2e, model_cfg, device, profile)
    finally:
        unet.stacked_embeddings = stacked


def _bench_sample(name: str, opts: dict, batch: int, steps: int, e2e: bool, model_cfg: dict,
                  device: str, profile: bool) -> list[dict]:
    cfg = validate_config({"model": model_cfg})
    torch.manual_seed(0)
    model = build_unet(cfg.model).to(device)
    with torch.no_grad():  # zero-initialised output layers would make the work trivial to skip; perturb them
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    diffusion = build_diffusion(cfg.diffusion).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inductor_config.force_layout_optimization = opts.get("force_layout", False)
    net = inference_net_variant(model, channels_last=opts["channels_last"], compile=opts["compile"],
                                norm_stats=opts.get("norm_stats"), fold=opts.get("fold", True),
                                pdl=opts.get("pdl", True))
    if opts.get("frozen"):  # before the first call, which traces the graph
        unet.fold_upsampling(model, True, frozen=True)
    shape = (3, 32, 32)

    def run(n: int, s: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in generate(net, diffusion, n, SamplerSpec("ddim", s), image_shape=shape, batch_size=batch,
                          seed=1, device=device, bf16=opts["bf16"]):
            pass
        sync()
        return time.perf_counter() - t

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_first = run(batch, 2)  # compiles
    times = [run(batch, steps) for _ in range(3)]
    dt = statistics.median(times)
    nfe = batch * steps / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    outs = [{"kind": "sample", "variant": name, "batch": batch, "nfe_per_s": nfe, "first_call_s": t_first,
             "share_of_peak": nfe * FWD_GFLOP / 1000 / PEAK_TFLOPS, "peak_mem_gib": round(peak, 2)}]
    print("BENCH " + json.dumps(outs[-1]), flush=True)
    if profile:  # where one forward's time goes: 2 sampler steps = 2 UNet evaluations of the batch
        from torch.profiler import ProfilerActivity, profile as torch_profile

        kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=kinds, record_shapes=True) as prof:
            run(batch, 2)
        per_fwd = {k: round(v / 2, 2) for k, v in kernel_breakdown(prof).items()}
        print(prof.key_averages().table(sort_by="cuda_time_total" if device == "cuda" else "cpu_time_total",
                                        row_limit=25, max_name_column_width=70), flush=True)
        print(f"BENCH sample-profile {name} per forward of {batch} (ms) " + json.dumps(per_fwd), flush=True)
        print(f"BENCH sample-copies {name} " + json.dumps(copy_shapes(prof)), flush=True)  # ~0.7 ms a forward
        triton_kernels(prof, 2, f"sample-forward-{name}")
    if e2e:
        dt = run(10_000, 100)
        outs.append({"kind": "sample-e2e", "variant": name, "batch": batch, "images": 10_000, "steps": 100,
                     "seconds": dt, "nfe_per_s": 10_000 * 100 / dt})
        print("BENCH " + json.dumps(outs[-1]), flush=True)
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", nargs="*", help="training variants (with neither --train nor --sample: all of both)")
    p.add_argument("--sample", nargs="*", help="sampling variants")
    p.add_argument("--batch", type=int, nargs="*", default=[128], help="training batch sizes")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample-batch", type=int, nargs="+", default=[1000], help="sampler batch sizes")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--e2e", action="store_true", help="also time 10,000 images with DDIM-100 (fastest variant)")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 10 training steps and of 2 sampler "
                   "steps, and where the training step's eager copies come from")
    p.add_argument("--kernels", action="store_true", help="with --profile: also list the fused Triton kernels "
                   "with the bandwidth each reaches (compiles with inductor's benchmark_kernel, so not from the cache "
                   "of a run without it)")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="inductor config for every variant of this run, e.g. coordinate_descent_tuning=True")
    p.add_argument("--cudnn-limit", type=int, help="torch.backends.cudnn.benchmark_limit: how many cuDNN "
                   "algorithms cudnn.benchmark tries (0 = all; torch's default is 10)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config for every training variant, as `ddpm train --set` takes it (repeatable)")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, times nothing")
    a = p.parse_args()
    set_inductor_options(a.inductor)
    inductor_config.benchmark_kernel = inductor_config.benchmark_kernel or a.kernels
    if a.cudnn_limit is not None:
        torch.backends.cudnn.benchmark_limit = a.cudnn_limit
        print(f"BENCH cudnn.benchmark_limit={a.cudnn_limit}", flush=True)
    if a.train is None and a.sample is None:
        a.train, a.sample = list(TRAIN_VARIANTS), list(SAMPLE_VARIANTS)
    a.train, a.sample = a.train or [], a.sample or []  # naming one kind alone times only that kind
    model_cfg, device = ({}, "cuda") if not a.tiny else (TINY, "cpu")
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("bench_speed.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"BENCH card {card} torch {torch.__version__} "
          f"params {count_params(build_unet(validate_config({'model': model_cfg}).model)):,}", flush=True)
    g = torch.Generator().manual_seed(0)
    n_img = 2_000 if a.tiny else 50_000
    images = ImageSet(torch.randint(0, 256, (n_img, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n_img,), generator=g), [str(i) for i in range(10)])
    results = []
    for name in a.train:
        for b in a.batch:
            try:
                results.append(bench_train(name, TRAIN_VARIANTS[name], b, a.steps, a.log_every, images,
                                           model_cfg, a.profile, a.overrides))
            except Exception as e:  # keep measuring the other variants
                print(f"BENCH train {name} batch {b} failed: {type(e).__name__}: {e}", flush=True)
    sampled = []
    for name in a.sample:
        for b in a.sample_batch:
            try:
                sampled += bench_sample(name, SAMPLE_VARIANTS[name], b, a.sample_steps, False, model_cfg, device,
                                        a.profile)
            except Exception as e:
                print(f"BENCH sample {name} batch {b} failed: {type(e).__name__}: {e}", flush=True)
    results += sampled
    if a.e2e and sampled:  # 10,000 images end to end with the fastest variant (compiles again, from the cache)
        best = max(sampled, key=lambda r: r["nfe_per_s"])
        results += bench_sample(best["variant"], SAMPLE_VARIANTS[best["variant"]], best["batch"], a.sample_steps,
                                True, model_cfg, device)[1:]
    print("\n| kind | variant | batch | rate | share of bf16 peak | first call s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        rate = f"{r['img_per_s']:,.0f} img/s" if "img_per_s" in r else f"{r['nfe_per_s']:,.0f} img-NFE/s"
        share = f"{r['share_of_peak']:.1%}" if "share_of_peak" in r else f"{r.get('seconds', 0):.1f} s e2e"
        first = r.get("first_step_s", r.get("first_call_s", 0.0))
        print(f"| {r['kind']} | {r['variant']} | {r['batch']} | {rate} | {share} | {first:.1f} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
