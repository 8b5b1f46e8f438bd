"""FID and KID of two FeatureStats: FID is the Frechet distance of two Gaussians, KID the unbiased MMD^2 with a
cubic polynomial kernel over random subsets, drawn as torch-fidelity draws them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddpm_cli.engine.evaluation.stats import EvalCallbacks, FeatureStats, notify
from ddpm_cli.errors import DataError

KID_SEED = 2020  # torch-fidelity's default rng_seed, so KID subsets are drawn as its calculate_metrics draws them


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
    """FID of two statistics, and KID when both hold feature rows (the subset size shrinks to fit small sets).

    A subset as large as both sets is the same every time: KID is then computed once over the whole sets and
    kid_std is None (a spread of zero would look like certainty); as large as one set, its spread comes from the
    other set alone, and a note says it understates the uncertainty."""
    fid = frechet_distance(samples, ref, device)
    kid_mean = kid_std = size = subsets = None
    if kid:
        if samples.features is None or ref.features is None:
            which = "reference's" if ref.features is None else "samples'"
            notify(callbacks, "on_message", f"KID skipped: the {which} statistics hold no feature rows (FID only)")
        else:
            n1, n2 = len(samples.features), len(ref.features)
            size = min(kid_subset_size, n1, n2)
            if size < kid_subset_size:
                notify(callbacks, "on_message", f"KID subset size lowered from {kid_subset_size} to {size} to fit "
                                                f"the sets' {n1} and {n2} rows")
            if size >= 2:
                subsets = 1 if size == n1 == n2 else kid_subsets
                kid_mean, kid_std = kernel_inception_distance(samples.features, ref.features, subsets=subsets,
                                                              subset_size=size, seed=kid_seed, device=device)
                if subsets == 1:
                    kid_std = None
                    notify(callbacks, "on_message", f"KID over the whole sets ({size} rows each): one value, no "
                                                    f"spread (kid_std null); use more images than "
                                                    f"--kid-subset-size for subsets and a kid_std")
                elif size == min(n1, n2):
                    notify(callbacks, "on_message", f"KID subsets hold the whole smaller set ({size} rows), so "
                                                    f"kid_std shows only the other set's spread and understates "
                                                    f"the uncertainty; use more images than --kid-subset-size")
            else:
                size = None
    return EvalResult(fid, kid_mean, kid_std, samples.n, ref.n, subsets, size)
