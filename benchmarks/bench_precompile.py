"""Issue 24's untried lever: torch's ahead-of-time compile of the training step (`torch.compile(...).aot_compile`,
saved with `save_compiled_function`, read back with `torch.compiler.load_compiled_function`), which a warm start
would load instead of tracing the step again with dynamo (~8 s of a warm first step on an H100: BENCHMARKS.md,
"Start-up") and loading AOTAutograd's and inductor's cache entries.

    PYTHONPATH=. python benchmarks/bench_precompile.py --work DIR               # all three, each a fresh process
    PYTHONPATH=. python benchmarks/bench_precompile.py --work DIR --phases load
    PYTHONPATH=. python benchmarks/bench_precompile.py --work DIR --what sample  # the sampler's network instead
    PYTHONPATH=. python benchmarks/bench_precompile.py --work DIR --tiny --device cpu --backend aot_eager  # the test

Phases (each a fresh Python process, the inductor cache under DIR shared by all):
  save   compile the step ahead of time from an example batch (cold: DIR's caches emptied first) and save it
  plain  the step as `ddpm train` compiles it today (torch.compile, its first call and backward), warm caches
  load   the saved step read back and called
Each reports the set-up (the engine's Trainer: config, data, network, optimizer), the compile or load, the first
step (forward, backward, optimizer), and the median of the steps after it, so the loaded step's speed is checked
against the plain one's as well as its start. The step is the trainer's own loss (its network with the speed
switches, bf16 autocast, channels-last) with the timesteps and noise drawn outside the graph. One BENCH line per
phase; a torch without the API, or a save or load that fails, says so in its line."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.base_channels=16", "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[]", "model.image_size=16", "train.batch_size=8"]


def step_loss(channels_last: bool, bf16: bool, device_type: str):
    """The trainer's `_loss` as a free function of its network and diffusion (arguments, so the saved step holds
    no reference to a Trainer)."""
    import torch

    def loss(net, diffusion, x, y, t, noise):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return diffusion.loss(net, x, y, t, noise)

    return loss


def why(e: Exception) -> str:
    """An exception in one line, for a BENCH line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def save(artifact: Path, compiled) -> dict:
    """Write an aot_compile'd function to `artifact`: the seconds, the bytes, or why it failed."""
    t = time.perf_counter()
    res = {}
    try:
        compiled.save_compiled_function(str(artifact))
    except Exception as e:
        res["save_error"] = why(e)
    res["save_s"] = round(time.perf_counter() - t, 2)
    res["bytes"] = artifact.stat().st_size if artifact.exists() else None
    return res


def run_phase(args) -> dict:
    import torch._dynamo

    # torch 2.11 has the API behind this switch (the device's torch: without it, no `aot_compile` attribute);
    # later versions have it on and may drop the switch
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        torch._dynamo.config.enable_aot_compile = True
    return run_sampler_phase(args) if args.what == "sample" else run_train_phase(args)


def run_train_phase(args) -> dict:
    import torch

    from ddpm_cli.config import load_config
    from ddpm_cli.engine.build import compile_options
    from ddpm_cli.engine.data import make_shapes
    from ddpm_cli.engine.train import Trainer

    T = time.perf_counter
    t0 = T()
    overrides = [f"train.device={args.device}", "train.compile=reduce-overhead" if args.device != "cpu"
                 else "train.compile=on", "train.compile_ahead=false", f"logging.run_dir={args.work / 'runs'}",
                 "train.guide_step=null",
                 *(TINY if args.tiny else []), *args.set]
    cfg = load_config(args.config or None, overrides)
    images = make_shapes(args.images, cfg.model.image_size)
    trainer = Trainer(cfg, dataset=images)
    device = trainer.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    n = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(args.steps + 1):
        x = (images.images[(i * n) % len(images):][:n].float() / 127.5 - 1).to(device)
        y = images.labels[:n].to(device) if cfg.model.conditional else None
        t = torch.randint(0, cfg.diffusion.num_timesteps, (x.shape[0],), generator=g).to(device)
        batches.append((x, y, t, torch.randn(x.shape, generator=g).to(device)))
    set_up = T() - t0
    fn = step_loss(trainer.channels_last, trainer.bf16, device.type)
    options = compile_options(cfg, device, trainer.compile_mode) if args.backend == "inductor" else None
    net, diffusion = trainer.net, trainer.diffusion
    artifact = args.work / "step.aot"
    out = {"phase": args.phase, "set_up_s": round(set_up, 2), "backend": args.backend,
           "mode": trainer.compile_mode, "torch": torch.__version__}
    t1 = T()
    try:
        if args.phase == "save":
            compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=args.backend, options=options)
            step = compiled.aot_compile(((net, diffusion, *batches[0]), {}))
            out["compile_s"] = round(T() - t1, 2)
        elif args.phase == "load":
            with open(artifact, "rb") as f:
                step = torch.compiler.load_compiled_function(f)
            out["load_s"] = round(T() - t1, 2)
        else:
            step = torch.compile(fn, dynamic=False, backend=args.backend, options=options)
    except Exception as e:  # a torch without the API, or one that cannot save this step: the figure is the answer
        out["error"] = why(e)
        return out
    times = []
    for i, batch in enumerate(batches):
        t2 = T()
        trainer.opt.zero_grad(set_to_none=True)
        loss = step(net, diffusion, *batch)
        loss.backward()
        trainer.opt.step()
        sync()
        times.append(T() - t2)
        if i == 0:
            out["first_step_s"] = round(times[0], 2)
            out["loss"] = round(float(loss), 5)
    out["step_ms"] = round(1000 * statistics.median(times[1:]), 3) if len(times) > 1 else None
    out["to_first_step_s"] = round(T() - t0 - sum(times[1:]), 2)
    if args.phase == "save":
        out.update(save(artifact, step))
    return out


def run_sampler_phase(args) -> dict:
    """The sampler's network as `ddpm sample` compiles it (engine.generate.inference_net's switches, its compile
    options, bf16 autocast on CUDA), called on one batch of noise: the first call, then the median call."""
    import statistics

    import torch

    from ddpm_cli.config import load_config
    from ddpm_cli.engine.build import build_unet, resolve_device, sampler_compile_options
    from ddpm_cli.nn.unet import channel_stats, fold_upsampling

    T = time.perf_counter
    t0 = T()
    cfg = load_config(args.config or None, [*(TINY if args.tiny else []), *args.set])
    device = resolve_device(args.device, "--device")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_unet(cfg.model)
    with torch.no_grad():  # weights at random: the zero-initialised output layer would make every output 0
        for w in model.parameters():
            w.normal_(0.0, 0.05)
    model = channel_stats(model.to(device).eval(), cuda)
    fold_upsampling(model, True)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    n = args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *cfg.model.image_shape(), generator=g).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((n,), 500, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device) if cfg.model.conditional else None
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    options = sampler_compile_options("default", device) if args.backend == "inductor" else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    artifact = args.work / "sampler.aot"
    out = {"phase": args.phase, "what": "sample", "set_up_s": round(T() - t0, 2), "backend": args.backend,
           "batch": n, "torch": torch.__version__}
    t1 = T()
    try:
        with torch.no_grad(), amp:
            if args.phase == "save":
                net = torch.compile(model, fullgraph=True, dynamic=False, backend=args.backend, options=options)
                call = net.forward.aot_compile(((x, t, y), {}))
                out["compile_s"] = round(T() - t1, 2)
            elif args.phase == "load":
                with open(artifact, "rb") as f:
                    call = torch.compiler.load_compiled_function(f)
                out["load_s"] = round(T() - t1, 2)
            else:
                net = torch.compile(model, dynamic=False, backend=args.backend, options=options)
                call = lambda m, *a: net(*a)  # noqa: E731 - the same calling convention as the loaded one
    except Exception as e:
        out["error"] = why(e)
        return out
    times = []
    with torch.no_grad(), amp:
        for i in range(args.steps + 1):
            t2 = T()
            eps = call(model, x, t, y)
            sync()
            times.append(T() - t2)
            if i == 0:
                out["first_call_s"] = round(times[0], 2)
                out["checksum"] = round(float(eps.float().abs().mean()), 6)
    out["call_ms"] = round(1000 * statistics.median(times[1:]), 3) if len(times) > 1 else None
    out["to_first_call_s"] = round(T() - t0 - sum(times[1:]), 2)
    if args.phase == "save":
        out.update(save(artifact, call))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the artifact and the compile caches")
    p.add_argument("--phases", default="save,plain,load,load")
    p.add_argument("--config", default=str(ROOT / "examples" / "cifar10-fast.yaml"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="inductor", help="inductor (the measurement) or aot_eager (the CPU test)")
    p.add_argument("--steps", type=int, default=30, help="steps after the first, for the median")
    p.add_argument("--images", type=int, default=512, help="built-in images made for the batches")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--what", choices=["train", "sample"], default="train", help="the training step, or the "
                   "sampler's network (forward only, the batch --batch)")
    p.add_argument("--batch", type=int, default=1000, help="--what sample: images a call")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # one phase, in this process (the child)
    args = p.parse_args()
    args.work = args.work.resolve()
    if args.phase:
        print("PHASE " + json.dumps(run_phase(args)), flush=True)
        return
    phases = args.phases.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    if "save" in phases:  # the save is the cold compile: nothing cached from an earlier call
        for d in ("inductor", "ddpm-cache"):
            shutil.rmtree(args.work / d, ignore_errors=True)
        (args.work / ("sampler.aot" if args.what == "sample" else "step.aot")).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TORCHINDUCTOR_CACHE_DIR": str(args.work / "inductor"),
           "TRITON_CACHE_DIR": str(args.work / "inductor" / "triton"),
           "DDPM_COMPILE_CACHE_DIR": str(args.work / "ddpm-cache"), "PYTHONUNBUFFERED": "1"}
    child = [sys.executable, __file__, "--work", str(args.work), "--config", args.config, "--device", args.device,
             "--backend", args.backend, "--steps", str(args.steps), "--images", str(args.images),
             "--what", args.what, "--batch", str(args.batch),
             *(["--tiny"] if args.tiny else []), *[a for s in args.set for a in ("--set", s)]]
    for phase in phases:
        t = time.perf_counter()
        r = subprocess.run([*child, "--phase", phase], capture_output=True, text=True, env=env)
        found = [json.loads(x[len("PHASE "):]) for x in r.stdout.splitlines() if x.startswith("PHASE ")]
        res = found[0] if found else {"phase": phase, "error": f"exit {r.returncode}: {r.stderr.strip()[-600:]}"}
        res["wall_s"] = round(time.perf_counter() - t, 2)
        print("BENCH " + json.dumps({"kind": "precompile", **res}), flush=True)


if __name__ == "__main__":
    main()
