"""Drawing images from a checkpoint, the one way `ddpm sample`, `ddpm eval` and the training loop's FID do it:
check the sampling options against the checkpoint's header (no torch), load the model and its guide, draw in
batches (each torchrun rank its share: N processes make exactly the images of one), and gather them once on
rank 0. Never prints: warnings are returned, progress goes through callbacks."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ddpm_cli.config import RunConfig
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.engine.checkpoint import Header, has_ema_weights, read_checkpoint_config, require_ema_decay
from ddpm_cli.engine.guidance import Guidance, check_guidance
from ddpm_cli.errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DrawOptions:
    """The sampling options `ddpm sample` and `ddpm eval` share (declared once, in cli/options.py)."""

    spec: SamplerSpec = SamplerSpec()  # sampler, steps, eta, spacing, variance
    guidance: float | None = None  # None: the stored guide's weight if the checkpoint carries one, else 1 (off)
    guide: Path | str | None = None  # autoguidance by this weaker checkpoint; "none": not by the stored guide
    ema: bool | None = None  # None: the EMA weights when the checkpoint has them
    ema_decay: float | None = None  # one of the checkpoint's EMA weights by decay (train.ema_decay or ema_extra)
    seed: int = 0  # the same seed and options give the same images
    compile: str = "auto"  # torch.compile: auto (on CUDA for jobs of at least generate.COMPILE_MIN_NFE), on, off

    def __post_init__(self) -> None:
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise UsageError(f"--guidance must be a finite number (got {self.guidance})")
        if self.ema is False and self.ema_decay is not None:
            raise UsageError("--ema-decay picks EMA weights; drop --no-ema")

    @property
    def model_specific(self) -> bool:
        """Whether any option that only a checkpoint can take (sampling it) was given."""
        return (self.spec != SamplerSpec() or self.guidance not in (None, 1.0) or self.guide is not None
                or self.ema is not None or self.ema_decay is not None or self.seed != 0 or self.compile != "auto")


@dataclass
class DrawPlan:
    """What will be drawn from, decided from the header alone: the checkpoint, its weights and guidance, and the
    sampler with every default filled in."""

    path: Path
    header: Header
    config: RunConfig
    spec: SamplerSpec  # resolved: no None left
    guidance: Guidance
    use_ema: bool
    ema_decay: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def weights(self) -> str:
        """Which weights are drawn from, in words (an export says what it was made of)."""
        if self.ema_decay is not None:
            return f"EMA {self.ema_decay}"
        if self.use_ema:
            return "EMA"
        source = self.header.metadata.get("source_weights")
        return f"exported {'raw' if source == 'model' else source.replace('ema', 'EMA', 1)}" if source else "raw"

    @property
    def ema_used(self) -> float | None:
        """The decay of the EMA weights drawn from (None: the raw weights)."""
        if self.ema_decay is not None:
            return self.ema_decay
        return self.config.train.ema_decay if self.use_ema else None


def plan_draw(checkpoint: str | Path, opts: DrawOptions) -> DrawPlan:
    """Check `opts` against a checkpoint's header and stored config; import no torch."""
    path, header, cfg = read_checkpoint_config(checkpoint)
    guidance = check_guidance(path, header, cfg, opts.guidance, opts.guide)
    warnings: list[str] = []
    if guidance.weight != 1.0 and guidance.guide is None and cfg.train.label_dropout == 0.0:
        warnings.append("this model was trained without label dropout (train.label_dropout = 0), so its 'no label' "
                        "input is untrained and --guidance will give poor images")
    warnings += opts.spec.warnings(cfg.diffusion.num_timesteps, guidance.default_sampler)
    has_ema = has_ema_weights(header)
    if opts.ema and not has_ema:
        raise UsageError(f"{path} has no EMA weights; drop --ema (or pass --no-ema)")
    use_ema = has_ema if opts.ema is None else opts.ema
    if opts.ema_decay is not None:
        require_ema_decay(header, cfg.train.ema_decay, opts.ema_decay)
        use_ema = True
    spec = opts.spec.resolved(guidance.default_sampler, cfg.diffusion.variance)
    return DrawPlan(path, header, cfg, spec, guidance, use_ema, opts.ema_decay, warnings)


def balanced_labels(n: int, num_classes: int) -> "torch.Tensor":
    """Classes in turn (0, 1, ..., K-1, 0, ...): every class gets n // K or n // K + 1 images."""
    import torch

    return torch.arange(n) % num_classes


@dataclass
class Drawer:
    """A network ready to draw from: the model (and autoguidance's guide), its diffusion, how to sample."""

    net: Callable  # model(x_t, t, y) -> epsilon or v, as inference_net prepares it (or a module in training)
    diffusion: Any
    spec: SamplerSpec
    image_shape: tuple[int, int, int]  # (C, H, W)
    null_class: int | None = None  # the model's "no label" class (num_classes) when it is conditional
    guidance: float = 1.0
    guide: Callable | None = None
    device: Any = "cpu"
    bf16: bool = False

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.net, "compiled", False))

    def batches(self, n: int, *, batch_size: int, seed: int = 0, labels: "torch.Tensor | None" = None,
                rank: int = 0, world: int = 1, on_step: Callable[[int, int], None] | None = None,
                ) -> Iterator[tuple[int, "torch.Tensor"]]:
        """(first index, uint8 images (b, C, H, W) on the CPU) of this rank's batches of `n` images: batch b (of
        even_batch's size) is made by rank b % world, so any number of ranks makes the images of one."""
        from ddpm_cli.engine.generate import even_batch, generate

        per = even_batch(n, batch_size)
        mine = range(rank, -(-n // per), world)
        for start, images, _ in generate(self.net, self.diffusion, n, self.spec, image_shape=self.image_shape,
                                         labels=labels, guidance=self.guidance, null_class=self.null_class,
                                         guide=self.guide, batch_size=per, seed=seed, device=self.device,
                                         bf16=self.bf16, batches=mine, on_step=on_step):
            yield start, images


def load_drawer(plan: DrawPlan, device: "torch.device", n: int, compile: str = "auto"):
    """(Drawer, Checkpoint): the planned weights and guide on `device`, prepared as sampling runs them
    (channels-last and bf16 on CUDA; compiled when the job is large enough to pay, see generate.sampling_net)."""
    from ddpm_cli.engine.checkpoint import load_guide, load_model
    from ddpm_cli.engine.generate import sampling_net

    model, diffusion, cfg, ckpt = load_model(plan.path, device, use_ema=plan.use_ema, ema_decay=plan.ema_decay)
    g, m = plan.guidance, cfg.model
    nfe = n * plan.spec.evaluations(diffusion.alpha_bar, guided=g.weight != 1.0)
    net = sampling_net(model, device, nfe, compile)
    guide = sampling_net(load_guide(g, ckpt, device), device, nfe, compile) if g.guide is not None else None
    drawer = Drawer(net, diffusion, plan.spec, m.image_shape(),
                    m.num_classes if m.conditional else None, g.weight, guide, device, bf16=device.type == "cuda")
    return drawer, ckpt


def draw(drawer: Drawer, n: int, *, batch_size: int, seed: int = 0, labels: "torch.Tensor | None" = None,
         dist: Any = None, each: Callable[[int, "torch.Tensor"], None] | None = None, gather: bool = True,
         on_step: Callable[[int, int], None] | None = None,
         on_batch: Callable[[int], None] | None = None) -> "torch.Tensor | None":
    """Draw `n` images: each rank (`dist`, a DistInfo; None: one process) its share of the batches, each batch
    handed to `each(first index, images)` as it comes and `on_batch(images this rank made so far)` told; then,
    with `gather`, all `n` uint8 images (N, C, H, W) in index order on rank 0 (None on the other ranks), by the
    one gather there is (DistInfo.gather_batches)."""
    from ddpm_cli.engine.distributed import DistInfo
    from ddpm_cli.engine.generate import even_batch

    dist = dist or DistInfo()
    kept, done = [], 0
    for start, images in drawer.batches(n, batch_size=batch_size, seed=seed, labels=labels, rank=dist.rank,
                                        world=dist.world, on_step=on_step):
        if each is not None:
            each(start, images)
        if gather:
            kept.append((start, images))
        done += images.shape[0]
        if on_batch is not None:
            on_batch(done)
    if not gather:
        return None
    return dist.gather_batches(kept, n, even_batch(n, batch_size), drawer.image_shape)
