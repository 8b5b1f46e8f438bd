"""Sample quality: FID and KID on TF-Inception (2015-12-05) pool features, computed by torch-fidelity's
FeatureExtractorInceptionV3 with its TensorFlow-compatible resize; reference statistics (compute, save, load and
cache); and scoring a checkpoint by sampling it. Never prints: progress goes through EvalCallbacks.

Pipeline: uint8 images (B, C, H, W) -> Inception pool3 features (B, 2048) -> FeatureStats (mean, covariance and
the rows KID needs) -> FID (Frechet distance of two Gaussians) and KID (unbiased MMD^2, cubic polynomial kernel)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ddpm_cli import __version__
from ddpm_cli.engine.data import IMAGE_EXTENSIONS
from ddpm_cli.engine.distributed import DistInfo
from ddpm_cli.engine.files import atomic_write_bytes
from ddpm_cli.engine.guidance import Guidance
from ddpm_cli.errors import DataError, DdpmError

FEATURE_LAYER = "2048"  # torch-fidelity's name for the 2048-d pool3 features that FID and KID use
FEATURE_DIM = 2048
STATS_FORMAT = "ddpm-fid-stats"
STATS_VERSION = 1
# KID needs feature rows, not just moments. A stats file keeps all rows up to this many and a fixed random subset
# beyond (50,000 x 2048 float32 would be 400 MB); KID's subsets of 1,000 are then drawn from those rows.
KID_FEATURES_MAX = 10_000
KID_SEED = 2020  # torch-fidelity's default rng_seed, so KID subsets are drawn as its calculate_metrics draws them
CIFAR10_REFS = ("cifar10-train", "cifar10-test")
NPZ_IMAGE_KEYS = ("images", "samples", "arr_0")


class EvalCallbacks:
    """What `evaluate` reports while it runs; the CLI shows a progress bar. Every method is optional."""

    def on_phase(self, name: str, total: int) -> None: ...  # a new stage over `total` images begins
    def on_advance(self, done: int) -> None: ...  # images finished in the current stage
    def on_message(self, text: str) -> None: ...  # a warning or a note for the user


def _cb(callbacks: Any, name: str, *args: Any) -> None:
    fn = getattr(callbacks, name, None) if callbacks is not None else None
    if fn is not None:
        fn(*args)


# ----------------------------------------------------------------------------------------------------------
# Inception (torch-fidelity's network, weights and resize; nothing home-made)


def _fidelity_version() -> str:
    try:
        from torch_fidelity.version import __version__ as v
    except ImportError:
        return "unknown"
    return v


@contextmanager
def _exact_fp32(device: torch.device):
    """No TF32 on CUDA while features are computed: the reference statistics must not depend on the card."""
    if device.type != "cuda":
        yield
        return
    saved = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch calls these flags legacy; they still work
        try:
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        except RuntimeError:  # torch refuses the legacy flags once the new fp32_precision API was used
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 with C in 1, 3, 4 -> (B, 3, H, W): grayscale repeated, alpha dropped."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise DataError(f"expected uint8 image batches (B, C, H, W), got {got}")
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    if c == 4:
        return images[:, :3]
    raise DataError(f"images have {c} channels; FID needs 1 (grayscale), 3 (RGB) or 4 (RGBA)")


class Inception:
    """torch-fidelity's TF-compatible InceptionV3: uint8 image batches -> 2048-d pool features (float32)."""

    def __init__(self, net: torch.nn.Module, device: torch.device, weights_id: str):
        self.net, self.device, self.weights_id = net, device, weights_id

    @property
    def input_size(self) -> int:
        """The side the images are resized to inside the network (299)."""
        return int(self.net.INPUT_IMAGE_SIZE)

    @property
    def identity(self) -> dict:
        """What the features depend on: weights, resize target, feature layer and the library's version."""
        return {"weights": self.weights_id, "input_size": self.input_size, "layer": FEATURE_LAYER,
                "torch_fidelity": _fidelity_version()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, 2048) float32 on self.device."""
        x = as_rgb_uint8(images).to(self.device, non_blocking=True)
        with _exact_fp32(self.device):
            (features,) = self.net(x)
        return features


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# All that the pickle inside a state dict written by torch.save (protocol 2) calls: tensor rebuilding.
_STATE_DICT_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                       "torch._utils _rebuild_parameter"} | \
    {f"torch {t}Storage" for t in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte",
                                    "Bool")}


def check_state_dict_file(blob: bytes, path: Path) -> None:
    """Refuse a .pth that is more than a state dict of tensors, without unpickling it: its pickle's opcodes are
    read with pickletools and every global it would call must be one that rebuilds tensors. (torch-fidelity then
    loads the file with torch.load; this check is why that is safe.)"""
    from pickletools import genops  # reads opcodes; never unpickles

    what = f"{path} is not a PyTorch state dict (torch.save's zip format); --inception-weights takes " \
           f"torch-fidelity's InceptionV3 weights (.pth)"
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise DdpmError(what)
            data = zf.read(pickles[0])
        for op, arg, _ in genops(data):
            if op.name in ("GLOBAL", "INST") and arg not in _STATE_DICT_GLOBALS:
                raise DdpmError(f"{path}: refused, its pickle would call {arg.replace(' ', '.')}, which a state "
                                f"dict of tensors never needs")
            if op.name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
                raise DdpmError(f"{path}: refused, its pickle looks up objects in a way torch.save does not "
                                f"({op.name}); re-save the state dict with torch.save")
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:  # not a zip, or a corrupt pickle
        raise DdpmError(f"{what} ({_short(e)})") from None


def check_inception_path(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DdpmError(f"Inception weights {path} not found; pass a .pth state dict in torch-fidelity's format "
                        f"to --inception-weights, or leave it out to download torch-fidelity's own")
    return path


def load_inception(weights: str | Path | None = None, device: torch.device | str = "cpu") -> Inception:
    """torch-fidelity's FeatureExtractorInceptionV3 on `device`.

    `weights`: a state dict in torch-fidelity's format (its feature_extractor_weights_path); None downloads
    torch-fidelity's own. The file is checked first (check_state_dict_file), so one that is more than a state
    dict of tensors is refused before torch-fidelity loads it."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError:
        raise DdpmError("FID and KID need torch-fidelity: pip install 'ddpm-cli[eval]' (or pip install "
                        "torch-fidelity)") from None
    device = torch.device(device)
    path = None
    if weights is None:
        weights_id = "torch-fidelity:" + URL_INCEPTION_V3.rsplit("/", 1)[-1]
    else:
        path = check_inception_path(weights)
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise DdpmError(f"cannot read Inception weights {path}: {e.strerror or e}") from None
        check_state_dict_file(blob, path)
        weights_id = "sha256:" + hashlib.sha256(blob).hexdigest()[:16]
        del blob
    try:
        with redirect_stdout(sys.stderr):  # its download progress must not mix with our stdout
            net = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER],
                                              feature_extractor_weights_path=str(path) if path else None)
    except OSError as e:  # URLError when offline, disk errors in the hub cache
        raise DdpmError(f"could not download torch-fidelity's Inception weights ({_short(e)}); offline, pass "
                        f"--inception-weights PATH (a .pth in torch-fidelity's format)") from None
    except RuntimeError as e:  # load_state_dict(strict=True) mismatch
        raise DdpmError(f"{path} does not fit torch-fidelity's InceptionV3 ({_short(e)}); pass weights in "
                        f"torch-fidelity's format") from None
    return Inception(net.to(device).eval(), device, weights_id)


# ----------------------------------------------------------------------------------------------------------
# Feature statistics


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
    _ready(source)
    keep = _kid_rows(source.count, kid_features_max)
    mask = None
    if keep is not None:
        mask = np.zeros(source.count, dtype=bool)
        mask[keep] = True
    moments, rows, done = _Moments(), [], 0
    _cb(callbacks, "on_phase", phase, source.count)
    for batch in source.batches(batch_size):
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
        _cb(callbacks, "on_advance", done)
        for w in source.warnings[seen_warnings:]:
            _cb(callbacks, "on_message", w)
        seen_warnings = len(source.warnings)
    for w in source.warnings[seen_warnings:]:  # those a source adds when it is exhausted
        _cb(callbacks, "on_message", w)
    if done < 2:
        raise DataError(f"{source.name}: {done} image(s) could be read; FID needs at least 2")
    mu, sigma = moments.result()
    features = torch.cat(rows).numpy()
    meta = {"source": source.name, "inception": inception.identity, "ddpm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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


def _open_npz(path: Path):
    try:
        if not zipfile.is_zipfile(path):  # else numpy calls any non-.npy file "pickled data"
            with open(path, "rb") as f:
                single = f.read(6) == b"\x93NUMPY"
            raise DataError(f"{path} holds a single .npy array, not an .npz of named arrays" if single else
                            f"{path} is not an .npz file (not a zip archive of arrays)")
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({_short(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single .npy array, not an .npz of named arrays")
    return z


def _is_stats(z) -> bool:
    return "mu" in z.files and "sigma" in z.files


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by save_stats (or any .npz with `mu` and `sigma`, e.g. pytorch-fid's: FID only)."""
    path = Path(path)
    fix = f"recompute it with `ddpm eval --ref IMAGES --save-stats {path}`"
    if not path.is_file():
        raise DataError(f"statistics file {path} not found; {fix}")
    with _open_npz(path) as z:
        if not _is_stats(z):
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
            raise DataError(f"{path} is not a readable statistics file ({_short(e)}); {fix}") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise DataError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not fit together; {fix}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{path} holds non-finite statistics; {fix}")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != d or feats.shape[0] == 0):
        feats = None
    return FeatureStats(mu, sigma, n if n > 0 else None, feats, meta if isinstance(meta, dict) else {})


# ----------------------------------------------------------------------------------------------------------
# FID and KID


def _trace_sqrt_product(a: FeatureStats, b: FeatureStats, device: torch.device | str = "cpu") -> float:
    """tr sqrt(S_a S_b). The eigenvalues of S_a S_b are real and >= 0 (a product of PSD matrices); they are taken
    from a symmetric PSD matrix with the same nonzero spectrum, which is exact and well conditioned. float64
    throughout, on `device` (a GPU's solver takes a fraction of a second for d = 2048)."""
    as64 = lambda arr: torch.from_numpy(np.asarray(arr)).to(device=device, dtype=torch.float64)  # noqa: E731
    for x, y in ((a, b), (b, a)):
        if x.complete and x.n <= x.dim:  # S_x = C^T C / (n - 1): spectrum of C S_y C^T / (n - 1), (n, n)
            f = as64(x.features)
            c = f - f.mean(0)
            m = c @ as64(y.sigma) @ c.T / (x.n - 1)
            return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())
    sa, sb = as64(a.sigma), as64(b.sigma)
    for x, y in ((sa, sb), (sb, sa)):
        chol, info = torch.linalg.cholesky_ex(x)  # S_x = L L^T: spectrum of L^T S_y L
        if int(info) == 0:
            m = chol.T @ y @ chol
            return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())
    w, v = torch.linalg.eigh(sa)  # both singular: S_a^(1/2) S_b S_a^(1/2) (slower)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root @ sb @ root
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())


def frechet_distance(a: FeatureStats, b: FeatureStats, device: torch.device | str = "cpu") -> float:
    """FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b) (Heusel et al. 2017)."""
    if a.dim != b.dim:
        raise DataError(f"the two statistics have {a.dim}- and {b.dim}-dimensional features; compute both with "
                        f"the same Inception")
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * _trace_sqrt_product(a, b, device))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = KID_SEED, device: torch.device | str = "cpu") -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean and std over random
    subsets of `subset_size` rows of each set, drawn as torch-fidelity draws them (same seed, same subsets)."""
    n1, n2 = len(f1), len(f2)
    m = subset_size
    if m < 2 or m > min(n1, n2):
        raise DataError(f"KID subset size {m} must be between 2 and the smaller set ({min(n1, n2)} rows)")
    rng = np.random.RandomState(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(f1, dtype=np.float32)).to(device)
    y_all = torch.from_numpy(np.ascontiguousarray(f2, dtype=np.float32)).to(device)
    d = x_all.shape[1]
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(n1, m, replace=False)).to(device)]
        y = y_all[torch.from_numpy(rng.choice(n2, m, replace=False)).to(device)]
        k_xx = (x @ x.T / d + 1).double() ** 3
        k_yy = (y @ y.T / d + 1).double() ** 3
        k_xy = (x @ y.T / d + 1).double() ** 3
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        mmds[i] = float(within - 2 * k_xy.sum() / (m * m))
    return float(mmds.mean()), float(mmds.std())


@dataclass
class EvalResult:
    fid: float
    kid_mean: float | None
    kid_std: float | None
    n: int | None
    ref_n: int | None
    kid_subsets: int | None
    kid_subset_size: int | None

    def as_dict(self) -> dict:
        return {"fid": self.fid, "kid_mean": self.kid_mean, "kid_std": self.kid_std, "n": self.n,
                "ref_n": self.ref_n, "kid_subsets": self.kid_subsets, "kid_subset_size": self.kid_subset_size}


def score(samples: FeatureStats, ref: FeatureStats, *, kid: bool = True, kid_subsets: int = 100,
          kid_subset_size: int = 1000, kid_seed: int = KID_SEED, device: torch.device | str = "cpu",
          callbacks: EvalCallbacks | None = None) -> EvalResult:
    """FID of two statistics, and KID when both hold feature rows (the subset size shrinks to fit small sets)."""
    fid = frechet_distance(samples, ref, device)
    kid_mean = kid_std = size = subsets = None
    if kid:
        if samples.features is None or ref.features is None:
            _cb(callbacks, "on_message", "KID skipped: the reference statistics hold no feature rows (FID only)")
        else:
            size = min(kid_subset_size, len(samples.features), len(ref.features))
            if size < kid_subset_size:
                _cb(callbacks, "on_message", f"KID subset size lowered from {kid_subset_size} to {size} to fit "
                                             f"the sets' {len(samples.features)} and {len(ref.features)} rows")
            if size >= 2:
                subsets = kid_subsets
                kid_mean, kid_std = kernel_inception_distance(samples.features, ref.features, subsets=subsets,
                                                              subset_size=size, seed=kid_seed, device=device)
            else:
                size = None
    return EvalResult(fid, kid_mean, kid_std, samples.n, ref.n, subsets, size)


# ----------------------------------------------------------------------------------------------------------
# Image sources: a folder or .zip, an .npz, a tensor, CIFAR-10, a config's dataset, a model's samples


@dataclass
class ImageSource:
    """A stream of uint8 image batches (B, C, H, W) of known length; `key` identifies it for the cache."""

    name: str
    count: int
    batches: Callable[[int], Iterator[torch.Tensor]]
    key: dict | None = None  # None: never cached
    warnings: list[str] = field(default_factory=list)
    prepare: Callable[[], None] | None = None  # fills count and batches when first needed (a cache hit skips it)


def _ready(src: ImageSource) -> ImageSource:
    if src.prepare is not None:
        prepare, src.prepare = src.prepare, None
        prepare()
    return src


def tensor_source(images: torch.Tensor | np.ndarray, name: str, key: dict | None = None) -> ImageSource:
    """A source over images already in memory: uint8 (N, C, H, W)."""
    images = torch.as_tensor(images)

    def batches(bs: int) -> Iterator[torch.Tensor]:
        for i in range(0, images.shape[0], bs):
            yield images[i:i + bs]

    return ImageSource(name, int(images.shape[0]), batches, key)


def _signature(path: Path) -> list:
    """What changes when a file or folder changes: its path, sizes and modification times."""
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    h = hashlib.sha256()
    count = 0
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return [str(path), count, h.hexdigest()]


def _decode_rgb(blob: bytes, size: tuple[int, int] | None) -> tuple[np.ndarray | None, bool]:
    """An image file -> (uint8 (3, H, W), whether it was resized): center-cropped and resized to `size` (W, H) when
    its own size differs. (None, False) for a file that is not a readable image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB")
            resized = size is not None and im.size != size
            if resized:
                im = ImageOps.fit(im, size, method=Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), resized
    except Exception:  # PIL raises many types for corrupt files; such a file is skipped with a warning
        return None, False


def files_source(path: str | Path) -> ImageSource:
    """Every image in a folder (recursively, any ImageFolder-like tree) or a .zip, in sorted path order.

    Images are used at their own size; ones whose size differs from the first image's are center-cropped and
    resized to it (a warning says how many)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root} not found; pass a folder or .zip of images")
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise DataError(f"{root} is neither a folder nor a .zip of images")
        try:
            with zipfile.ZipFile(root) as zf:
                names = sorted(n for n in zf.namelist() if not n.endswith("/")
                               and not PurePosixPath(n).name.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {root} ({_short(e)})") from None
        entries: list = names
    else:
        entries = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                         and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not entries:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    src = ImageSource(str(root), len(entries), lambda bs: iter(()), {"kind": "files", "path": _signature(root)})
    is_zip = root.is_file()

    def batches(bs: int) -> Iterator[torch.Tensor]:
        size: tuple[int, int] | None = None  # (W, H) of the first readable image; the others are fitted to it
        bad = resized = 0
        zf = zipfile.ZipFile(root) if is_zip else None
        try:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for i in range(0, len(entries), bs):
                    chunk = entries[i:i + bs]
                    blobs = [zf.read(n) for n in chunk] if zf is not None else [p.read_bytes() for p in chunk]
                    if size is None:
                        for blob in blobs:
                            first, _ = _decode_rgb(blob, None)
                            if first is not None:
                                size = (first.shape[2], first.shape[1])
                                break
                    decoded = list(pool.map(_decode_rgb, blobs, [size] * len(blobs)))
                    good = [a for a, _ in decoded if a is not None]
                    bad += len(decoded) - len(good)
                    resized += sum(r for _, r in decoded)
                    if good:
                        yield torch.from_numpy(np.stack(good))  # (B, 3, H, W)
        finally:
            if zf is not None:
                zf.close()
            if bad:
                src.warnings.append(f"skipped {bad} file(s) in {root} that are not readable images")
            if resized:
                src.warnings.append(f"{resized} image(s) in {root} differ in size from the first one and were "
                                    f"center-cropped and resized to {size[0]}x{size[1]}")

    src.batches = batches
    return src


def _npz_images(z, path: Path) -> np.ndarray:
    keys = [k for k in NPZ_IMAGE_KEYS if k in z.files] or [k for k in z.files if z[k].ndim == 4]
    if not keys:
        raise DataError(f"{path} holds no images (looked for a 4-d uint8 array named {', '.join(NPZ_IMAGE_KEYS)})")
    try:
        arr = z[keys[0]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read array {keys[0]!r} of {path} ({_short(e)})") from None
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[:, None]
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise DataError(f"{path}: {keys[0]!r} is {arr.dtype} {arr.shape}; expected uint8 images (N, H, W, C) or "
                        f"(N, C, H, W) with values 0-255")
    if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif arr.shape[1] not in (1, 3, 4):
        raise DataError(f"{path}: cannot tell the channel axis of {keys[0]!r} {arr.shape}; expected (N, H, W, C) or "
                        f"(N, C, H, W) with 1, 3 or 4 channels")
    return np.ascontiguousarray(arr)


def npz_source(path: str | Path) -> ImageSource:
    """Images in an .npz (`ddpm sample --format npz` writes `arr_0` as (N, H, W, C) uint8)."""
    path = Path(path)
    with _open_npz(path) as z:
        arr = _npz_images(z, path)
    return tensor_source(torch.from_numpy(arr), str(path), {"kind": "npz", "path": _signature(path)})


def cifar10_source(split: str, data_root: str | Path) -> ImageSource:
    """torchvision's CIFAR-10 (its python archive under `data_root`; downloaded there when missing and online)."""
    from torchvision.datasets import CIFAR10

    root = Path(data_root).expanduser()
    train = split == "train"
    how_to = (f"put CIFAR-10's python archive (cifar-10-batches-py) under {root} with --data-root, or pass --ref a "
              f"folder or .zip of its images (e.g. cifar10-jpeg/{split}.zip)")
    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError:
        existed = root.exists()
        try:
            with redirect_stdout(sys.stderr):  # torchvision prints its download to stdout, which holds our JSON
                ds = CIFAR10(str(root), train=train, download=True)
        except (OSError, RuntimeError) as e:  # URLError and friends: offline, DNS, permissions
            if not existed:
                try:
                    root.rmdir()  # the failed download made it; leave no empty folder behind
                except OSError:
                    pass
            raise DataError(f"CIFAR-10 is not under {root} and could not be downloaded ({_short(e)}); "
                            + how_to) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    key = {"kind": "cifar10", "split": split, "path": _signature(root / CIFAR10.base_folder)}
    return tensor_source(images, f"cifar10-{split}", key)


def config_source(path: str | Path) -> ImageSource:
    """The dataset a run config's data section names, as `ddpm train` loads it (resized to model.image_size)."""
    from ddpm_cli.config import load_config
    from ddpm_cli.engine.data import load_dataset

    cfg = load_config(path)
    model = cfg.model.model_copy(update={"conditional": False})  # labels play no part in FID
    root = Path(cfg.data.root).expanduser()
    data = cfg.data.model_dump(mode="json")
    for k in ("random_flip", "on_device", "download"):
        data.pop(k, None)
    key = {"kind": "config", "data": data, "image_size": model.image_size, "channels": model.in_channels}
    if cfg.data.dataset == "folder":
        if not root.exists():
            raise DataError(f"{path}: data.root {root} does not exist; point it at a folder or .zip of images")
        key["path"] = _signature(root)
    elif cfg.data.dataset == "cifar10":
        key["path"] = _signature(root / "cifar-10-batches-py") if (root / "cifar-10-batches-py").exists() else None
    src = ImageSource(f"{path} ({cfg.data.dataset} data)", 0, lambda bs: iter(()), key)

    def prepare() -> None:  # decoding a large folder takes a while: only on a cache miss
        with redirect_stdout(sys.stderr):  # a torchvision download prints to stdout, which holds our JSON
            ds = load_dataset(cfg.data, model)
        loaded = tensor_source(ds.images, src.name)
        src.count, src.batches = loaded.count, loaded.batches
        src.warnings.extend(ds.warnings)

    src.prepare = prepare
    return src


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Classes in turn (0, 1, ..., K-1, 0, ...): every class gets n // K or n // K + 1 images."""
    return torch.arange(n) % num_classes


def model_batches(model: Callable, diffusion, n: int, batch_size: int, *, image_shape: tuple[int, int, int],
                  num_classes: int | None = None, sampler: str | None = None, steps: int | None = None,
                  guidance: float = 1.0, guide: Callable | None = None, variance: str = "beta", seed: int = 0,
                  device: torch.device | str = "cpu", bf16: bool = False, batches: range | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first index, uint8 images) of `n` fresh samples, batch by batch (engine.generate; `batches` picks a rank's
    share). A conditional model (num_classes set) gets its labels evenly over the classes; `None` options mean
    generate's defaults; `guide` a weaker network for autoguidance."""
    from ddpm_cli.engine.generate import generate

    _check_sampling(n, num_classes, guidance, guide)
    labels = balanced_labels(n, num_classes) if num_classes else None
    opts: dict[str, Any] = {"variance": variance}
    if sampler is not None:
        opts["sampler"] = sampler
    if steps is not None:
        opts["steps"] = steps
    for start, images, _ in generate(model, diffusion, n, image_shape=image_shape, labels=labels,
                                     batch_size=batch_size, guidance=guidance, null_class=num_classes, guide=guide,
                                     seed=seed,
                                     device=device, bf16=bf16, batches=batches, on_step=on_step, **opts):
        yield start, images


def _check_sampling(n: int, num_classes: int | None, guidance: float, guide: Callable | None = None) -> None:
    if n < 1:
        raise DdpmError(f"-n must be at least 1 (got {n})")
    if guidance != 1.0 and not num_classes and guide is None:
        raise DdpmError("--guidance needs a class-conditional model, and this one is unconditional; drop --guidance")


def model_source(model: torch.nn.Module, diffusion, n: int, *, name: str = "samples",
                 sample_batch: int | None = None, **kwargs) -> ImageSource:
    """`n` fresh samples of a model as an ImageSource, made batch by batch as they are consumed (the keyword
    arguments are model_batches'). `sample_batch`: images per network batch, cut into the consumer's batches
    (a GPU samples twice as fast at 1,000 as at 256, and Inception needs no such batch); default the consumer's."""
    _check_sampling(n, kwargs.get("num_classes"), kwargs.get("guidance", 1.0), kwargs.get("guide"))

    def batches(bs: int) -> Iterator[torch.Tensor]:
        held = torch.empty(0, dtype=torch.uint8)  # images of a network batch not yet handed out
        for _, images in model_batches(model, diffusion, n, sample_batch or bs, **kwargs):
            held = torch.cat([held, images]) if len(held) else images
            while len(held) >= bs:  # full batches whatever the network's, as from images already in memory
                out, held = held[:bs], held[bs:]
                yield out
        if len(held):
            yield held

    return ImageSource(name, n, batches, None)


# ----------------------------------------------------------------------------------------------------------
# References and the cache


def default_cache_dir() -> Path:
    """$DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm/fid-stats, else ~/.cache/ddpm/fid-stats."""
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ddpm" / "fid-stats"


def is_checkpoint(path: str | Path) -> bool:
    """A .safetensors file or a run directory (what `ddpm sample` takes), as opposed to images or statistics."""
    p = Path(path)
    if p.is_dir():
        return (p / "checkpoints").is_dir() or (p / "latest.json").is_file()
    return p.suffix == ".safetensors"


def open_images_or_stats(spec: str | Path, *, data_root: str | Path = "data",
                         role: str = "--ref") -> ImageSource | FeatureStats:
    """What a --ref (or the samples argument) names: statistics, or a source of images (cheap: nothing decoded
    or run through Inception yet, except an .npz or a dataset, which are read into memory)."""
    text = str(spec)
    p = Path(text).expanduser()
    if text in CIFAR10_REFS and not p.exists():
        return cifar10_source(text.split("-", 1)[1], data_root)
    if not p.exists():
        raise DataError(f"{role} {text} not found; pass a folder or .zip of images, an .npz of images or statistics "
                        f"(--save-stats), {' or '.join(CIFAR10_REFS)}, or a run config YAML")
    if p.is_dir():
        return files_source(p)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return config_source(p)
    if suffix == ".npz":
        with _open_npz(p) as z:
            stats = _is_stats(z)
        return load_stats(p) if stats else npz_source(p)
    if zipfile.is_zipfile(p):
        return files_source(p)
    raise DataError(f"{role} {text}: not a folder, .zip, .npz or .yaml; pass images, statistics or a run config")


def _cache_file(cache_dir: Path, key: dict, name: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name).strip("_")[-48:] or "ref"
    return cache_dir / f"{slug}-{digest}.npz"


def reference_stats(ref: str | Path | ImageSource | FeatureStats, inception: Inception, *,
                    data_root: str | Path = "data", cache_dir: str | Path | None = None, use_cache: bool = True,
                    batch_size: int = 64, callbacks: EvalCallbacks | None = None) -> FeatureStats:
    """Statistics of a reference: loaded from a stats file, else read from the cache, else computed (and cached).

    The cache file is named by a hash of the source's identity (path, sizes, modification times; a config's data
    section), the Inception's identity (weights, resize, layer, torch-fidelity version) and the stats format."""
    src = ref if isinstance(ref, (ImageSource, FeatureStats)) else open_images_or_stats(ref, data_root=data_root)
    if isinstance(src, FeatureStats):
        check_compatible(src, inception, callbacks)
        return src
    for w in src.warnings:
        _cb(callbacks, "on_message", w)
    path = None
    if use_cache and src.key is not None:
        key = {"source": src.key, "inception": inception.identity, "format": STATS_VERSION,
               "kid_features_max": KID_FEATURES_MAX}
        path = _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key, src.name)
        if path.is_file():
            try:
                stats = load_stats(path)
            except DataError:
                stats = None  # a damaged cache entry is recomputed
            if stats is not None and stats.meta.get("cache_key") == key:
                _cb(callbacks, "on_message", f"reference statistics from the cache: {path}")
                return stats
    stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="reference")
    if path is not None:
        stats.meta["cache_key"] = key
        try:
            save_stats(stats, path)
        except DdpmError as e:
            _cb(callbacks, "on_message", f"reference statistics not cached: {e}")
    return stats


def check_compatible(stats: FeatureStats, inception: Inception, callbacks: EvalCallbacks | None = None) -> None:
    """Refuse statistics of other features; warn when they came from other Inception weights or another resize."""
    if stats.dim != FEATURE_DIM:
        raise DataError(f"the statistics have {stats.dim}-dimensional features, but Inception's pool features have "
                        f"{FEATURE_DIM}; recompute them with `ddpm eval --ref IMAGES --save-stats FILE`")
    theirs = stats.meta.get("inception")
    if not isinstance(theirs, dict):
        _cb(callbacks, "on_message", "the reference statistics do not say which Inception made them; FID is only "
                                     "comparable when it is the same one")
        return
    ours = inception.identity
    for what, k in (("Inception weights", "weights"), ("resize", "input_size")):
        if theirs.get(k) != ours.get(k):
            _cb(callbacks, "on_message", f"the reference statistics were made with other {what} ({theirs.get(k)}) "
                                         f"than this run ({ours.get(k)}); the scores are not comparable")


# ----------------------------------------------------------------------------------------------------------
# Entry points: the whole `ddpm eval`, and FID of a model in memory (for the training loop)


def fid_of_model(model: torch.nn.Module, diffusion, n: int, ref_stats: FeatureStats, inception: Inception, *,
                 image_shape: tuple[int, int, int], num_classes: int | None = None, sampler: str | None = None,
                 steps: int | None = None, guidance: float = 1.0, variance: str = "beta", batch_size: int = 256,
                 seed: int = 0, bf16: bool = False, kid: bool = False, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, callbacks: EvalCallbacks | None = None) -> EvalResult:
    """Sample `n` images from `model` (in eval mode; its mode is restored) and score them against `ref_stats`.

    For in-training FID: build `inception = load_inception(path, device)` and `ref_stats = reference_stats(ref,
    inception)` once, then call this every N steps with the EMA model. KID is off by default (it costs more)."""
    was_training = model.training
    model.eval()
    try:
        src = model_source(model, diffusion, n, image_shape=image_shape, num_classes=num_classes, sampler=sampler,
                           steps=steps, guidance=guidance, variance=variance, seed=seed, device=inception.device,
                           bf16=bf16)
        stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="samples")
    finally:
        model.train(was_training)
    return score(stats, ref_stats, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                 device=inception.device, callbacks=callbacks)


@dataclass
class EvalRequest:
    """Everything `ddpm eval` was asked for; defaults match the command's."""

    ref: str
    input: Path | None = None  # a checkpoint or run directory to sample, or images/statistics to score
    n: int | None = None  # checkpoint: samples to draw (default 10,000); images: the first n (default all)
    batch_size: int | None = None  # None: Inception 250 on CUDA (sampling: generate.default_batch), 50 on the CPU
    device: str = "auto"
    seed: int = 0
    sampler: str | None = None  # None: ddim, or dpm++2m for a checkpoint autoguided by its stored guide
    steps: int | None = None
    guidance: float | None = None  # None: the stored guide's weight if the checkpoint carries one, else 1 (off)
    guide: Path | str | None = None  # checkpoint: a weaker one for autoguidance; "none": not the stored guide
    ema_decay: float | None = None  # checkpoint: which EMA weights (None: train.ema_decay's)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception_weights: Path | None = None  # None: torch-fidelity downloads its own
    data_root: Path = Path("data")
    cache_dir: Path | None = None  # None: default_cache_dir()
    use_cache: bool = True
    save_stats: Path | None = None  # write the reference statistics here


DEFAULT_SAMPLES = 10_000


def _first(src: ImageSource, n: int) -> ImageSource:
    _ready(src)
    if n > src.count:
        raise DataError(f"-n {n} but {src.name} holds {src.count} images; lower -n or leave it out to use all")
    if n == src.count:
        return src
    inner = src.batches

    def batches(bs: int) -> Iterator[torch.Tensor]:
        left = n
        for b in inner(bs):
            if left <= 0:
                break
            yield b[:left]
            left -= b.shape[0]

    return ImageSource(src.name, n, batches, None, src.warnings)


def evaluate(req: EvalRequest, callbacks: EvalCallbacks | None = None) -> dict:
    """`ddpm eval`: reference statistics (cached), optionally saved; then, with an input, its statistics (sampling
    a checkpoint first) and the scores. Returns the JSON-ready result. Inputs are checked before any heavy work.

    Under torchrun the sampling of a checkpoint is spread over the ranks (the same images as one process); rank 0
    does the rest and gets the result, the other ranks get {}."""
    guidance, ref = check_request(req)
    dist_info = DistInfo.from_env()
    try:
        return _evaluate(req, ref, guidance, dist_info, callbacks)
    finally:
        dist_info.close()


def check_request(req: EvalRequest) -> tuple[Guidance | None, ImageSource | FeatureStats]:
    """The cheap checks of `ddpm eval`'s arguments, paths and reference (once, before any process or heavy work
    starts); returns how a checkpoint input will be guided (None: the input is not a checkpoint to sample), and
    the opened reference."""
    if req.n is not None and req.n < 1:
        raise DdpmError(f"-n must be at least 1 (got {req.n})")
    if req.input is None and req.save_stats is None:
        raise DdpmError("nothing to do: pass samples or a checkpoint to score, or --save-stats FILE to precompute "
                        "the reference statistics")
    if req.kid_subsets < 1 or req.kid_subset_size < 2:
        raise DdpmError("--kid-subsets must be at least 1 and --kid-subset-size at least 2")
    if req.inception_weights is not None:
        check_inception_path(req.inception_weights)
    guidance = None
    if req.input is not None and is_checkpoint(req.input):
        from ddpm_cli.diffusion.samplers import SAMPLERS
        from ddpm_cli.engine.checkpoint import read_checkpoint_config, require_ema_decay
        from ddpm_cli.engine.guidance import check_guidance

        if req.sampler is not None and req.sampler not in SAMPLERS:
            raise DdpmError(f"unknown sampler {req.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if req.steps is not None and req.steps < 1:
            raise DdpmError(f"--steps must be at least 1 (got {req.steps})")
        path, header, cfg = read_checkpoint_config(req.input)
        guidance = check_guidance(path, header, cfg, req.guidance, req.guide)
        if req.ema_decay is not None:
            require_ema_decay(header, cfg.train.ema_decay, req.ema_decay)
    elif req.input is not None:
        if (req.sampler is not None or req.steps is not None or req.guidance not in (None, 1.0)
                or req.ema_decay is not None or req.guide is not None):
            raise DdpmError(f"--sampler, --steps, --guidance, --guide-model and --ema-decay apply when a checkpoint "
                            f"is sampled, but {req.input} is not a checkpoint; drop them")
        if not Path(req.input).exists():
            raise DataError(f"{req.input} not found; pass a checkpoint (.safetensors or a run directory), or samples "
                            f"(.npz, a folder or .zip of images)")
    return guidance, open_images_or_stats(req.ref, data_root=req.data_root)


def _evaluate(req: EvalRequest, ref: ImageSource | FeatureStats, g: Guidance | None, dist_info: DistInfo,
              callbacks: EvalCallbacks | None) -> dict:
    from ddpm_cli.engine.build import resolve_device

    device = dist_info.device if dist_info.world > 1 else resolve_device(req.device)
    batch_size = req.batch_size or (250 if device.type == "cuda" else 50)
    t0 = time.perf_counter()

    model = None
    sample_info: dict = {}
    samples: ImageSource | FeatureStats | None = None
    if req.input is not None:
        if g is not None:  # a checkpoint to sample
            from ddpm_cli.diffusion.samplers import network_evaluations
            from ddpm_cli.engine.checkpoint import load_guide, load_model

            model, diffusion, cfg, ckpt = load_model(req.input, device, ema_decay=req.ema_decay)
            m = cfg.model
            guide_model = load_guide(g, ckpt, device) if g.guide is not None else None
            sampler = req.sampler or g.default_sampler
            steps = network_evaluations(diffusion, sampler, req.steps)  # what runs: distinct timesteps
            sample_info = {"checkpoint": str(ckpt.path), "step": ckpt.step, "sampler": sampler, "steps": steps,
                           "nfe_per_image": steps * (2 if g.weight != 1.0 else 1), "guidance": g.weight,
                           "seed": req.seed,
                           "ema_decay": req.ema_decay if req.ema_decay is not None else (
                               cfg.train.ema_decay if ckpt.ema_state is not None else None)}
            if g.guide is not None:
                sample_info["guide"] = str(g.guide)
                if g.stored_step is not None:
                    sample_info["guide_step"] = g.stored_step
        else:
            samples = open_images_or_stats(req.input, data_root=req.data_root, role="samples")
            if isinstance(samples, ImageSource) and req.n is not None:
                samples = _first(samples, req.n)
    if dist_info.world > 1 and model is None and dist_info.rank != 0:
        return {}  # nothing to spread: rank 0 scores the images alone

    spread: torch.Tensor | None = None
    if model is not None:  # sampled as `ddpm sample` samples (bf16, channels-last, compiled when it pays on CUDA)
        from ddpm_cli.engine.generate import default_batch, job_nfe, sampling_net

        n, shape = req.n or DEFAULT_SAMPLES, (m.in_channels, m.image_size, m.image_size)
        # unless --batch-size says otherwise, sampled in `ddpm sample`'s batches (on a GPU twice 250's rate)
        cuda = device.type == "cuda"
        sample_batch = req.batch_size or (default_batch(m.image_size, cuda=True) if cuda else batch_size)
        nfe = job_nfe(n, sampler, req.steps, cfg.diffusion.num_timesteps, guided=g.weight != 1.0)
        net = sampling_net(model, device, nfe)
        guide = sampling_net(guide_model, device, nfe) if guide_model is not None else None
        gen = dict(image_shape=shape, num_classes=m.num_classes if m.conditional else None, sampler=sampler,
                   steps=req.steps, guidance=g.weight, guide=guide, variance=cfg.diffusion.variance,
                   seed=req.seed, device=device, bf16=device.type == "cuda")
        sample_info["precision"] = "bf16" if gen["bf16"] else "fp32"
    if model is not None and dist_info.world > 1:  # sample first, each rank its batches; rank 0 then scores
        from ddpm_cli.engine.generate import even_batch

        per = even_batch(n, sample_batch)  # the batches generate makes: batch b is images b * per ...
        mine = range(dist_info.rank, -(-n // per), dist_info.world)
        _cb(callbacks, "on_phase", f"sampling ({dist_info.world} ranks)", n)
        kept = []
        for start, images in model_batches(net, diffusion, n, per, batches=mine, **gen):
            kept.append((start, images))
            _cb(callbacks, "on_advance", min(n, sum(t.shape[0] for _, t in kept) * dist_info.world))
        spread = dist_info.gather_batches(kept, n, per, shape)
        if dist_info.rank != 0:
            return {}

    inception = load_inception(req.inception_weights, device)  # rank 0 alone under torchrun
    ref_stats = reference_stats(ref, inception, cache_dir=req.cache_dir, use_cache=req.use_cache,
                                batch_size=batch_size, callbacks=callbacks)
    out: dict[str, Any] = {}
    if req.save_stats is not None:
        save_stats(ref_stats, req.save_stats)
        out["stats"] = str(req.save_stats)
    if req.input is None:
        out.update({"ref": req.ref, "ref_n": ref_stats.n, "seconds": round(time.perf_counter() - t0, 2)})
        return out

    if spread is not None:
        sample_stats = compute_stats(tensor_source(spread, f"samples of {ckpt.path}"), inception,
                                     batch_size=batch_size, callbacks=callbacks, phase="samples")
    elif model is not None:
        src = model_source(net, diffusion, n, name=f"samples of {ckpt.path}", sample_batch=sample_batch, **gen)
        sample_stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="samples")
    elif isinstance(samples, FeatureStats):
        check_compatible(samples, inception, callbacks)
        sample_stats = samples
    else:
        for w in samples.warnings:
            _cb(callbacks, "on_message", w)
        sample_stats = compute_stats(samples, inception, batch_size=batch_size, callbacks=callbacks,
                                     phase="samples")
    result = score(sample_stats, ref_stats, kid_subsets=req.kid_subsets, kid_subset_size=req.kid_subset_size,
                   device=device, callbacks=callbacks)
    out = {**result.as_dict(), "ref": req.ref, "input": str(req.input), **sample_info, **out,
           "inception": inception.weights_id, "seconds": round(time.perf_counter() - t0, 2)}
    return out
