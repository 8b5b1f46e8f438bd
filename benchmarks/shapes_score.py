"""How recognisable are samples of a model trained on the built-in `shapes` data? A small CNN, trained here on
the fly (seconds on a CPU, no weights shipped), sorts an image into the 10 shape classes or an 11th class,
"not a shape" (pixel noise, smooth noise textures, flat colour, half-and-half blends of two shapes).

- recognisable: the fraction of images it calls a shape with confidence >= `threshold` (for unconditional
  samples; real shapes score about 1, noise about 0);
- accuracy: the fraction called, with that confidence, the class they were drawn for (class-conditional samples).

Usage:
    python benchmarks/shapes_score.py GRID.png [GRID.png ...] [--conditional]   # score sample grids
    python benchmarks/shapes_score.py --check                                     # real shapes vs noise
The quickstart benchmark (train the shipped config, time it, score its grid) is benchmarks/bench_quickstart.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_cli.engine.data import SHAPE_CLASSES, make_shapes  # noqa: E402

NONE = len(SHAPE_CLASSES)  # the "not a shape" class
SCORER_SEED = 9001  # shapes drawn with a seed of their own: no image the scored model trained on
THRESHOLD = 0.9


def negatives(n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """n uint8 images (n, C, H, W) that are no shape: the failure modes of an undertrained model."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.arange(n) % 4
    out = torch.empty(n, channels, size, size)
    k0 = kind == 0  # pixel noise, any mean and spread
    m = int(k0.sum())
    out[k0] = (torch.rand(m, channels, 1, 1, generator=g) + torch.randn(m, channels, size, size, generator=g)
               * (0.25 + 0.35 * torch.rand(m, 1, 1, 1, generator=g)))
    k1 = kind == 1  # smooth noise textures (blobs of a few pixels)
    m = int(k1.sum())
    low = torch.rand(m, channels, 4, 4, generator=g)
    out[k1] = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    k2 = kind == 2  # flat colour, a little noise
    m = int(k2.sum())
    out[k2] = torch.rand(m, channels, 1, 1, generator=g) + 0.03 * torch.randn(m, channels, size, size, generator=g)
    k3 = kind == 3  # two shapes of different classes blended half and half: neither is what a viewer sees
    m = int(k3.sum())
    a = make_shapes(2 * m, size, channels, seed + 1).images.float() / 255
    perm = torch.randperm(2 * m, generator=g)
    a, b = a[perm[:m]], a[perm[m:]]
    out[k3] = 0.5 * a + 0.5 * b
    return (out.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shapes as a diffusion model draws them early on still count as shapes: grain (pixel noise up to a std of
    0.12), colours pushed to saturation, mirror images. x: uint8 (B, C, H, W)."""
    b = x.shape[0]
    y = x.float() / 255
    y = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.5, y.flip(-1), y)
    y = 0.5 + (y - 0.5) * (0.8 + torch.rand(b, 1, 1, 1, generator=g))
    y = y + torch.randn(y.shape, generator=g) * 0.12 * torch.rand(b, 1, 1, 1, generator=g)
    return (y.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


class Net(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, NONE + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: uint8 (B, C, H, W)
        return self.body(x.float() / 127.5 - 1.0)


@dataclass
class Score:
    n: int
    recognisable: float          # called a shape with confidence >= threshold
    p_shape: float               # mean probability of "some shape" (1 - p(not a shape)): a graded score
    accuracy: float | None       # called the class asked for (conditional samples)
    p_label: float | None        # mean probability of the class asked for: a graded accuracy
    per_class: list[float] | None  # accuracy of each class
    predicted: list[int]         # argmax class per image (NONE = not a shape)

    def summary(self) -> dict:
        out = {"n": self.n, "recognisable": round(self.recognisable, 4), "p_shape": round(self.p_shape, 4)}
        if self.accuracy is not None:
            out["accuracy"] = round(self.accuracy, 4)
            out["p_label"] = round(self.p_label, 4)
            out["per_class"] = [round(a, 3) for a in self.per_class]
        return out


class ShapesScorer:
    """Train once (a few seconds), then score any number of image sets of that size."""

    def __init__(self, image_size: int = 16, channels: int = 3, count: int = 5000, epochs: int = 6,
                 seed: int = SCORER_SEED, threshold: float = THRESHOLD):
        self.image_size, self.channels, self.threshold = image_size, channels, threshold
        torch.manual_seed(seed)
        pos = make_shapes(count, image_size, channels, seed)
        neg = negatives(count // 3, image_size, channels, seed)
        x = torch.cat([pos.images, neg])
        y = torch.cat([pos.labels, torch.full((len(neg),), NONE)])
        self.net = Net(channels)
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 128):
                idx = perm[i:i + 128]
                xb, yb = x[idx], y[idx]
                pos = yb != NONE
                xb[pos] = jitter(xb[pos], g)
                loss = F.cross_entropy(self.net(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 11) class probabilities for uint8 images (N, C, H, W); column 10 is "not a shape"."""
        if images.dtype != torch.uint8:
            raise ValueError("images must be uint8 (N, C, H, W)")
        if tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[1:])}, the scorer was trained on "
                             f"{(self.channels, self.image_size, self.image_size)}")
        return torch.cat([self.net(images[i:i + 512]).softmax(-1) for i in range(0, len(images), 512)])

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Score:
        p = self.probs(images)
        conf, pred = p.max(-1)
        sure = (conf >= self.threshold) & (pred != NONE)
        acc = per = p_label = None
        if labels is not None:
            hit = sure & (pred == labels)
            acc = float(hit.float().mean())
            p_label = float(p.gather(1, labels.long()[:, None]).mean())
            per = [float(hit[labels == c].float().mean()) if (labels == c).any() else math.nan
                   for c in range(NONE)]
        return Score(len(images), float(sure.float().mean()), float(1 - p[:, NONE].mean()), acc, p_label, per,
                     pred.tolist())


def read_grid(path: Path, image_size: int, padding: int = 2) -> tuple[torch.Tensor, int, int]:
    """The tiles of a torchvision `save_image` grid as uint8 (N, C, H, W), with its rows and columns."""
    from PIL import Image

    arr = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    cell = image_size + padding
    rows, cols = (arr.shape[1] - padding) // cell, (arr.shape[2] - padding) // cell
    tiles = [arr[:, padding + r * cell:padding + r * cell + image_size,
                 padding + c * cell:padding + c * cell + image_size]
             for r in range(rows) for c in range(cols)]
    return torch.stack(tiles).contiguous(), rows, cols


def score_grid(scorer: ShapesScorer, path: Path, conditional: bool) -> Score:
    """A training grid as `ddpm train` writes it: unconditional, or one row per class (row r = class r)."""
    tiles, rows, cols = read_grid(path, scorer.image_size)
    labels = torch.arange(rows).repeat_interleave(cols) if conditional else None
    if conditional and rows != NONE:
        raise ValueError(f"{path}: {rows} rows, a conditional grid has one per class ({NONE})")
    return scorer.score(tiles, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grids", nargs="*", type=Path, help="sample grids (PNG) or `ddpm sample --format npz` files")
    ap.add_argument("--conditional", action="store_true", help="grids have one row per class")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--check", action="store_true", help="score held-out real shapes and the negatives")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scorer = ShapesScorer(args.image_size)
    if args.check:
        real = make_shapes(1000, args.image_size, 3, seed=0)  # the quickstart's own data (data.shapes_seed 0)
        print("BENCH real", json.dumps(scorer.score(real.images, real.labels).summary()))
        noise = negatives(1000, args.image_size, 3, seed=1)
        print("BENCH negatives", json.dumps(scorer.score(noise).summary()))
    for g in args.grids:
        if g.suffix == ".npz":  # `ddpm sample --format npz`: arr_0 (N, H, W, C) uint8, labels when conditional
            z = np.load(g)
            labels = torch.from_numpy(z["labels"]).long() if "labels" in z.files else None
            score = scorer.score(torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous(), labels)
        else:
            score = score_grid(scorer, g, args.conditional)
        print("BENCH", g, json.dumps(score.summary()))


if __name__ == "__main__":
    main()
