"""The run config's schema: pydantic models of a whole run. Every field's docstring is its help text, shown by
`ddpm config show` and in docs/config.md."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

Side = Annotated[int, Field(ge=8, le=1024)]  # an image side in pixels
# train.posthoc_ema's relative lengths: the upper end is just under the plain mean's 0.2887 (exponent 0)
POSTHOC_EMA_LENGTHS = (0.001, 0.28)
# the devices the engine can check and use (engine/build.py resolve_device), written as torch.device takes them
# (it refuses cuda:01 and an index past 64 bits)
DEVICE = re.compile(r"auto|(cpu|cuda|mps|xpu)(:(0|[1-9][0-9]{0,8}))?")


def device_problem(name: str) -> str | None:
    """Why `name` is not a device to run on (None: it is one). Said here, without torch, so that the config's
    validation refuses `train.device: gpu`, which torch would refuse only once training starts; "gpu" (or "CUDA")
    is taken for the cuda it means."""
    if DEVICE.fullmatch(name):
        return None
    meant = re.sub(r"^gpu", "cuda", name.strip().lower())
    return f"{name!r} is not a device; use auto, cpu, cuda or cuda:N" + (
        f" (did you mean {meant}?)" if DEVICE.fullmatch(meant) else "")


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type holds bool anywhere (bool itself, or inside a union, tuple or Annotated)."""
    return annotation is bool or any(_takes_bool(a) for a in get_args(annotation))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _on_off_from_yaml_bools(cls, data: Any) -> Any:
        """YAML 1.1 reads a bare `on`/`off` as true/false; a field whose choices hold "on"/"off" takes them back
        (`logging.wandb: off`, whose other choices are not "on", included). A number field refuses true/false
        (pydantic would read true as 1: `--set train.batch_size=true`)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            value = out.get(name)
            if (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)
                    and not _takes_bool(field.annotation)):  # [true, 2] for numbers: refused as true is
                out[name] = [str(v).lower() if isinstance(v, bool) else v for v in value]
            if not isinstance(value, bool):
                continue
            choices = get_args(field.annotation)
            if "on" in choices or ("off" in choices and not out[name]):
                out[name] = "on" if out[name] else "off"
            elif set(get_args(field.annotation) or (field.annotation,)) - {type(None)} <= {int, float}:
                out[name] = str(out[name]).lower()  # the field's own error then names it, and what set it
        return out


class ModelConfig(Section):
    """The UNet denoiser (DDPM, Ho et al. 2020, appendix B)."""

    image_size: Side | tuple[Side, Side] = 32
    """Size of the images the model sees, in pixels: one side for square images, or [height, width]; data is
    center-cropped to its shape and resized to it. Each side must halve once per channel_mults level after the
    first."""
    in_channels: int = Field(3, ge=1, le=4)
    """Image channels: 3 for RGB, 1 for grayscale, 4 for RGBA, 2 for grayscale with alpha (images are converted
    to it; an image without alpha gets an opaque one)."""
    base_channels: int = Field(128, ge=1)
    """Channels of the first resolution level; the paper's CIFAR-10 model uses 128."""
    channel_mults: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1, max_length=8)
    """Channel multiplier per resolution level (each level after the first halves the resolution)."""
    num_res_blocks: int = Field(2, ge=1, le=8)
    """Residual blocks per resolution level on the way down (the way up has one more)."""
    time_emb_dim: int = Field(0, ge=0)
    """Width of the timestep embedding MLP; 0 means 4 x base_channels."""
    norm: Literal["group", "layer"] = "group"
    """Normalisation in the blocks: GroupNorm with `norm_groups` groups, or one group (LayerNorm over C, H, W)."""
    norm_groups: int = Field(32, ge=1)
    """Groups of GroupNorm when norm = group; must divide every level's channel count."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout inside the residual blocks."""
    activation: Literal["silu", "relu", "mish"] = "silu"
    """Nonlinearity used throughout the network."""
    attention_resolutions: tuple[int, ...] = (16,)
    """Resolutions (in pixels) at which blocks get self-attention; each must be one the model has (a level's
    shorter side when the images are not square)."""
    num_heads: int = Field(1, ge=1)
    """Attention heads (the DDPM paper uses one); must divide the channel count where attention is used."""
    head_channels: int = Field(0, ge=0)
    """Channels per attention head, so wider levels get more heads (diffusers' attention_head_dim); 0 means
    num_heads heads at every level. Must divide the channel count where attention is used (and the middle's)."""
    norm_eps: float = Field(1e-5, gt=0.0, le=1.0)
    """Epsilon of every GroupNorm (the google/ddpm-* models imported from diffusers use 1e-6)."""
    downsample_padding: Literal["symmetric", "bottom-right"] = "symmetric"
    """Zero padding of the stride-2 downsampling convolution: one pixel on every side, or one on the bottom and
    right only (TensorFlow's SAME, as in the DDPM paper's code and diffusers' downsample_padding 0)."""
    time_embedding_order: Literal["sin-cos", "cos-sin"] = "sin-cos"
    """Order of the halves of the sinusoidal timestep embedding (cos-sin is diffusers' flip_sin_to_cos)."""
    time_freq_shift: float = Field(1.0, ge=0.0, le=1.0)
    """Frequencies of the timestep embedding are 10000^(-i / (dim/2 - shift)): 1 as in the DDPM code, 0 as in
    diffusers' default (its freq_shift)."""
    checkpointing: bool = False
    """Activation checkpointing while training: each group of blocks keeps only its input and runs its forward
    again in the backward, for larger images or batches in the same memory at the cost of about one more forward
    a step (the same gradients). Sampling, evaluation and export are unaffected."""
    conditional: bool = False
    """Condition on class labels (the seed's --use_labels); the data must have labels."""
    num_classes: int = Field(10, ge=1)
    """Number of classes when conditional; the embedding has one extra 'no label' slot for guidance."""

    @field_validator("image_size", mode="wrap")
    @classmethod
    def _one_side_or_two(cls, value: Any, handler) -> int | tuple[int, int]:
        """One message for a bad size (not one per branch of the union); a square [h, h] is stored as h."""
        try:
            size = handler(value)
        except ValidationError:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"must be one side in pixels or [height, width], each 8 to 1024, e.g. 64 or [64, 96] "
                             f"(got {shown})") from None
        return size[0] if isinstance(size, tuple) and size[0] == size[1] else size

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the images, in pixels."""
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return (self.in_channels, *self.hw)

    def size_text(self) -> str:
        """The image size as people write it: HxW."""
        return "{}x{}".format(*self.hw)

    def levels(self) -> list[tuple[int, int]]:
        """(height, width) of each resolution level, the input's first."""
        h, w = self.hw
        return [(h // 2**i, w // 2**i) for i in range(len(self.channel_mults))]

    def resolutions(self) -> list[int]:
        """Each level's resolution as attention_resolutions names it: its side, the shorter one if not square."""
        return [min(hw) for hw in self.levels()]


class DiffusionConfig(Section):
    """The forward process and the training objective."""

    schedule: Literal["linear", "cosine", "dns"] = "linear"
    """Noise schedule: linear (DDPM), cosine (Nichol & Dhariwal) or dns (the seed's quadratic schedule)."""
    num_timesteps: int = Field(1000, ge=1, le=100000)
    """Number of diffusion steps T."""
    schedule_low: float = Field(1e-4, gt=0.0)
    """First beta of linear/dns schedules (for T = 1000; scaled by 1000/T otherwise)."""
    schedule_high: float = Field(0.02, gt=0.0)
    """Last beta of linear/dns schedules (for T = 1000; scaled by 1000/T otherwise)."""
    dns_offset: float = Field(5.0, ge=0.0)
    """Offset of the dns schedule; equal to num_timesteps gives the seed's "DNST" variant."""
    prediction: Literal["eps", "v"] = "eps"
    """What the network predicts: eps, the noise (the DDPM paper); or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar)
    x_0 (Salimans & Ho 2022), whose scale stays near 1 at every noise level, so its errors are not amplified where
    x_0 is recovered from nearly pure noise. Samplers, guidance and exports follow the checkpoint's choice."""
    loss: Literal["l2", "l1"] = "l2"
    """Loss between the network's output and its target (the noise, or v)."""
    loss_weight: Literal["uniform", "min-snr"] = "uniform"
    """Weight of each timestep's loss: uniform is the paper's L_simple; min-snr is Min-SNR-gamma (Hang et al.
    2023), min(SNR_t, gamma) / SNR_t on the noise's error (on v's, the weight that makes it the same objective),
    which stops the nearly noise-free steps from dominating the gradient."""
    min_snr_gamma: float = Field(5.0, gt=0.0)
    """The gamma of loss_weight min-snr."""
    variance: Literal["beta", "posterior"] = "beta"
    """Variance of the ancestral sampler: sigma^2 = beta_t or the posterior variance beta-tilde_t."""
    timestep_sampling: Literal["uniform", "lognormal"] = "uniform"
    """How training draws each image's timestep: uniform (the DDPM paper); or lognormal, EDM's training noise
    levels (Karras et al. 2022): ln sigma drawn from N(lognormal_mean, lognormal_std^2), with sigma_t =
    sqrt((1 - alpha_bar_t) / alpha_bar_t), and taken to the nearest timestep. It spends training on the middle
    noise levels and little on the nearly clean and the nearly pure-noise ends. With `prediction: v` and uniform
    `loss_weight` training is EDM's at sigma_data = 1: its preconditioning (v is its network's output, up to
    sign) and its loss weighting. Sampling is unchanged; the held-out loss stays over uniform timesteps, so runs
    remain comparable."""
    lognormal_mean: float = -1.2
    """timestep_sampling lognormal: the mean of ln sigma (EDM's P_mean); within the schedule's range of ln
    sigma (about -4.6 to 5.1 for the linear schedule at T = 1000)."""
    lognormal_std: float = Field(1.2, gt=0.0)
    """timestep_sampling lognormal: the standard deviation of ln sigma (EDM's P_std)."""

    @model_validator(mode="after")
    def _check_schedule(self) -> "DiffusionConfig":
        import numpy as np

        from ddpm_cli.diffusion.schedules import check_betas, make_betas

        if self.schedule != "cosine" and self.schedule_low > self.schedule_high:
            raise ValueError("schedule_low must not exceed schedule_high")
        with np.errstate(all="ignore"):  # an overflow (schedule_high=1e308) is check_betas' to name, not numpy's
            betas = make_betas(self.schedule, self.num_timesteps, self.schedule_low, self.schedule_high,
                               self.dns_offset)
            problem = check_betas(betas)
        if problem:
            raise ValueError(f"{self.schedule} schedule with T = {self.num_timesteps}: {problem}")
        if self.timestep_sampling == "lognormal":
            from ddpm_cli.diffusion.schedules import log_sigmas

            ls = log_sigmas(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
            if not ls[0] <= self.lognormal_mean <= ls[-1]:
                raise ValueError(f"lognormal_mean {self.lognormal_mean:g} is outside the {self.schedule} schedule's "
                                 f"range of ln sigma, {ls[0]:.2f} to {ls[-1]:.2f}: most draws would land on its "
                                 "first or last timestep; choose a mean within it (EDM's is -1.2)")
        return self


class DataConfig(Section):
    """Where the training images come from."""

    dataset: Literal["cifar10", "folder", "shapes"] = "cifar10"
    """cifar10 (torchvision), folder (an ImageFolder tree, a flat folder, or a .zip of either), or shapes
    (built in, procedurally generated, 10 classes)."""
    root: str = "data"
    """cifar10: torchvision's root directory; folder: the folder or .zip of images."""
    download: bool = True
    """cifar10: download it into `root` when missing (needs network)."""
    split: Literal["train", "test"] = "train"
    """cifar10: which split to train on."""
    shapes_count: int = Field(10000, ge=1)
    """shapes: number of generated images."""
    shapes_seed: int = Field(0, ge=0)
    """shapes: seed of the generator (the same seed gives the same images; 0 or more)."""
    random_flip: bool = True
    """Flip images horizontally at random during training."""
    on_device: Literal["auto", "on", "off"] = "auto"
    """Keep the whole decoded dataset on the training device (auto: on CUDA when it takes under a quarter
    of the free memory); batches and flips are then made there with no host copies."""
    streaming: Literal["auto", "on", "off"] = "auto"
    """folder: decode the images batch by batch while training (in stream_workers processes, batches ahead)
    instead of all at once into memory; auto = when the decoded images would take over half the available
    memory (shared by the ranks of a machine under --gpus, each holding a copy). The batches, their order and
    resume are the same either way."""
    stream_workers: int | None = Field(None, ge=0)
    """Processes decoding a streamed folder, a batch each; 0 decodes in threads of the training process (where
    decoding contends with the training loop for Python's lock); unset: one per two cores, shared by the ranks
    of the machine, at most 8 per rank."""


class EarlyStoppingConfig(Section):
    """Stop when the loss on a held-out split stops improving."""

    enabled: bool = False
    """Turn early stopping on."""
    holdout: int = Field(1000, ge=1)
    """Images held out of training to measure the loss on."""
    eval_every: int = Field(1000, ge=1)
    """Steps between evaluations of the held-out loss."""
    patience: int = Field(5, ge=1)
    """Evaluations without an improvement of at least min_delta before the run stops."""
    min_delta: float = Field(0.0, ge=0.0)
    """Smallest decrease of the held-out loss that counts as an improvement."""


class TrainConfig(Section):
    """Optimisation and the length of the run."""

    steps: int = Field(800_000, ge=1)
    """Optimizer steps to train for (the seed's --iterations)."""
    max_time: float | None = Field(None, gt=0)
    """Stop after this many seconds of wall time (start-up and compilation included), whichever comes first; the
    closing checkpoint and grid fit inside it, and an in-training FID or grid that would not is skipped."""
    batch_size: int = Field(128, ge=1)
    """Images per optimizer step on each GPU (the global batch is batch_size x GPUs), in grad_accum micro-batches."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step: each forward and backward sees batch_size / grad_accum images and their
    gradients add up to the whole batch's before the step, so a batch too large for the device's memory trains as
    one (the same update, up to float rounding). batch_size stays the step's batch (learning-rate scaling, EMA,
    images_seen) and must be divisible by it. Under torchrun the gradients are averaged once per step."""
    lr: float = Field(2e-4, gt=0.0)
    """Peak learning rate (for a global batch of lr_batch images when lr_scaling scales it)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale lr with the global batch B (batch_size x GPUs): linear = lr x B / lr_batch (Goyal et al. 2017,
    with warmup), sqrt = lr x sqrt(B / lr_batch) (a common choice for Adam); none = lr as given. For larger
    batches, which train faster per image on a GPU (BENCHMARKS.md). A run resumed on another number of GPUs gets
    the rate of its new global batch."""
    lr_batch: int = Field(128, ge=1)
    """The global batch that lr is tuned for (the DDPM paper's CIFAR-10 recipe: 128), when lr_scaling is on."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Adam (the paper) or AdamW (decoupled weight decay)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Weight decay (decoupled with adamw)."""
    adam_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    """Adam's beta1 and beta2, each in [0, 1)."""
    warmup_steps: int = Field(5000, ge=0)
    """Linear learning-rate warmup from 0 over this many steps."""
    lr_cooldown: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the run over which the learning rate decays linearly to zero at its end; 0: none (the peak to the
    last step). When train.max_time ends the run, a share of the time: the decay starts when that share is left,
    with its end projected from the step time then; the run ends where the decay does, or a little before it
    when the time runs out first. A run resumed inside the decay continues it; one resumed after it, to train
    longer, goes back to the peak and decays again at the end of its new time."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    ema: bool = True
    """Keep an exponential moving average of the weights (used for sampling)."""
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    """EMA decay per update."""
    ema_every: int = Field(1, ge=1)
    """Steps between EMA updates (the seed's ema_update_rate)."""
    ema_start: int = Field(0, ge=0)
    """Step before which the EMA just copies the weights."""
    ema_warmup: bool = False
    """Ramp the EMA decay as min(ema_decay, (1 + n) / (10 + n)) over the n-th update, so short runs are not
    dominated by the initial weights. The ramp caps every decay (ema_extra's too) until update 9 / (1 - decay)
    - 10: 0.9999 only takes effect after 89,990 updates, and before that averages as the ramp does."""
    ema_extra: tuple[float, ...] = Field((), max_length=4)
    """More EMA decays to keep beside ema_decay (each a full copy of the weights, updated with it), to choose the
    averaging length after training with `ddpm sample --ema-decay D` (also eval and export)."""
    posthoc_ema: tuple[float, ...] = Field((), max_length=4)
    """Post-hoc EMA (EDM2, Karras et al. 2024): relative lengths of power-function averages of the weights to
    track, e.g. [0.05, 0.1] (an average's standard deviation over the steps it spans, as a share of the run so
    far; each in [0.001, 0.28]). Each is a full copy of the weights, updated every step on rank 0 and written to
    RUN/ema/ with every checkpoint and every posthoc_ema_every steps; after training, `ddpm ema RUN --length L`
    makes a checkpoint of the average of any other length from them. Needs no warm-up. [] tracks none."""
    posthoc_ema_every: int = Field(0, ge=0)
    """Steps between post-hoc EMA snapshots besides those written with every checkpoint (0: with the checkpoints
    only). More snapshots resolve more lengths; each holds one copy of the weights per tracked length."""
    guide_step: int | None = Field(None, ge=1)
    """Keep the EMA weights of this step (the raw ones without EMA) in every later checkpoint as its autoguidance
    guide: `ddpm sample` and `ddpm eval` then guide by them by default (DPM-Solver++(2M)-20, weight
    guide_weight). About a third of the run is best (BENCHMARKS.md); unset: no guide."""
    guide_weight: float = Field(2.0, gt=1.0)
    """Default autoguidance weight for the stored guide (`--guidance W` overrides, `--guidance 1` turns it off)."""
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of labels replaced by the 'no label' class (classifier-free guidance training)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: auto means bf16 on CUDA, fp32 elsewhere."""
    compile: Literal["auto", "off", "on", "max-autotune", "reduce-overhead"] = "auto"
    """torch.compile the training step (forward and backward): on = the default mode, reduce-overhead adds
    CUDA graphs, max-autotune also tunes kernels (a little faster, for a first step that compiles much longer;
    BENCHMARKS.md); auto means reduce-overhead on CUDA, off elsewhere."""
    compile_ahead: Literal["auto", True, False] = "auto"
    """When the step compiles: true = train eagerly from the first step while a helper process compiles the step (or
    loads it from the compile cache), then switch to the compiled step, which loads the helper's work; auto = so
    where the compile cache holds no entry for this step (a cold start, where the helper's first step comes minutes
    sooner), and compiled in the run where it does (a warm start, whose compiled steps come sooner that way); false
    = compiled in the run. The device holds a second copy of the network while the helper runs, and the eager step
    more activations than the compiled one: an eager step out of memory is taken again in at least twice as many
    micro-batches (the same gradient), and one that does not fit one image at a time ends the helper and the step
    compiles in the run. The eager steps run without cuDNN's algorithm search, deterministic. One process only
    (not under --gpus), not with max-autotune or grad_accum: there auto compiles in the run, and true says why."""
    combo_kernels: Literal["auto", "on", "off"] = "auto"
    """Let torch.compile launch independent small kernels together as one (inductor's combo kernels: a step
    makes many kernel calls, many of them tiny reductions at 8x8 and 4x4); auto means on when the step is
    compiled on CUDA without model.checkpointing, where it is faster (BENCHMARKS.md); with checkpointing the
    compiled step then kept as much memory as without it. Off may lower the peak without it too."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Channels-last memory layout: on also makes torch.compile keep the whole graph channels-last; auto means
    on for CUDA, off elsewhere."""
    norm_stats: Literal["auto", "group", "channel"] = "auto"
    """How GroupNorm computes its statistics (the same function either way): group = torch's kernel; channel =
    per channel first, then per group, which reads channels-last memory in order and keeps bf16 activations in
    bf16, faster on a GPU (BENCHMARKS.md); auto = channel when the layout is channels-last, group otherwise."""
    fold_upsampling: Literal["auto", "on", "off"] = "auto"
    """Compute each upsampling layer (nearest 2x, then a 3x3 convolution) as one transposed convolution of the
    small input (the same function, 2.25x fewer multiply-adds, no upsampled tensor), as sampling always does;
    auto means on for CUDA (BENCHMARKS.md, "Larger images"), off elsewhere."""
    grad_sync: Literal["auto", "ddp", "flat"] = "auto"
    """How ranks average gradients under torchrun: ddp = DistributedDataParallel's bucketed all-reduce, overlapped
    with the backward; flat = one all-reduce of all gradients after the backward, which keeps a CUDA-graph step
    one graph; auto = flat when the step is CUDA-graphed or train.grad_accum > 1 (one all-reduce after the last
    micro-batch), ddp otherwise."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms at the first step (CUDA only): it costs that step seconds and
    makes the compiled step a little faster (BENCHMARKS.md, "Start-up"). Under train.compile_ahead the eager steps
    run without it and the compiled step with this setting."""
    device: str = "auto"
    """Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N."""
    seed: int = Field(0, ge=-(2**43), le=2**43)
    """Seed of the weights, the data order and the noise (any integer within +-2^43, about 8.8e12: a millisecond
    timestamp fits)."""
    max_nonfinite: int = Field(10, ge=1)
    """Stop when this many steps in a row have a non-finite loss or gradient (each is skipped)."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Early stopping on a held-out loss."""

    @field_validator("grad_accum")
    @classmethod
    def _divides_the_batch(cls, k: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % k:
            raise ValueError(f"batch_size {batch} is not divisible by grad_accum {k} (each micro-batch is "
                             f"batch_size / grad_accum images); pick a grad_accum that divides it")
        return k

    @field_validator("grad_sync")
    @classmethod
    def _sync_once_per_step(cls, sync: str, info: ValidationInfo) -> str:
        if sync == "ddp" and info.data.get("grad_accum", 1) > 1:
            raise ValueError("ddp averages the gradients during every backward; with grad_accum > 1 they are "
                             "averaged once per step, after the last micro-batch: use grad_sync auto or flat")
        return sync

    @field_validator("device")
    @classmethod
    def _a_device(cls, name: str) -> str:
        problem = device_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _check_related_fields(self) -> "TrainConfig":
        for d in self.ema_extra:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"ema_extra decays must be in [0, 1) (got {d})")
        if len({*self.ema_extra, self.ema_decay}) != len(self.ema_extra) + 1:
            raise ValueError("ema_extra must not repeat a decay or ema_decay itself")
        if self.ema_extra and not self.ema:
            raise ValueError("ema_extra needs ema: true (the extra averages are kept beside the main one)")
        for length in self.posthoc_ema:
            if not POSTHOC_EMA_LENGTHS[0] <= length <= POSTHOC_EMA_LENGTHS[1]:
                raise ValueError(f"posthoc_ema lengths must be in {list(POSTHOC_EMA_LENGTHS)} (got {length}); "
                                 f"EDM2 tracks 0.05 and 0.1")
        if len(set(self.posthoc_ema)) != len(self.posthoc_ema):
            raise ValueError("posthoc_ema must not repeat a length")
        if self.guide_step is not None and self.guide_step > self.steps:
            raise ValueError(f"guide_step ({self.guide_step}) must not exceed steps ({self.steps}); about a third "
                             f"of the run is best")
        return self


class LoggingConfig(Section):
    """What the run writes, where and how often."""

    run_dir: str = "runs"
    """Directory that holds the runs."""
    run_name: str | None = None
    """Name of this run's folder under run_dir; default: the config's name and a timestamp."""

    @field_validator("run_name")
    @classmethod
    def _a_folder_name(cls, v: str | None) -> str | None:
        if v is not None and (v.strip() in ("", ".", "..") or "/" in v or "\\" in v):
            raise ValueError(f"{v!r} is not a folder name (a run is a folder under logging.run_dir: no '/', '.' "
                             f"or '..'; put the path in logging.run_dir)")
        return v
    log_every: int = Field(100, ge=1)
    """Steps between metrics lines (metrics.jsonl, progress, wandb)."""
    checkpoint_every: int = Field(10000, ge=1)
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints to keep; older ones are deleted (never the one a run resumed from)."""
    sample_every: int = Field(10000, ge=1)
    """Steps between sample grids (one is always drawn at the end)."""
    sample_count: int = Field(64, ge=1)
    """Images in a sample grid (a row per class when conditional)."""
    sample_steps: int = Field(100, ge=1)
    """Sampler steps for the grids (DDIM; equal to num_timesteps means the full ancestral sampler)."""
    sample_guidance: float = Field(1.0, ge=1.0)
    """Classifier-free guidance weight of the grids (1: off); needs model.conditional and train.label_dropout."""
    fid_every: int = Field(0, ge=0)
    """Steps between in-training FID evaluations (0: off); logged as `fid` in metrics.jsonl and wandb."""
    fid_samples: int = Field(1000, ge=2)
    """Images sampled (EMA weights) for each in-training FID; few images bias FID upwards: compare runs, not papers."""
    fid_steps: int = Field(20, ge=1)
    """DPM-Solver++(2M) steps for the in-training FID samples."""
    fid_ref: str | None = None
    """In-training FID reference: a folder or .zip of images, a stats file of `ddpm eval --save-stats`, or
    cifar10-train; default: the training images themselves."""
    fid_inception_weights: str | None = None
    """TF-Inception weights in torch-fidelity's format, for machines without its download."""
    wandb: Literal["off", "online", "offline"] = "off"
    """Weights & Biases logging."""
    wandb_project: str = "ddpm"
    """wandb project."""
    wandb_entity: str | None = None
    """wandb entity (user or team); default: yours."""


class RunConfig(Section):
    """A whole training run."""

    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check_model(self, info: ValidationInfo) -> "RunConfig":
        if (info.context or {}).get("fields_only"):  # loading.validate_config's second look, after field errors
            return self
        problems = self.combination_problems()
        if problems:  # one line per problem, each "field: what is wrong" (loading.format_validation_error)
            raise ValueError("\n".join(f"{path}: {text}" for path, _, text in problems))
        return self

    def combination_problems(self) -> list[tuple[str, tuple[str, ...], str]]:
        """What is wrong with how valid fields go together: (the field to change, every field the check reads,
        what is wrong)."""
        m = self.model
        problems = []
        have = m.resolutions()
        halvings = len(m.channel_mults) - 1
        if any(side % 2**halvings for side in m.hw):
            size, sides = ((m.image_size, "it must be a multiple") if isinstance(m.image_size, int) else
                           (m.size_text(), "both sides must be multiples"))
            problems.append(("model.image_size", ("model.image_size", "model.channel_mults"),
                             f"{size} cannot be halved {halvings} times (one per channel_mults level after the "
                             f"first): {sides} of {2**halvings}, or the model needs fewer levels"))
        levels = ("model.attention_resolutions", "model.image_size", "model.channel_mults")
        for r in m.attention_resolutions:
            if r not in have and m.hw[0] == m.hw[1]:
                problems.append(("model.attention_resolutions", levels, f"attention at {r}x{r} but the model's "
                                 f"resolutions are {', '.join(map(str, have))}; pick from those"))
            elif r not in have:
                problems.append(("model.attention_resolutions", levels, f"attention at {r} (a level's shorter "
                                 f"side) but the model's levels are {', '.join(f'{h}x{w}' for h, w in m.levels())}; "
                                 f"pick from {', '.join(map(str, have))}"))
        if any(c < 1 for c in m.channel_mults):
            problems.append(("model.channel_mults", ("model.channel_mults",), "must all be at least 1"))
        widths = sorted({m.base_channels * c for c in m.channel_mults})
        if m.norm == "group" and any(w % m.norm_groups for w in widths):
            problems.append(("model.norm_groups", ("model.norm_groups", "model.norm", "model.base_channels",
                                                   "model.channel_mults"),
                             f"{m.norm_groups} must divide every level's channels ({widths})"))
        attention_widths = {m.base_channels * m.channel_mults[-1]} | {
            m.base_channels * m.channel_mults[have.index(r)] for r in m.attention_resolutions if r in have}
        widths_read = ("model.base_channels", "model.channel_mults", *levels)
        if not m.head_channels and any(w % m.num_heads for w in attention_widths):
            problems.append(("model.num_heads", ("model.num_heads", "model.head_channels", *widths_read),
                             f"{m.num_heads} must divide the channels where attention is used "
                             f"({sorted(attention_widths)}, the middle block's included)"))
        if m.head_channels and any(w % m.head_channels for w in attention_widths):
            problems.append(("model.head_channels", ("model.head_channels", *widths_read),
                             f"{m.head_channels} must divide the channels where attention is used "
                             f"({sorted(attention_widths)}, the middle block's included)"))
        if self.logging.sample_guidance != 1.0 and not (m.conditional and self.train.label_dropout > 0):
            problems.append(("logging.sample_guidance", ("logging.sample_guidance", "model.conditional",
                                                         "train.label_dropout"),
                             f"{self.logging.sample_guidance:g} needs a class-conditional model trained with label "
                             f"dropout (model.conditional=true, train.label_dropout > 0); set it to 1 or turn those "
                             f"on"))
        return problems


# The settings a checkpoint's weights were trained as: the network's function and the noise process. A resume may
# change the rest (the image size, with a warning; dropout, activation checkpointing, the loss weighting, ...).
# A change of shape would fail to load anyway; these would load and silently compute another thing.
RESUME_FIXED = {"model": ("in_channels", "base_channels", "channel_mults", "num_res_blocks", "time_emb_dim", "norm",
                          "norm_groups", "activation", "attention_resolutions", "num_heads", "head_channels",
                          "norm_eps", "downsample_padding", "time_embedding_order", "time_freq_shift", "conditional",
                          "num_classes"),
                "diffusion": ("schedule", "num_timesteps", "schedule_low", "schedule_high", "dns_offset",
                              "prediction")}


def refuse_identity_change(trained: RunConfig, now: RunConfig, path) -> None:
    """CheckpointError when `now` (a resume's config) changes a RESUME_FIXED setting of `trained` (the checkpoint
    at `path`): its weights, their averages and its stored guide are the function they were trained as."""
    from ddpm_cli.errors import CheckpointError

    changed = [(f"{section}.{name}", getattr(getattr(trained, section), name), getattr(getattr(now, section), name))
               for section, names in RESUME_FIXED.items() for name in names]
    changed = [(k, a, b) for k, a, b in changed if a != b]
    if changed:
        shown = ", ".join(f"{k}={a} -> {b}" for k, a, b in changed[:3])
        raise CheckpointError(f"{path} was trained with another architecture or noise process than this resume "
                              f"asks for ({shown}); a resume cannot change what the weights compute or the noise "
                              f"they learned: resume without those --set, or start a new run with --config")
