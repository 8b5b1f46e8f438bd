"""An ahead-of-time compiled sampling network (AOTInductor), measured before it is built into `ddpm sample`
(issue 24's lever: a process that loads a compiled package imports no compiler and traces nothing, where the warm
compile cache still pays torch's compiler import and dynamo's trace, ~15 s of a warm `ddpm sample -n 10000`).

    PYTHONPATH=. python benchmarks/bench_aoti.py build  RUN_OR_CKPT --out net.pt2 [--batch B | --dynamic]
                                                        [--weights [--guide]]
    PYTHONPATH=. python benchmarks/bench_aoti.py sample RUN_OR_CKPT --package net.pt2 -n 10000 [--batch B]
                                                        [--guide-package guide.pt2]

build: the network as `ddpm sample` runs it (engine.generate.inference_net's switches: per-channel GroupNorm
statistics, folded upsampling; on CUDA channels-last input and bf16 autocast, inside the graph here), exported
(torch.export) for one batch shape and compiled ahead of time with the sampler's inductor options. The weights
are not in the package: they are its constants, loaded from a checkpoint when it is loaded, and those derived
from them (the folded kernels) are folded again then (aot_inductor.use_runtime_constant_folding), so one package
serves every checkpoint of the network, the model and its autoguidance guide alike. `--weights` builds the other
kind: the checkpoint's weights inside (no runtime folding), so one package a network, `--guide` for the
checkpoint's autoguidance guide; on the device (torch 2.11.0, H100, 2026-12-06) a weightless package's load
crashed the process, and this kind tells whether AOTInductor's load itself is the fault.
sample: a fresh process draws -n images with the checkpoint's default sampler through engine.draw, the model
(and guide) as loaded packages, and reports its phases from the process's start: import, checkpoint, package
loading, first batch, the rest; `--save FILE` keeps the images (.npz) to compare with `ddpm sample`'s.
One `BENCH {json}` line each."""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_cli.engine.build import resolve_device, sampler_compile_options  # noqa: E402
from ddpm_cli.engine.checkpoint import load_guide, load_model  # noqa: E402
from ddpm_cli.engine.draw import DrawOptions, Drawer, balanced_labels, draw, plan_draw  # noqa: E402
from ddpm_cli.engine.generate import default_batch, even_batch, inference_net  # noqa: E402
from ddpm_cli.engine.runs import resolve_checkpoint  # noqa: E402

IMPORTED = time.perf_counter()


class Sampled(torch.nn.Module):
    """The prepared network as generate calls it: on CUDA a channels-last input under bf16 autocast, here inside
    the exported graph (a loaded package is opaque to the autocast around it)."""

    def __init__(self, net: torch.nn.Module, cuda: bool):
        super().__init__()
        self.net, self.cuda = net, cuda

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.cuda:
            return self.net(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.net(x.contiguous(memory_format=torch.channels_last), t, y)


def prepared(model: torch.nn.Module, device: torch.device) -> Sampled:
    inference_net(model, channels_last=device.type == "cuda", compile=None)  # (switches `model` itself)
    return Sampled(model, device.type == "cuda")


def job(args) -> tuple:
    """(checkpoint path, draw plan, device, batch size) as `ddpm sample` would pick them."""
    path = resolve_checkpoint(args.checkpoint)
    plan = plan_draw(path, DrawOptions())
    device = resolve_device(args.device, "--device")
    batch = even_batch(args.n, args.batch or default_batch(plan.config.model.image_size, device.type == "cuda"))
    return path, plan, device, batch


def cmd_build(args) -> dict:
    path, plan, device, batch = job(args)
    model, _, _, ckpt = load_model(path, device, use_ema=plan.use_ema, ema_decay=plan.ema_decay)
    if args.guide:
        if plan.guidance.guide is None:
            raise SystemExit("--guide: this checkpoint samples without an autoguidance guide")
        model = load_guide(plan.guidance, ckpt, device)
    net = prepared(model, device)
    m = plan.config.model
    x = torch.randn(batch, *m.image_shape(), device=device)
    t = torch.randint(0, plan.config.diffusion.num_timesteps, (batch,), device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if m.conditional else None
    t0 = time.perf_counter()
    shapes = None
    if args.dynamic:  # one package for every batch size (inductor's kernels then take the batch as an argument)
        b = torch.export.Dim("batch", min=1, max=65536)
        shapes = {"x": {0: b}, "t": {0: b}, "y": {0: b} if y is not None else None}
    with torch.no_grad():
        program = torch.export.export(net, (x, t, y), dynamic_shapes=shapes)
    exported = time.perf_counter()
    weightless = {} if args.weights else {"aot_inductor.package_constants_in_so": False,
                                          "aot_inductor.use_runtime_constant_folding": True}
    options = {**({} if args.plain else sampler_compile_options("default", device)), **weightless,
               "aot_inductor.metadata": {"ddpm_batch": "any" if args.dynamic else str(batch),
                                         "ddpm_weights": "in" if args.weights else "out"}}
    out = torch._inductor.aoti_compile_and_package(program, package_path=str(args.out), inductor_configs=options)
    compiled = time.perf_counter()
    return emit({"kind": "aoti-build", "batch": "any" if args.dynamic else batch, "plain": args.plain,
                 "weights": "guide's" if args.guide else "model's" if args.weights else None,
                 "export_s": round(exported - t0, 1),
                 "compile_s": round(compiled - exported, 1), "bytes": Path(out).stat().st_size,
                 "device": str(device), "torch": torch.__version__})


def loaded(package: Path, weights: torch.nn.Module, batch: int):
    """The package as a network with `weights` (a prepared module's state: its names are the package's), or with
    its own if it was built with them. Every constant must be given: one left unset is a null pointer in the
    package's code (a segmentation fault, seen 2026-12-07, when the fold made its 0/1 matrix from a Python list)."""
    runner = torch._inductor.aoti_load_package(str(package))
    meta = runner.get_metadata()
    if meta.get("ddpm_weights") != "in":
        state = weights.state_dict()
        fqns = [k for k in runner.get_constant_fqns() if not k.startswith("_FOLDED_CONST_")]  # (made at load)
        missing = [k for k in fqns if k not in state]
        if missing:
            raise SystemExit(f"bench_aoti: {package} needs constants the weights do not hold: "
                             f"{', '.join(missing[:5])}; build it with --weights")
        runner.load_constants({k: state[k] for k in fqns}, check_full_update=False)
    takes = meta.get("ddpm_batch", str(batch))

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if takes != "any" and x.shape[0] != int(takes):  # a static package does not check its batch shape
            raise ValueError(f"the package takes batches of {takes}, not {x.shape[0]}")
        return runner(x, t, y)

    net.compiled = takes != "any"  # generate pads a short last batch to a static package's shape
    return net


def cmd_sample(args) -> dict:
    marks = {"import": IMPORTED}
    path, plan, device, batch = job(args)
    model, diffusion, cfg, ckpt = load_model(path, device, use_ema=plan.use_ema, ema_decay=plan.ema_decay)
    g, m = plan.guidance, cfg.model
    guide = load_guide(g, ckpt, device) if g.guide is not None else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    marks["checkpoint"] = time.perf_counter()
    net = loaded(args.package, prepared(model, device), batch)
    guide_net = None
    if guide is not None:
        guide_net = loaded(args.guide_package or args.package, prepared(guide, device), batch)
    marks["package"] = time.perf_counter()
    drawer = Drawer(net, diffusion, plan.spec, m.image_shape(), m.num_classes if m.conditional else None, g.weight,
                    guide_net, device, bf16=device.type == "cuda")
    labels = balanced_labels(args.n, m.num_classes) if m.conditional else None
    first = []
    images = draw(drawer, args.n, batch_size=batch, seed=args.seed, labels=labels,
                  on_batch=lambda done: first or first.append(time.perf_counter()))
    marks["first_batch"] = first[0]
    marks["end"] = time.perf_counter()
    if args.save:
        import numpy as np

        np.savez(args.save, images.permute(0, 2, 3, 1).numpy())
    phases, last = {}, T0
    for name, t in marks.items():
        phases[name] = round(t - last, 2)
        last = t
    return emit({"kind": "aoti-sample", "n": args.n, "batch": batch, "guided": guide is not None,
                 "phases_s": phases, "wall_s": round(marks["end"] - T0, 2), "device": str(device)})


def emit(record: dict) -> dict:
    print("BENCH " + json.dumps(record), flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "sample"):
        p = sub.add_parser(name)
        p.add_argument("checkpoint", help="a checkpoint or its run directory")
        p.add_argument("-n", type=int, default=10000, help="images (sample); with --batch, the batch build uses")
        p.add_argument("--batch", type=int, help="images per batch (default: ddpm sample's, evened over -n)")
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0)
        if name == "build":
            p.add_argument("--out", type=Path, required=True, help="the package to write (.pt2)")
            p.add_argument("--plain", action="store_true", help="inductor's default options, not the sampler's "
                           "(programmatic dependent launch on Hopper): where AOTInductor refuses those")
            p.add_argument("--dynamic", action="store_true", help="one package for any batch size")
            p.add_argument("--weights", action="store_true", help="the weights inside: a package for this network")
            p.add_argument("--guide", action="store_true", help="with --weights: the checkpoint's guide network")
        else:
            p.add_argument("--package", type=Path, required=True, help="build's package")
            p.add_argument("--guide-package", type=Path, help="the guide's own package (build --weights --guide); "
                           "default: --package, loaded with the guide's weights")
            p.add_argument("--save", type=Path, help="keep the images as an .npz (arr_0: N, H, W, C)")
    args = ap.parse_args()
    {"build": cmd_build, "sample": cmd_sample}[args.cmd](args)


if __name__ == "__main__":
    main()
