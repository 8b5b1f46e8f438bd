"""Reference statistics: loaded from a statistics file, else read from the cache, else computed and cached; and
the check that two statistics come from the same Inception."""
from __future__ import annotations

import json
from pathlib import Path

from ddpm_cli.engine.evaluation import stats_cache
from ddpm_cli.engine.evaluation.inception import FEATURE_DIM, Inception
from ddpm_cli.engine.evaluation.sources import ImageSource, open_images_or_stats
from ddpm_cli.engine.evaluation.stats import (KID_FEATURES_MAX, STATS_VERSION, EvalCallbacks, FeatureStats,
                                               compute_stats, load_stats, notify, save_stats)
from ddpm_cli.errors import DataError, DdpmError


def reference_stats(ref: str | Path | ImageSource | FeatureStats, inception: Inception, *,
                    data_root: str | Path = "data", cache_dir: str | Path | None = None, use_cache: bool = True,
                    batch_size: int = 64, callbacks: EvalCallbacks | None = None) -> FeatureStats:
    """Statistics of a reference: loaded from a stats file, else read from the cache, else computed (and cached).

    The cache file (stats_cache.py) is named by a hash of the source's identity (path, sizes, modification times;
    a config's data section), the Inception's identity (weights, resize, layer, torch-fidelity version) and the
    stats format; the cache keeps the most recently used entries."""
    src = ref if isinstance(ref, (ImageSource, FeatureStats)) else open_images_or_stats(ref, data_root=data_root)
    if isinstance(src, FeatureStats):
        check_compatible(src, inception, callbacks)
        return src
    for w in src.warnings:
        notify(callbacks, "on_message", w)
    path = None
    if use_cache and src.key is not None:
        # as the entry stores it (JSON: a tuple in the source's key, a non-square size, reads back as a list)
        key = json.loads(json.dumps({"source": src.key, "inception": inception.identity, "format": STATS_VERSION,
                                     "kid_features_max": KID_FEATURES_MAX}))
        path = stats_cache.entry_path(Path(cache_dir) if cache_dir is not None else stats_cache.cache_dir(), key)
        if path.is_file():
            try:
                stats = load_stats(path)
            except DataError as e:
                stats = None
                notify(callbacks, "on_message", f"the cached reference statistics are damaged ({e}); computing them "
                                                f"again")
            if stats is not None and stats.meta.get("cache_key") == key:
                stats_cache.touch(path)
                notify(callbacks, "on_message", f"reference statistics from the cache: {path}")
                return stats
    stats = compute_stats(src, inception, batch_size=batch_size, callbacks=callbacks, phase="reference")
    if path is not None:
        stats.meta["cache_key"] = key
        try:
            save_stats(stats, path)
            stats_cache.describe(path, key, src.name, stats.n)
            stats_cache.prune(path.parent)
        except (DdpmError, OSError) as e:
            notify(callbacks, "on_message", f"reference statistics not cached: {e}")
    return stats


def check_compatible(stats: FeatureStats, inception: Inception, callbacks: EvalCallbacks | None = None) -> None:
    """Refuse statistics of other features; warn when they came from other Inception weights or another resize."""
    if stats.dim != FEATURE_DIM:
        raise DataError(f"the statistics have {stats.dim}-dimensional features, but Inception's pool features have "
                        f"{FEATURE_DIM}; recompute them with `ddpm eval --ref IMAGES --save-stats FILE`")
    theirs = stats.meta.get("inception")
    if not isinstance(theirs, dict):
        notify(callbacks, "on_message", "the reference statistics do not say which Inception made them; FID is only "
                                     "comparable when it is the same one")
        return
    ours = inception.identity
    for what, k in (("Inception weights", "weights"), ("resize", "input_size")):
        if theirs.get(k) != ours.get(k):
            notify(callbacks, "on_message", f"the reference statistics were made with other {what} ({theirs.get(k)}) "
                                         f"than this run ({ours.get(k)}); the scores are not comparable")
