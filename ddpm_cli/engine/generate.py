"""Generating images from a model in batches, reproducibly.

Image i starts from noise drawn with seed (seed, i), so deterministic samplers (DDIM with eta 0, DPM-Solver++)
give the same image i for any batch size or number of GPUs; stochastic samplers also draw per-step noise
from a generator seeded by (seed, first index of the batch), so they repeat exactly for the same batch size.

Batches are evened out (`even_batch`), and a compiled network (`compiled`) gets its short last batch padded
to the full size: torch.compile specialises on the batch size, and a second size would compile the network again
(tens of seconds on a GPU). A stochastic sampler's per-step noise is then drawn for the padded batch, so its last
batch differs between a compiled and an eager run (each repeats exactly)."""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Callable, Iterator

import torch

from ddpm_cli.diffusion.gaussian import GaussianDiffusion
from ddpm_cli.diffusion.sampler_spec import SamplerSpec
from ddpm_cli.diffusion.samplers import autoguided, guided, sample
from ddpm_cli.engine import compile_cache
from ddpm_cli.engine.build import sampler_compile_options
from ddpm_cli.nn.unet import channel_stats, fold_upsampling


def inference_net(model: torch.nn.Module, *, channels_last: bool = False, compile: str | None = None,
                  cudnn_benchmark: bool = True):
    """The network as a sampler calls it, with the speed switches applied: channels-last layout, GroupNorm from
    per-channel statistics with it (which it reads in order), each upsampling folded into one transposed
    convolution (the same function, 2.25x fewer multiply-adds there) and torch.compile (mode "default",
    "max-autotune" or "reduce-overhead" for CUDA graphs; with programmatic dependent launch where the GPU has
    it). `cudnn_benchmark`: on CUDA, have cuDNN time its algorithms for each new convolution shape and keep the
    fastest (it stays on for the process once set). BENCHMARKS.md has the figures. Changes `model` itself (eval
    mode, the GroupNorm and upsampling switches, channels-last): pass a model that only samples from here on; the
    model as it was, unfolded and eager, is the reference it is tested against."""
    model = channel_stats(model.eval(), channels_last)
    fold_upsampling(model, True)
    device = next(model.parameters()).device
    if device.type == "cuda" and cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # one batch shape, many calls: timing algorithms once pays
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if compile:  # dynamic=False: a new batch size or image size compiles its own static graph, never a symbolic one
        options = sampler_compile_options(compile, device)
        net = compile_cache.for_sampling(torch.compile(model, dynamic=False, options=options), model, compile, options,
                                         device, channels_last)  # loads an earlier process's compile, saves this one

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t, y)

    fn.compiled = bool(compile)  # generate() then pads a short last batch rather than compile a second shape
    fn.compile_cache = net if compile else None
    return fn


# torch.compile takes tens of seconds on a GPU; below this many image-evaluations (SamplerSpec.evaluations times
# the images) it does not pay for itself.
COMPILE_MIN_NFE = 200_000


def sampling_net(model: torch.nn.Module, device: torch.device, nfe: int, compile: str = "auto"):
    """The network as `ddpm sample` and `ddpm eval` run it (with generate's bf16 on CUDA), so that both draw the
    same images: on CUDA channels-last, and compiled (auto) for jobs of at least COMPILE_MIN_NFE evaluations.
    cuDNN times its algorithms only for jobs that large (or compiled) too: a small one (a 64-image grid makes ~40
    calls) is likely to spend longer choosing than it saves (benchmarks/bench_startup.py times it), and without
    the timing every process picks the same algorithms."""
    cuda = device.type == "cuda"
    on = compile == "on" or (compile == "auto" and cuda and nfe >= COMPILE_MIN_NFE)
    return inference_net(model, channels_last=cuda, compile="default" if on else None,
                         cudnn_benchmark=on or nfe >= COMPILE_MIN_NFE)


# The sampling batch when none is given: on a GPU the one the speed figures use for 32x32 images (a GPU keeps
# gaining throughput up to about this batch; BENCHMARKS.md), fewer for larger images so that memory stays about
# the same; on the CPU larger batches gain nothing and hold more memory.
BATCH_CUDA, BATCH_CPU = 1000, 256


def default_batch(image_size: int | tuple[int, int], cuda: bool) -> int:
    """Images per sampling batch by default: BATCH_CUDA at 32x32 on a GPU, scaled by the pixels of an image
    (image_size: a side, or (height, width))."""
    base = BATCH_CUDA if cuda else BATCH_CPU
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return max(1, base * 32 * 32 // max(32 * 32, height * width))


def even_batch(n: int, batch_size: int) -> int:
    """The batch size generate() uses for `n` images and at most `batch_size` a batch: the same number of batches,
    evened out (10,000 images at 256: 40 batches of 250, not 39 of 256 and one of 16). even_batch of its own
    result is that result, so callers that plan batches themselves (ranks under torchrun) agree with generate."""
    batches = -(-n // max(1, batch_size))
    return -(-n // batches) if n > 0 else batch_size


def initial_noise(indices: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting noise x_T of images `indices` of a draw with `seed`: image i's from its own generator, so an
    image is the same whatever the batch it falls in."""
    g = torch.Generator()
    return torch.stack([torch.randn(shape, generator=g.manual_seed(noise_seed("image", seed, i))) for i in indices])


def noise_seed(stream: str, seed: int, index: int) -> int:
    """The seed of one noise stream of a draw: "image" (image `index`'s starting noise) or "step" (the per-step
    noise of the batch whose first image is `index`); a hash of all three, so that no two streams of any seeds
    meet. (Arithmetic seeds did: image 1,000,003 of seed 0 started from image 0 of seed 1's noise, and the first
    batch's first step drew image 1's.)"""
    digest = hashlib.blake2b(f"ddpm {stream} noise {seed} {index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any generator takes it


def step_noise_seed(seed: int, start: int) -> int:
    """The seed of the per-step noise of the batch whose first image is `start` (noise_seed's "step" stream)."""
    return noise_seed("step", seed, start)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(model: Callable, diffusion: GaussianDiffusion, n: int, spec: SamplerSpec = SamplerSpec(), *,
             image_shape: tuple[int, int, int], labels: torch.Tensor | None = None, guidance: float = 1.0,
             null_class: int | None = None, guide: Callable | None = None, batch_size: int = 256, seed: int = 0,
             device: torch.device | str = "cpu", bf16: bool = False, batches: range | None = None,
             on_step: Callable[[int, int], None] | None = None,
             ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield (first index, uint8 images (b, C, H, W) on the CPU, labels or None) batch by batch, sampled as `spec`
    says (passed straight to samplers.sample).

    `guidance` W is classifier-free (against the null class) for a conditional model, or autoguidance against
    `guide`, a weaker network, when one is given. `batches` picks which batch numbers to make (multi-GPU: each
    rank a slice); default all. A network marked `compiled` (inference_net's, when it compiles) gets every
    batch at the full size: a short last one is padded with the next indices' noise, and those images dropped."""
    device = torch.device(device)
    static = getattr(model, "compiled", False) or getattr(guide, "compiled", False)
    batch_size = even_batch(n, batch_size)
    net = model
    if guide is not None:
        net = autoguided(model, guide, guidance)
    elif labels is not None and guidance != 1.0:
        if null_class is None:
            raise ValueError("classifier-free guidance needs null_class (the model's num_classes)")
        net = guided(model, guidance, null_class)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    num_batches = (n + batch_size - 1) // batch_size
    spans = [range(b * batch_size, min(n, (b + 1) * batch_size))
             for b in (batches if batches is not None else range(num_batches))]  # image indices of each batch
    drawn = lambda span: range(span.start, span.start + batch_size) if static else span  # noqa: E731
    upcoming = initial_noise(drawn(spans[0]), image_shape, seed) if spans else None
    for i, span in enumerate(spans):
        start, size = span.start, len(span)
        x = upcoming.to(device)
        y = None
        if labels is not None:
            y = labels[start:span.stop]
            y = torch.cat([y, y[-1:].expand(x.shape[0] - size)]).to(device)  # padded images take the last label
        gen = torch.Generator(device=device).manual_seed(step_noise_seed(seed, start))
        with amp:
            out = sample(net, diffusion, x, y, spec, generator=gen, on_step=on_step)
        # On a GPU the sampling steps are only queued so far: draw the next batch's noise (image by image) while
        # they run, not after the images come back with the GPU idle.
        if i + 1 < len(spans):
            upcoming = initial_noise(drawn(spans[i + 1]), image_shape, seed)
        yield start, to_uint8(out[:size]).cpu(), (y[:size].cpu() if y is not None else None)
