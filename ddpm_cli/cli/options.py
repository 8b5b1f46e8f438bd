"""The sampling options `ddpm sample` and `ddpm eval` share, declared once: `@sampling_options` adds them to a
command, which receives one DrawOptions (checked when it is made; a bad value is a usage error, exit 2).
Their choices come from the sampler vocabulary (diffusion.sampler_spec, torch-free)."""
from __future__ import annotations

import functools
import inspect
from enum import Enum
from typing import Annotated, Callable, Optional

import typer

from ddpm_cli.diffusion.sampler_spec import SAMPLERS, SPACINGS, VARIANCES

Sampler = Enum("Sampler", {name: name for name in SAMPLERS}, type=str)
Spacing = Enum("Spacing", {name: name for name in SPACINGS}, type=str)
Variance = Enum("Variance", {name: name for name in VARIANCES}, type=str)
Toggle = Enum("Toggle", {name: name for name in ("auto", "on", "off")}, type=str)


def _declaration(
    sampler: Annotated[Optional[Sampler], typer.Option(
        "--sampler", show_default=False,
        help="ddpm: ancestral over all T steps; ddim: few steps, --eta; dpm++2m / dpm++3m: DPM-Solver++ of second "
             "or third order (multistep); unipc: dpm++2m's step and a corrector at no extra cost, for 5-10 steps. "
             "Default: ddim, or dpm++2m when autoguided by the checkpoint's stored guide (train.guide_step).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", show_default=False,
        help="Sampler steps (default: ddim 100, dpm++ and unipc 20; ddpm always T).")] = None,
    eta: Annotated[float, typer.Option("--eta", help="DDIM noise: 0 deterministic, 1 like DDPM.")] = 0.0,
    spacing: Annotated[Optional[Spacing], typer.Option(
        "--spacing", show_default=False,
        help="Timestep spacing of few-step samplers (default: ddim uniform, dpm++ and unipc logsnr).")] = None,
    variance: Annotated[Optional[Variance], typer.Option(
        "--variance", show_default=False,
        help="ddpm sampler's sigma^2: beta or posterior (default: the checkpoint's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        "--guidance", "-w", show_default=False,
        help="Guidance weight (1 = off): autoguidance by the checkpoint's stored guide (the default when it has "
             "one: train.guide_weight) or by --guide-model; else classifier-free for conditional models "
             "(0 = unconditional).")] = None,
    guide_model: Annotated[Optional[str], typer.Option(
        "--guide-model", show_default=False,
        help="Autoguidance by this weaker checkpoint (an earlier one of the same run, or a smaller model of the "
             "same data and schedule); `none`: not by the checkpoint's stored guide.")] = None,
    ema: Annotated[Optional[bool], typer.Option(
        "--ema/--no-ema", show_default=False,
        help="Use the EMA weights (default: when the checkpoint has them).")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(
        "--ema-decay", show_default=False,
        help="Draw from the EMA weights of this decay (train.ema_decay or one of train.ema_extra; `ddpm inspect` "
             "lists them).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=-(2**43), max=2**43,
                                      help="Seed: the same seed and options give the same images.")] = 0,
    compile: Annotated[Toggle, typer.Option(
        "--compile", help="torch.compile the network: auto (on CUDA for large jobs), on, off.")] = Toggle.auto,
) -> None:
    """The shared options, as Typer reads a command's parameters (never called)."""


SHARED = inspect.signature(_declaration, eval_str=True).parameters
OPTION_NAMES = tuple(SHARED)


def sampling_options(command: Callable) -> Callable:
    """Give `command(..., draw: DrawOptions)` the shared sampling options: Typer sees them as the command's own
    parameters (after its own), and the command gets one DrawOptions made from them."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.name != "draw"] + list(SHARED.values())

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ddpm_cli.diffusion.sampler_spec import SamplerSpec
        from ddpm_cli.engine.draw import DrawOptions

        v = {name: kwargs.pop(name) for name in OPTION_NAMES}
        value = lambda e: e.value if e is not None else None  # noqa: E731
        spec = SamplerSpec(value(v["sampler"]), v["steps"], v["eta"], value(v["spacing"]), value(v["variance"]))
        kwargs["draw"] = DrawOptions(spec, v["guidance"], v["guide_model"], v["ema"], v["ema_decay"], v["seed"],
                                     v["compile"].value)
        return command(*args, **kwargs)

    wrapper.__signature__ = own.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
