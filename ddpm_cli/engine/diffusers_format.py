"""diffusers' format for DDPM models, mapped both ways without diffusers (and without torch): UNet2DModel's
config.json <-> the model section, DDPMScheduler's scheduler_config.json <-> the diffusion section, and the
names of the weights (which ddpm tensor is made of which diffusers tensors).

Only what ddpm's UNet computes exactly is accepted; anything else is refused with one line naming the field."""
from __future__ import annotations

from dataclasses import dataclass

from ddpm_cli.config import DiffusionConfig, ModelConfig
from ddpm_cli.errors import CheckpointError

# UNet2DModel's constructor defaults (diffusers 0.30 to 0.42; a test checks them against the installed one): a key
# that config.json leaves out takes these.
UNET_DEFAULTS: dict = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# What each of the other keys must be for ddpm's UNet to compute the same function.
UNET_REQUIRED: dict = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"), "resnet_time_scale_shift": ("default",), "add_attention": (True,),
    "class_embed_type": (None,), "num_class_embeds": (None,),
}
# DDPMScheduler's defaults, for the keys ddpm reads.
SCHEDULER_DEFAULTS: dict = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
}
VARIANCE = {"fixed_small": "posterior", "fixed_large": "beta"}
PREDICTION = {"epsilon": "eps", "v_prediction": "v"}  # diffusers' prediction_type -> diffusion.prediction


def _refuse(field: str, value, why: str) -> CheckpointError:
    shown = repr(value)
    if len(shown) > 80:  # trained_betas: a thousand floats on one line
        shown = f"{shown[:60]}... ({len(value) if hasattr(value, '__len__') else '?'} values)"
    return CheckpointError(f"unsupported diffusers setting {field} = {shown}: {why}")


# Schedulers over the discrete DDPM timesteps of a beta schedule, whose betas default to DDPMScheduler's (linear,
# 1e-4 to 0.02): a config of one without betas means those. Others (ScoreSdeVe, ...) have no betas at all.
BETA_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                   "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                   "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                   "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}


def _number(c: dict, key: str) -> float:
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(key, value, "expected a number")
    return float(value)


def _list(c: dict, key: str) -> list:
    if not isinstance(c[key], (list, tuple)):
        raise _refuse(key, c[key], "expected a list")
    return list(c[key])


def _full_unet_config(cfg: dict) -> dict:
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"config.json describes a {cfg['_class_name']}; ddpm imports UNet2DModel only "
                              f"(the DDPM models: google/ddpm-cifar10-32, ddpm-celebahq-256, ...)")
    # A key ddpm does not know may be one of a newer diffusers: refused, unless null (unset, diffusers' "off").
    unknown = sorted(k for k in cfg if k not in UNET_DEFAULTS and not k.startswith("_") and cfg[k] is not None)
    if unknown:
        raise _refuse(unknown[0], cfg[unknown[0]], "ddpm does not know this UNet2DModel field")
    return {**UNET_DEFAULTS, **cfg}


def model_config_from_diffusers(cfg: dict) -> dict:
    """A UNet2DModel config.json (as a dict) -> ddpm's model section (a dict), or CheckpointError naming the field
    ddpm's UNet cannot express."""
    c = _full_unet_config(cfg)
    for key, allowed in UNET_REQUIRED.items():
        if c[key] not in allowed:
            why = ("ddpm imports unconditional models only" if key in ("class_embed_type", "num_class_embeds") else
                   f"ddpm's UNet supports {' or '.join(map(repr, allowed))} only")
            raise _refuse(key, c[key], why)
    chans, down, up = _list(c, "block_out_channels"), _list(c, "down_block_types"), _list(c, "up_block_types")
    if not chans or not all(isinstance(x, int) and x > 0 for x in chans) or len(down) != len(chans) \
            or len(up) != len(chans):
        raise _refuse("block_out_channels", chans, "needs one positive width per down and up block type")
    base = chans[0]
    if any(x % base for x in chans):
        raise _refuse("block_out_channels", chans, "ddpm needs every level's width a multiple of the first's")
    for i, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise _refuse(f"down_block_types[{i}]", kind, "ddpm supports DownBlock2D and AttnDownBlock2D")
    for i, kind in enumerate(up):
        if kind not in ("UpBlock2D", "AttnUpBlock2D"):
            raise _refuse(f"up_block_types[{i}]", kind, "ddpm supports UpBlock2D and AttnUpBlock2D")
    size = c.get("sample_size")  # a side, or [height, width]
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    if len(sides) not in (1, 2) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 8 for x in sides):
        raise _refuse("sample_size", size, "ddpm needs the image side, or [height, width], in pixels")
    size = sides[0] if len(set(sides)) == 1 else sides
    resolutions = [min(sides) // 2**i for i in range(len(chans))]  # a level's shorter side, as ddpm names it
    attention = [r for r, kind in zip(resolutions, down) if kind == "AttnDownBlock2D"]
    attention_up = [r for r, kind in zip(reversed(resolutions), up) if kind == "AttnUpBlock2D"]
    if sorted(attention) != sorted(attention_up):
        raise _refuse("up_block_types", up, "ddpm puts attention at the same resolutions on the way down and up "
                                            f"(down_block_types has it at {attention or 'none'})")
    groups, attn_groups = c["norm_num_groups"], c["attn_norm_num_groups"]
    if not isinstance(groups, int) or groups < 1:
        raise _refuse("norm_num_groups", groups, "ddpm needs a number of GroupNorm groups")
    if attn_groups not in (None, groups):
        raise _refuse("attn_norm_num_groups", attn_groups, "ddpm's attention uses norm_num_groups")
    if c["in_channels"] != c["out_channels"]:
        raise _refuse("out_channels", c["out_channels"], "ddpm predicts noise of the input's channels")
    if not 0 <= _number(c, "freq_shift") <= 1:
        raise _refuse("freq_shift", c["freq_shift"], "ddpm supports shifts from 0 to 1")
    if c["downsample_padding"] not in (0, 1):  # diffusers pads this much on every side, but 0: bottom-right by 1
        raise _refuse("downsample_padding", c["downsample_padding"], "ddpm supports 1 (every side) and 0 (bottom "
                                                                     "and right)")
    if not isinstance(c["flip_sin_to_cos"], bool):
        raise _refuse("flip_sin_to_cos", c["flip_sin_to_cos"], "expected true or false")
    head_dim = c["attention_head_dim"]
    if isinstance(head_dim, (list, tuple)):
        raise _refuse("attention_head_dim", head_dim, "ddpm's UNet2DModel has one head width for all levels")
    return {"image_size": size, "in_channels": c["in_channels"], "base_channels": base,
            "channel_mults": [x // base for x in chans], "num_res_blocks": c["layers_per_block"],
            "time_emb_dim": c["time_embedding_dim"] or 0, "norm": "group", "norm_groups": groups,
            "dropout": _number(c, "dropout"), "activation": "silu", "attention_resolutions": attention,
            "num_heads": 1, "head_channels": head_dim or 0, "norm_eps": _number(c, "norm_eps"),
            "downsample_padding": "bottom-right" if c["downsample_padding"] == 0 else "symmetric",
            "time_embedding_order": "cos-sin" if c["flip_sin_to_cos"] else "sin-cos",
            "time_freq_shift": _number(c, "freq_shift"), "conditional": False}


def diffusion_config_from_scheduler(cfg: dict | None) -> dict:
    """A DDPMScheduler scheduler_config.json (None: its defaults) -> ddpm's diffusion section (a dict)."""
    betas_given = cfg is not None and any(k in cfg for k in ("beta_schedule", "beta_start", "beta_end",
                                                              "trained_betas"))
    if cfg is not None and not betas_given and cfg.get("_class_name", "DDPMScheduler") not in BETA_SCHEDULERS:
        raise CheckpointError(f"scheduler_config.json describes a {cfg.get('_class_name', 'scheduler')} without "
                              f"betas; ddpm imports models of a DDPM noise schedule (DDPMScheduler's)")
    if cfg is not None and cfg.get("timestep_type", "discrete") != "discrete":
        raise _refuse("timestep_type", cfg["timestep_type"], "the network takes noise levels, not ddpm's integer "
                                                              "timesteps")
    c = {**SCHEDULER_DEFAULTS, **(cfg or {})}
    T = c["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise _refuse("num_train_timesteps", T, "needs a positive number of steps")
    if not isinstance(c["prediction_type"], str) or c["prediction_type"] not in PREDICTION:
        raise _refuse("prediction_type", c["prediction_type"], "ddpm's networks predict the noise (epsilon) or "
                                                               "the velocity (v_prediction)")
    named = _named_betas(c, T)  # trained_betas that ddpm's export wrote for a schedule diffusers has no name for
    for key, want, why in (("thresholding", False, "ddpm clips predicted images to [-1, 1] instead"),
                           ("clip_sample", True, "ddpm's samplers always clip predicted images to [-1, 1]"),
                           ("clip_sample_range", 1.0, "ddpm clips predicted images to [-1, 1]"),
                           ("rescale_betas_zero_snr", False, "ddpm has no zero-terminal-SNR rescaling"),
                           ("trained_betas", None, "ddpm builds its betas from a named schedule")):
        if c[key] != want and not (key == "trained_betas" and named):
            raise _refuse(key, c[key], why)
    if not isinstance(c["variance_type"], str) or c["variance_type"] not in VARIANCE:
        raise _refuse("variance_type", c["variance_type"], "ddpm's ancestral sampler supports fixed_small "
                                                           "(posterior variance) and fixed_large (beta)")
    out = {"num_timesteps": T, "variance": VARIANCE[c["variance_type"]], "prediction": PREDICTION[c["prediction_type"]]}
    if named:
        return {**out, **named}
    if c["beta_schedule"] == "linear":  # ddpm scales low/high by 1000/T; diffusers' betas are absolute
        return {**out, "schedule": "linear", "schedule_low": _number(c, "beta_start") * T / 1000,
                "schedule_high": _number(c, "beta_end") * T / 1000}
    if c["beta_schedule"] == "squaredcos_cap_v2":
        return {**out, "schedule": "cosine"}
    raise _refuse("beta_schedule", c["beta_schedule"], "ddpm supports linear and squaredcos_cap_v2 (cosine)")


def unet_config_from_model(m: ModelConfig) -> dict:
    """ddpm's model section -> a UNet2DModel config.json (a dict), or CheckpointError saying why it cannot be."""
    if m.conditional:
        raise CheckpointError("a class-conditional model cannot go to diffusers' DDPMPipeline, which has no "
                              "class labels; export an unconditional model")
    if m.activation != "silu":
        raise CheckpointError(f"activation {m.activation}: diffusers' UNet2DModel uses SiLU in its time "
                              f"embedding and output whatever act_fn says; only silu models export")
    if m.channel_mults[0] != 1:
        raise CheckpointError(f"channel_mults {list(m.channel_mults)}: diffusers' UNet2DModel needs the first "
                              f"level as wide as its input convolution (a first multiplier of 1)")
    resolutions = m.resolutions()
    chans = [m.base_channels * x for x in m.channel_mults]
    attn_widths = {chans[-1]} | {chans[resolutions.index(r)] for r in m.attention_resolutions}
    if m.head_channels:
        head_dim = m.head_channels
    elif m.num_heads == 1:
        head_dim = None  # diffusers: one head as wide as each block
    elif len({w // m.num_heads for w in attn_widths}) == 1:
        head_dim = next(iter(attn_widths)) // m.num_heads
    else:
        raise CheckpointError(f"num_heads {m.num_heads} at widths {sorted(attn_widths)} gives heads of different "
                              f"widths; diffusers' UNet2DModel has one head width (set model.head_channels)")
    attn = set(m.attention_resolutions)
    size = m.image_size if isinstance(m.image_size, int) else list(m.hw)  # diffusers takes [height, width] too
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": "0.30.0", "sample_size": size,
        "in_channels": m.in_channels, "out_channels": m.in_channels, "center_input_sample": False,
        "time_embedding_type": "positional", "time_embedding_dim": m.time_emb_dim or None,
        "freq_shift": m.time_freq_shift if m.time_freq_shift % 1 else int(m.time_freq_shift),
        "flip_sin_to_cos": m.time_embedding_order == "cos-sin",
        "down_block_types": ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)],
        "block_out_channels": chans, "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 0 if m.downsample_padding == "bottom-right" else 1, "downsample_type": "conv",
        "upsample_type": "conv", "dropout": m.dropout, "act_fn": "silu", "attention_head_dim": head_dim,
        "norm_num_groups": m.norm_groups if m.norm == "group" else 1, "attn_norm_num_groups": None,
        "norm_eps": m.norm_eps, "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
    }


def _named_betas(c: dict, T: int) -> dict | None:
    """The ddpm schedule (as diffusion fields) that a config's trained_betas are, when ddpm's export named it in
    `ddpm_schedule` and the betas are its betas; else None."""
    from ddpm_cli.diffusion.schedules import make_betas

    named, betas = c.get("ddpm_schedule"), c.get("trained_betas")
    if not isinstance(named, dict) or not isinstance(betas, list) or len(betas) != T:
        return None
    try:
        fields = {k: named[k] for k in ("schedule", "schedule_low", "schedule_high", "dns_offset")}
        rebuilt = make_betas(fields["schedule"], T, fields["schedule_low"], fields["schedule_high"],
                             fields["dns_offset"])
        same = all(abs(float(a) - float(b)) <= 1e-9 + 1e-6 * abs(float(b)) for a, b in zip(betas, rebuilt.tolist()))
    except (KeyError, TypeError, ValueError):
        return None
    return fields if same else None


def scheduler_config_from_diffusion(d: DiffusionConfig) -> dict:
    """ddpm's diffusion section -> a DDPMScheduler scheduler_config.json (a dict): the same betas and the same
    ancestral sampler (predicted x_0 clipped to [-1, 1], as ddpm's)."""
    from ddpm_cli.diffusion.schedules import make_betas

    T = d.num_timesteps
    out = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.30.0", "num_train_timesteps": T,
           "beta_start": d.schedule_low * 1000 / T, "beta_end": d.schedule_high * 1000 / T,
           "beta_schedule": "linear", "trained_betas": None,
           "variance_type": {v: k for k, v in VARIANCE.items()}[d.variance], "clip_sample": True,
           "clip_sample_range": 1.0, "prediction_type": {v: k for k, v in PREDICTION.items()}[d.prediction],
           "thresholding": False,
           "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
    if d.schedule == "cosine":
        out["beta_schedule"] = "squaredcos_cap_v2"
    elif d.schedule != "linear":  # dns: no named diffusers schedule; the betas themselves, named for ddpm's import
        out["trained_betas"] = make_betas(d.schedule, T, d.schedule_low, d.schedule_high, d.dns_offset).tolist()
        out["ddpm_schedule"] = {"schedule": d.schedule, "schedule_low": d.schedule_low,
                                "schedule_high": d.schedule_high, "dns_offset": d.dns_offset}
    return out


# ----------------------------------------------------------------------------------------------------------
# Tensor names


@dataclass
class Tensor:
    """One ddpm tensor and the diffusers tensors it is made of: `qkv` stacks to_q, to_k, to_v (each (C, C)) into
    ddpm's (3C, C, 1, 1) convolution; `conv1x1` is a (C, C) linear as a (C, C, 1, 1) convolution."""

    ddpm: str
    diffusers: tuple[str, ...]
    op: str = "same"  # same | conv1x1 | qkv
    legacy: tuple[str, ...] = ()  # the same tensors' names in older files (query, key, value, proj_attn, Conv2d_0)


def _params(ddpm: str, diffusers: str, op: str = "same", legacy: str | None = None) -> list[Tensor]:
    return [Tensor(f"{ddpm}.{p}", (f"{diffusers}.{p}",), op, (f"{legacy}.{p}",) if legacy else ())
            for p in ("weight", "bias")]


def _resblock(ddpm: str, diffusers: str, has_skip: bool) -> list[Tensor]:
    out = []
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("emb.1", "time_emb_proj"), ("norm2", "norm2"),
                 ("conv2", "conv2")) + ((("skip", "conv_shortcut"),) if has_skip else ()):
        out += _params(f"{ddpm}.{a}", f"{diffusers}.{b}")
    return out


def _attention(ddpm: str, diffusers: str) -> list[Tensor]:
    out = _params(f"{ddpm}.norm", f"{diffusers}.group_norm")
    for p in ("weight", "bias"):
        out.append(Tensor(f"{ddpm}.qkv.{p}", tuple(f"{diffusers}.to_{x}.{p}" for x in "qkv"), "qkv",
                          tuple(f"{diffusers}.{x}.{p}" for x in ("query", "key", "value"))))
    return out + _params(f"{ddpm}.proj", f"{diffusers}.to_out.0", "conv1x1", f"{diffusers}.proj_attn")


def tensor_plan(m: ModelConfig) -> list[Tensor]:
    """Every tensor of ddpm's UNet for `m`, in the order it registers them, with its diffusers counterpart; walks
    the blocks as nn.unet.UNet builds them (a test checks the names against its state_dict)."""
    plan = _params("time_mlp.0", "time_embedding.linear_1") + _params("time_mlp.2", "time_embedding.linear_2")
    plan += _params("conv_in", "conv_in")
    resolutions = m.resolutions()
    chans = [m.base_channels * x for x in m.channel_mults]
    last = len(chans) - 1
    k, ch, skips = 0, m.base_channels, [m.base_channels]
    for level, width in enumerate(chans):
        for j in range(m.num_res_blocks):
            plan += _resblock(f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", ch != width)
            if resolutions[level] in m.attention_resolutions:
                plan += _attention(f"down.{k}.1", f"down_blocks.{level}.attentions.{j}")
            ch = width
            skips.append(ch)
            k += 1
        if level != last:
            plan += _params(f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "same",
                            f"down_blocks.{level}.downsamplers.0.Conv2d_0")  # an alias older files may keep alone
            skips.append(ch)
            k += 1
    plan += _resblock("mid.0", "mid_block.resnets.0", False) + _attention("mid.1", "mid_block.attentions.0")
    plan += _resblock("mid.2", "mid_block.resnets.1", False)
    k = 0
    for level in reversed(range(len(chans))):
        u = last - level
        for j in range(m.num_res_blocks + 1):
            plan += _resblock(f"up.{k}.0", f"up_blocks.{u}.resnets.{j}", ch + skips.pop() != chans[level])
            if resolutions[level] in m.attention_resolutions:
                plan += _attention(f"up.{k}.1", f"up_blocks.{u}.attentions.{j}")
            ch = chans[level]
            k += 1
        if level != 0:
            plan += _params(f"up.{k}.0.conv", f"up_blocks.{u}.upsamplers.0.conv")
            k += 1
    return plan + _params("out.0", "conv_norm_out") + _params("out.2", "conv_out")
