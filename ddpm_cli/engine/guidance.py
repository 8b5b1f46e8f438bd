"""Guidance policy: how a checkpoint will be guided (classifier-free, autoguidance by its stored guide or by another
checkpoint, or not at all), the one check of `--guidance` and `--guide-model`, and which sampler is the default."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddpm_cli.config import RunConfig
from ddpm_cli.engine.checkpoint import Header, class_names, read_checkpoint_config, stored_guide_step
from ddpm_cli.errors import CheckpointError, DdpmError, UsageError


@dataclass
class Guidance:
    """How a checkpoint will be guided: `weight` (1 = not at all); autoguidance when `guide` names the file that
    holds the guide's weights (`stored_step`: the checkpoint's own guide.* weights, of that step), else
    classifier-free."""

    weight: float = 1.0
    guide: Path | None = None
    stored_step: int | None = None

    @property
    def default_sampler(self) -> str:
        """DPM-Solver++(2M) (20 steps) with a stored guide, as measured (BENCHMARKS.md); DDIM (100) otherwise."""
        return "dpm++2m" if self.stored_step is not None else "ddim"

    def describe(self) -> str:
        """A few words for the command's header line ("" when unguided)."""
        if self.weight == 1.0:
            return ""
        if self.guide is None:
            return f"classifier-free guidance {self.weight:g}"
        by = f"its step-{self.stored_step} weights" if self.stored_step is not None else str(self.guide)
        return f"autoguided by {by} at {self.weight:g}"


def _betas(cfg: RunConfig) -> tuple[float, ...]:
    """The noise schedule itself (whatever fields produced it): what two models must share to guide each other."""
    from ddpm_cli.diffusion.schedules import make_betas

    d = cfg.diffusion
    return tuple(make_betas(d.schedule, d.num_timesteps, d.schedule_low, d.schedule_high, d.dns_offset).tolist())


def guide_mismatch(cfg: RunConfig, g: RunConfig, names: list[str] = (), guide_names: list[str] = ()) -> list[str]:
    """What an autoguidance guide of config `g` cannot differ in from the model of `cfg`, and does: the kind of
    images and the noise levels, and the quantity predicted (the two outputs are combined before either becomes
    noise). `names`: each one's class names, where known."""
    m, gm = cfg.model, g.model
    differ = [what for what, a, b in (
        ("image size", m.hw, gm.hw),
        ("channels", m.in_channels, gm.in_channels),
        ("classes", (m.conditional, m.conditional and m.num_classes),
         (gm.conditional, gm.conditional and gm.num_classes)),
        ("noise schedule", _betas(cfg), _betas(g)),
        ("prediction (diffusion.prediction)", cfg.diffusion.prediction, g.diffusion.prediction)) if a != b]
    if m.conditional and gm.conditional and names and guide_names and list(names) != list(guide_names):
        differ.append("class names")  # the same number of classes, but label i is another class
    return differ


def check_guidance(path: Path, header: Header, cfg: RunConfig, guidance: float | None,
                   guide: str | Path | None) -> Guidance:
    """The one check of `--guidance W` and `--guide-model G|none` against a checkpoint (sample and eval).

    A checkpoint that carries a guide (train.guide_step) is autoguided by it at train.guide_weight unless told
    otherwise; `--guide-model none` turns that off, `--guidance 1` too. With `--guide-model G`, W is autoguidance
    by G, which must draw the same kind of images from the same noise levels (image shape, classes, noise
    schedule) and predict the same quantity (the two outputs are combined before either becomes noise); its
    size and training may differ, that is the point. Otherwise W is classifier-free guidance,
    which needs a class-conditional model."""
    stored = stored_guide_step(header)
    if guide is None and guidance != 1.0 and stored is not None:
        return Guidance(cfg.train.guide_weight if guidance is None else guidance, path, stored)
    if guide is None or str(guide) == "none":
        weight = 1.0 if guidance is None else guidance
        if weight != 1.0 and not cfg.model.conditional:
            raise UsageError("--guidance needs a class-conditional checkpoint, or a weaker model to guide with "
                             "(--guide-model, e.g. an earlier checkpoint of the same run); this one is "
                             "unconditional")
        return Guidance(weight)
    if guidance == 1.0:
        raise UsageError("--guide-model has no effect at --guidance 1; pass a guidance weight above 1 (e.g. "
                         "--guidance 2)")
    try:
        guide_path, guide_header, g = read_checkpoint_config(guide)
    except CheckpointError as e:
        raise CheckpointError(f"--guide-model: {e}") from None
    if guide_path.resolve() == path.resolve():
        raise UsageError(f"--guide-model {guide} is the checkpoint itself ({guide_path.name}), which guides nothing; "
                         f"pass an earlier checkpoint of the run (its checkpoints/ckpt-*.safetensors)")
    differ = guide_mismatch(cfg, g, class_names(header.metadata), class_names(guide_header.metadata))
    if differ:
        raise CheckpointError(f"the guide model {guide_path} differs from the checkpoint in its "
                              f"{' and '.join(differ)}; guide with an earlier checkpoint of the same run, or a model "
                              f"trained on the same data and schedule")
    return Guidance(cfg.train.guide_weight if guidance is None else guidance, guide_path)
