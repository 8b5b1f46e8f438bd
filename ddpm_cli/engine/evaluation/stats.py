"""The Inception statistics of a set of images: computing them (mean, covariance and the feature rows KID needs),
and the statistics file (a NumPy .npz of plain arrays, no pickle). Progress goes through EvalCallbacks.

Pipeline: uint8 images (B, C, H, W) -> Inception pool3 features (B, 2048) -> FeatureStats."""
from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddpm_cli import __version__
from ddpm_cli.engine.evaluation.inception import Inception, short_reason
from ddpm_cli.engine.files import atomic_write_bytes, cut_short_message, zip_cut_short
from ddpm_cli.errors import DataError, DdpmError

if TYPE_CHECKING:
    from ddpm_cli.engine.evaluation.sources import ImageSource

STATS_FORMAT = "ddpm-fid-stats"
STATS_VERSION = 1
# KID needs feature rows, not just moments. A stats file keeps all rows up to this many and a fixed random subset
# beyond (50,000 x 2048 float32 would be 400 MB); KID's subsets of 1,000 are then drawn from those rows.
KID_FEATURES_MAX = 10_000


class EvalCallbacks:
    """What `evaluate` reports while it runs; the CLI shows a progress bar. Every method is optional."""

    def on_phase(self, name: str, total: int) -> None: ...  # a new stage over `total` images begins
    def on_advance(self, done: int) -> None: ...  # images finished in the current stage
    def on_message(self, text: str) -> None: ...  # a note for the user
    def on_warning(self, text: str) -> None: ...  # a warning (callbacks without it get it as a message)


def notify(callbacks: Any, name: str, *args: Any) -> None:
    fn = getattr(callbacks, name, None) if callbacks is not None else None
    if fn is None and name == "on_warning":
        fn = getattr(callbacks, "on_message", None) if callbacks is not None else None
    if fn is not None:
        fn(*args)



@dataclass
class FeatureStats:
    """The Inception statistics of one set of images."""

    mu: np.ndarray  # (d,) float64 mean of the features
    sigma: np.ndarray  # (d, d) float64 covariance (unbiased, n - 1)
    n: int | None  # images the statistics are of (None: a foreign stats file that does not say)
    features: np.ndarray | None  # (k, d) float32 rows for KID: all n, or a fixed random KID_FEATURES_MAX of them
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def complete(self) -> bool:
        """Holds every feature row (then FID can use the cheaper exact low-rank route)."""
        return self.features is not None and self.n is not None and self.features.shape[0] == self.n


class _Moments:
    """Streaming mean and covariance in float64 on the features' device. Sums are taken around the first batch's
    mean (the shifted-data algorithm), so no precision is lost to large means."""

    def __init__(self) -> None:
        self.n = 0
        self.shift = self.s1 = self.s2 = None

    def add(self, f: torch.Tensor) -> None:  # (B, d)
        x = f.double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        y = x - self.shift
        self.s1 += y.sum(0)
        self.s2 += y.T @ y
        self.n += x.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * torch.outer(m, m)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2
        return (self.shift + m).cpu().numpy(), sigma.cpu().numpy()


def _kid_rows(count: int, cap: int) -> np.ndarray | None:
    """Which of `count` images keep their feature row for KID: None (all) or a sorted fixed random `cap`."""
    if count <= cap:
        return None
    return np.sort(np.random.RandomState(12345).choice(count, cap, replace=False))


def compute_stats(source: "ImageSource", inception: Inception, *, batch_size: int = 64,
                  callbacks: EvalCallbacks | None = None, phase: str = "images",
                  kid_features_max: int = KID_FEATURES_MAX) -> FeatureStats:
    """Run every image of `source` through Inception; return its statistics and the feature rows KID needs."""
    seen_warnings = len(source.warnings)
    source.ready()
    keep = _kid_rows(source.count, kid_features_max)
    mask = None
    if keep is not None:
        mask = np.zeros(source.count, dtype=bool)
        mask[keep] = True
    moments, rows, done, size = _Moments(), [], 0, None
    notify(callbacks, "on_phase", phase, source.count)
    for batch in source.batches(batch_size):
        size = size or list(batch.shape[-2:])  # (H, W) of the images as they came, before Inception's resize
        f = inception(batch)  # (B, 2048)
        moments.add(f)
        b = f.shape[0]
        if mask is None:
            rows.append(f.float().cpu())
        else:
            sel = torch.from_numpy(mask[done:done + b])
            if sel.any():
                rows.append(f[sel.to(f.device)].float().cpu())
        done += b
        notify(callbacks, "on_advance", done)
        for w in source.warnings[seen_warnings:]:
            notify(callbacks, "on_message", w)
        seen_warnings = len(source.warnings)
    for w in source.warnings[seen_warnings:]:  # those a source adds when it is exhausted
        notify(callbacks, "on_message", w)
    if done < 2:
        raise DataError(f"{source.name}: {done} image(s) could be read; FID needs at least 2")
    mu, sigma = moments.result()
    features = torch.cat(rows).numpy()
    meta = {"source": source.name, "inception": inception.identity, "ddpm_version": __version__,
            "image_size": size, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return FeatureStats(mu, sigma, done, features, meta)


def save_stats(stats: FeatureStats, path: str | Path) -> Path:
    """Write statistics as a NumPy .npz of plain arrays (readable with allow_pickle=False; no pickle)."""
    path = Path(path)
    feats = stats.features if stats.features is not None else np.zeros((0, stats.dim), dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, format=np.array(STATS_FORMAT), version=np.array(STATS_VERSION),
             mu=stats.mu.astype(np.float64), sigma=stats.sigma.astype(np.float64),
             n=np.array(-1 if stats.n is None else stats.n, dtype=np.int64),
             features=feats.astype(np.float32), meta=np.array(json.dumps(stats.meta)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise DdpmError(f"cannot write statistics {path}: {e.strerror or e}") from None
    return path


def open_npz(path: Path):
    try:
        if zip_cut_short(path):
            raise DataError(cut_short_message(str(path)))
        if not zipfile.is_zipfile(path):  # else numpy calls any non-.npy file "pickled data"
            with open(path, "rb") as f:
                single = f.read(6) == b"\x93NUMPY"
            raise DataError(f"{path} holds a single .npy array, not an .npz of named arrays" if single else
                            f"{path} is not an .npz file (not a zip archive of arrays)")
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({short_reason(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single .npy array, not an .npz of named arrays")
    return z


def is_stats(z) -> bool:
    return "mu" in z.files and "sigma" in z.files


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by save_stats (or any .npz with `mu` and `sigma`, e.g. pytorch-fid's: FID only)."""
    path = Path(path)
    fix = f"recompute it with `ddpm eval --ref IMAGES --save-stats {path}`"
    if not path.is_file():
        raise DataError(f"statistics file {path} not found; {fix}")
    with open_npz(path) as z:
        if not is_stats(z):
            raise DataError(f"{path} is not a statistics file (no 'mu' and 'sigma' arrays); {fix}")
        try:
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
            n = int(z["n"]) if "n" in z.files else -1
            feats = np.asarray(z["features"], dtype=np.float32) if "features" in z.files else None
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            if "format" in z.files and str(z["format"]) != STATS_FORMAT:
                raise ValueError(f"format {str(z['format'])!r}")
            if "version" in z.files and int(z["version"]) > STATS_VERSION:
                raise ValueError(f"written by a newer ddpm (version {int(z['version'])})")
        except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path} is not a readable statistics file ({short_reason(e)}); {fix}") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise DataError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not fit together; {fix}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{path} holds non-finite statistics; {fix}")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != d or feats.shape[0] == 0):
        feats = None
    return FeatureStats(mu, sigma, n if n > 0 else None, feats, meta if isinstance(meta, dict) else {})
