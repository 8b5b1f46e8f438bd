"""Config -> objects: the device, the UNet, the diffusion process, and the speed switches' resolution."""
from __future__ import annotations

import math

import torch

from ddpm_cli.config import DiffusionConfig, ModelConfig, RunConfig
from ddpm_cli.config.schema import device_problem
from ddpm_cli.diffusion.gaussian import GaussianDiffusion
from ddpm_cli.diffusion.schedules import make_betas
from ddpm_cli.errors import DeviceError
from ddpm_cli.nn.unet import UNet


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """The device `name` names, checked to be here. `option` is where the name came from, as the user wrote it, for
    the messages: the config's train.device (the default: the training loop's), a command's --device, or the API's
    device argument; a config field's fix is said as a --set writes it."""
    fix = (f"use {option} cpu" if option.startswith("-") else f"set {option}=cpu (or auto)" if "." in option
           else f"pass {option}='cpu' (or 'auto')")
    problem = device_problem(name)
    if problem:
        raise DeviceError(f"{option} {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {name} requested but CUDA is not available here; {fix}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{option} {name} does not exist: this machine has {torch.cuda.device_count()} "
                              f"GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option} mps requested but it is not available here; {fix}")
    return device


def build_unet(m: ModelConfig) -> UNet:
    return UNet(image_size=m.image_size, in_channels=m.in_channels, base_channels=m.base_channels,
                channel_mults=tuple(m.channel_mults), num_res_blocks=m.num_res_blocks,
                attention_resolutions=tuple(m.attention_resolutions), dropout=m.dropout, num_heads=m.num_heads,
                time_emb_dim=m.time_emb_dim, norm=m.norm, norm_groups=m.norm_groups, activation=m.activation,
                num_classes=m.num_classes if m.conditional else None, head_channels=m.head_channels,
                norm_eps=m.norm_eps, downsample_padding=m.downsample_padding,
                time_embedding_order=m.time_embedding_order, time_freq_shift=m.time_freq_shift)


def build_diffusion(d: DiffusionConfig) -> GaussianDiffusion:
    betas = make_betas(d.schedule, d.num_timesteps, d.schedule_low, d.schedule_high, d.dns_offset)
    return GaussianDiffusion(betas, loss=d.loss,
                             min_snr_gamma=d.min_snr_gamma if d.loss_weight == "min-snr" else None,
                             prediction=d.prediction,
                             lognormal=(d.lognormal_mean, d.lognormal_std) if d.timestep_sampling == "lognormal"
                             else None)


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def compile_mode(cfg: RunConfig, device: torch.device) -> str | None:
    """The torch.compile mode for the training step, or None for eager. auto = CUDA graphs on CUDA: the step is
    launch-bound at batch 128, which CUDA graphs relieve (BENCHMARKS.md has the figures)."""
    c = cfg.train.compile
    if c == "off" or (c == "auto" and device.type != "cuda"):
        return None
    return {"auto": "reduce-overhead", "on": "default"}.get(c, c)


def compile_options(cfg: RunConfig, device: torch.device, mode: str) -> dict:
    """Inductor's options for the training step: those of torch.compile's `mode`, plus combo kernels (auto: on
    for CUDA without model.checkpointing), which launch independent kernels of a graph as one; the step has many
    small ones (per-channel and per-group reductions at the 8x8 and 4x4 levels), so it is faster (BENCHMARKS.md).
    Not with checkpointing: the compiled step then held as much memory as without it (BENCHMARKS.md, "Larger
    images"), likely since the blocks' recomputations, which depend only on saved inputs, are independent
    kernels that combo kernels may launch together, early in the backward."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode))
    c = cfg.train.combo_kernels
    if c == "on" or (c == "auto" and device.type == "cuda" and not cfg.model.checkpointing):
        options["combo_kernels"] = True
    return options


def sampler_compile_options(mode: str, device: torch.device) -> dict:
    """Inductor's options for the sampler's network: those of torch.compile's `mode`, plus programmatic dependent
    launch on CUDA GPUs that have it (compute capability 9, Hopper, and later): a kernel starts while the one
    before it finishes, which hides part of the gap between the forward's many small kernels. It speeds the
    sampler up; for the training step it was within noise, so not there (BENCHMARKS.md)."""
    from torch._inductor import config as inductor_config, list_mode_options

    options = dict(list_mode_options(mode))
    if (device.type == "cuda" and hasattr(inductor_config.triton, "enable_pdl")
            and torch.cuda.get_device_capability(device)[0] >= 9):
        options["triton.enable_pdl"] = True
    return options


def use_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """auto: on for CUDA. Under torch.compile it also forces inductor's layout optimisation, which its heuristics
    refuse for this UNet (convolutions with more input than output channels), leaving cuDNN to transpose
    NCHW<->NHWC around every convolution (a large share of the step's GPU time; BENCHMARKS.md)."""
    c = cfg.train.channels_last
    return c == "on" or (c == "auto" and device.type == "cuda")


def use_channel_stats(cfg: RunConfig, channels_last: bool) -> bool:
    """GroupNorm from per-channel statistics: auto = with a channels-last layout, where torch's per-group
    reduction strides over memory; faster for training and sampling (BENCHMARKS.md)."""
    n = cfg.train.norm_stats
    return n == "channel" or (n == "auto" and channels_last)


def use_fold_upsampling(cfg: RunConfig, device: torch.device) -> bool:
    """The upsamplings as transposed convolutions in training: auto = on for CUDA, where the step is faster
    (BENCHMARKS.md, "Larger images"); the CPU's path is left as measured for the quickstart."""
    f = cfg.train.fold_upsampling
    return f == "on" or (f == "auto" and device.type == "cuda")


def grad_sync(cfg: RunConfig, mode: str | None) -> str:
    """ddp (bucketed all-reduce hooks during the backward) or flat (one all-reduce after it). A CUDA-graph step
    takes flat: DDP's hooks would cut the captured backward into pieces."""
    g = cfg.train.grad_sync
    if g != "auto":
        return g
    if cfg.train.grad_accum > 1:  # the micro-batches' gradients are summed first, then averaged once
        return "flat"
    return "flat" if mode in ("reduce-overhead", "max-autotune") else "ddp"  # both capture CUDA graphs


def force_channels_last_graph() -> None:
    """Make inductor compile convolutions and their neighbours in channels-last, whatever its heuristics say."""
    import torch._inductor.config as inductor_config

    inductor_config.force_layout_optimization = True


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_lr(cfg: RunConfig, world: int = 1) -> float:
    """train.lr, scaled by train.lr_scaling for the global batch (batch_size x ranks) against train.lr_batch."""
    tc = cfg.train
    ratio = tc.batch_size * world / tc.lr_batch
    return tc.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[tc.lr_scaling]


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    """Adam or AdamW (train.optimizer) over the model's parameters: fused where torch has the kernel (CUDA, CPU),
    else foreach."""
    tc = cfg.train
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(model.parameters(), lr=lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay,
                   **({"fused": True} if fused else {"foreach": True}))
