"""`ddpm eval`: FID/KID through torch-fidelity's InceptionV3, on the CPU with no network.

The network gets RANDOM weights (any fixed weights test the pipeline; the real ones are a download). To keep the
file fast on 2 cores, most tests shrink torch-fidelity's resize target from 299 to 75 px (Inception's smallest
valid input; the same code path, about 15x cheaper); one test uses the real weights and 299 px when
../shared has them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED
from ddpm_cli.cli.app import app
from ddpm_cli.engine.evaluation import inception as ev_inception
from ddpm_cli.engine.evaluation import reference as ev_reference
from ddpm_cli.engine.evaluation import run as ev_run
from ddpm_cli.engine.evaluation import scores as ev_scores
from ddpm_cli.engine.evaluation import sources as ev_sources
from ddpm_cli.engine.evaluation import stats as ev_stats
from ddpm_cli.engine.data import make_shapes

fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

runner = CliRunner()
SMALL = 75  # resize target for the fast tests
N_REF = 64
NOISE = (8, 16, 32, 64)  # std of the added Gaussian noise, in 0-255 pixel units


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 with random (He-normal) conv weights, saved as its .pth."""
    with pytest.MonkeyPatch.context() as mp:  # build the module without its download and weight loading
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):  # PyTorch's default init makes 90 layers' features vanish (~1e-8)
            with torch.no_grad():
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def small_resize():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", SMALL)
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="module")
def inception(weights, small_resize) -> ev_inception.Inception:
    return ev_inception.load_inception(weights, "cpu")


def noisy(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return make_shapes(N_REF, 32, seed=0).images  # (N, 3, 32, 32) uint8


@pytest.fixture(scope="module")
def clean_stats(clean, inception) -> ev_stats.FeatureStats:
    return ev_stats.compute_stats(ev_sources.tensor_source(clean, "clean"), inception, batch_size=32)


@pytest.fixture(scope="module")
def noisy_stats(clean, inception) -> dict[int, ev_stats.FeatureStats]:
    """The reference images with Gaussian noise of each strength in NOISE."""
    return {s: ev_stats.compute_stats(ev_sources.tensor_source(noisy(clean, s), f"noise {s}"), inception, batch_size=32)
            for s in NOISE}


def write_folder(images: torch.Tensor, root: Path, classes: int = 2) -> Path:
    """PNG files in an ImageFolder tree: root/class_k/00000i.png."""
    from PIL import Image

    for i, img in enumerate(images.numpy()):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:06d}.png")
    return root


def zip_folder(root: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, f"{root.name}/{p.relative_to(root).as_posix()}")
    return dest


# ----------------------------------------------------------------------------------------------------------
# The math, against torch-fidelity's own functions (no Inception needed)


def _stats_of(x: np.ndarray, keep_rows: bool = True) -> ev_stats.FeatureStats:
    return ev_stats.FeatureStats(x.mean(0), np.cov(x, rowvar=False), len(x), x.astype(np.float32) if keep_rows else None)


# the low-rank route (n <= d, rows kept); Cholesky of the full-rank one; both singular (eigh)
@pytest.mark.parametrize("n1,n2", [(40, 300), (300, 200), (40, 50)])
def test_frechet_distance_equals_torch_fidelity(n1, n2):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    d = 64
    a = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5
    b = rng.standard_normal((n2, d)) * 1.2 + 0.1
    a, b = (x.astype(np.float32).astype(np.float64) for x in (a, b))  # features are float32
    sa, sb = _stats_of(a), _stats_of(b)
    theirs = fid_statistics_to_metric({"mu": sa.mu, "sigma": sa.sigma}, {"mu": sb.mu, "sigma": sb.sigma},
                                      False)["frechet_inception_distance"]
    ours_fast = ev_scores.frechet_distance(sa, sb)
    ours_full = ev_scores.frechet_distance(_stats_of(a, False), _stats_of(b, False))
    assert ours_fast == pytest.approx(theirs, rel=1e-6)
    assert ours_full == pytest.approx(theirs, rel=1e-6)
    for s in (sa, sb):  # a set against itself: 0 up to float64 rounding
        assert abs(ev_scores.frechet_distance(s, s)) < 1e-8 * np.trace(s.sigma)


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    f1 = rng.random((120, 32)).astype(np.float32)
    f2 = (rng.random((90, 32)) * 1.1).astype(np.float32)
    theirs = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7, kid_subset_size=50,
                                    verbose=False, rng_seed=ev_scores.KID_SEED)
    mean, std = ev_scores.kernel_inception_distance(f1, f2, subsets=7, subset_size=50)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4, abs=1e-7)


def test_streaming_statistics_equal_numpy(inception):
    rng = np.random.default_rng(2)
    x = (rng.random((37, 16)) * 3 + 100).astype(np.float32)  # a large mean: the shifted sums keep precision
    m = ev_stats._Moments()
    for i in range(0, 37, 10):
        m.add(torch.from_numpy(x[i:i + 10]))
    mu, sigma = m.result()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


def test_an_npz_of_gray_and_alpha_images_is_read():
    """`ddpm sample --format npz` of a model.in_channels=2 run writes (N, H, W, 2): it was refused as unreadable."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "la.npz"
        np.savez(path, arr_0=np.zeros((3, 8, 8, 2), np.uint8))
        src = ev_sources.npz_source(path)
        assert src.count == 3 and next(iter(src.batches(3))).shape == (3, 2, 8, 8)


def test_inception_sees_rgb_for_every_channel_count():
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    gray = rgb[:, :1]
    alpha = torch.full_like(gray, 7)
    assert torch.equal(ev_inception.as_rgb_uint8(rgb), rgb)
    assert torch.equal(ev_inception.as_rgb_uint8(torch.cat([rgb, alpha], 1)), rgb)
    for images in (gray, torch.cat([gray, alpha], 1)):
        assert torch.equal(ev_inception.as_rgb_uint8(images), gray.expand(-1, 3, -1, -1))
    with pytest.raises(Exception, match="5 channels"):
        ev_inception.as_rgb_uint8(torch.zeros(1, 5, 4, 4, dtype=torch.uint8))


def test_balanced_labels_cover_the_classes_evenly():
    from ddpm_cli.engine.draw import balanced_labels

    counts = torch.bincount(balanced_labels(25, 10), minlength=10)
    assert counts.tolist() == [3] * 5 + [2] * 5


# ----------------------------------------------------------------------------------------------------------
# Through Inception (random weights, small resize)


def test_a_model_source_samples_in_its_own_batches_and_hands_out_the_consumers():
    """ddpm eval samples 1,000 a batch on a GPU (twice 250's rate) while Inception takes 250: the network sees
    the sampling batches, the consumer gets its own size, and the images are the same either way."""
    from ddpm_cli.diffusion.gaussian import GaussianDiffusion
    from ddpm_cli.diffusion.schedules import make_betas

    seen: list[int] = []

    def net(x, t, y):
        seen.append(x.shape[0])
        return 0.1 * x

    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine.draw import Drawer

    drawer = Drawer(net, GaussianDiffusion(make_betas("linear", 1000)), SamplerSpec(steps=2), (3, 4, 4))
    src = ev_sources.samples_source(drawer, 10, seed=3, sample_batch=5)
    got = list(src.batches(3))
    assert set(seen) == {5} and [b.shape[0] for b in got] == [3, 3, 3, 1]  # two network batches, handed out in 3s
    same = torch.cat(list(ev_sources.samples_source(drawer, 10, seed=3).batches(3)))
    assert torch.equal(torch.cat(got), same) and set(seen[4:]) == {3, 1}  # default: the consumer's size


def test_a_set_against_itself_scores_zero(clean_stats, noisy_stats):
    assert clean_stats.n == N_REF and clean_stats.features.shape == (N_REF, 2048)
    assert np.isfinite(clean_stats.features).all() and clean_stats.features.std() > 1e-3  # not vanished
    assert abs(ev_scores.frechet_distance(clean_stats, clean_stats)) < 1e-8 * np.trace(clean_stats.sigma)
    # KID's subsets are drawn independently from each side, so a set against itself is only about 0
    assert abs(ev_scores.score(clean_stats, clean_stats, kid_subset_size=32).kid_mean) < 0.1 * \
        ev_scores.score(noisy_stats[NOISE[-1]], clean_stats, kid_subset_size=32).kid_mean


def test_fid_grows_with_noise(clean_stats, noisy_stats):
    fids = [ev_scores.frechet_distance(clean_stats, clean_stats)] + \
        [ev_scores.frechet_distance(noisy_stats[s], clean_stats) for s in NOISE]
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    kids = [ev_scores.score(noisy_stats[s], clean_stats, kid_subsets=20, kid_subset_size=32).kid_mean for s in NOISE]
    assert kids[-1] > kids[-2] > kids[0], kids  # KID is noisier: only the larger steps are asserted


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_fid_and_kid_equal_torch_fidelity_calculate_metrics(clean, noisy_stats, clean_stats, weights):
    from torch_fidelity import calculate_metrics

    s = NOISE[-1]  # KID well above 0, so the relative tolerance means something
    theirs = calculate_metrics(input1=_Images(noisy(clean, s)), input2=_Images(clean), fid=True, kid=True,
                               feature_extractor_weights_path=str(weights), cuda=False, batch_size=32,
                               kid_subsets=10, kid_subset_size=40, cache=False, verbose=False, save_cpu_ram=True)
    ours = ev_scores.score(noisy_stats[s], clean_stats, kid_subsets=10, kid_subset_size=40)
    assert ours.fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours.kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours.kid_std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-2)


def test_large_sets_keep_a_fixed_random_subset_of_rows_for_kid(clean, clean_stats, inception, tmp_path):
    part = ev_stats.compute_stats(ev_sources.tensor_source(clean[:12], "12"), inception, batch_size=5, kid_features_max=5)
    keep = ev_stats._kid_rows(12, 5)
    assert part.n == 12 and part.features.shape == (5, 2048) and not part.complete
    np.testing.assert_allclose(part.features, clean_stats.features[:12][keep], rtol=1e-5, atol=1e-6)
    back = ev_stats.load_stats(ev_stats.save_stats(part, tmp_path / "sub" / "part.npz"))  # makes the folder
    assert back.n == 12 and np.array_equal(back.features, part.features) and np.array_equal(back.sigma, part.sigma)
    assert back.meta["inception"] == inception.identity


def test_folder_and_zip_sources_read_the_same_images(clean, tmp_path):
    folder = write_folder(clean[:10], tmp_path / "imgs", classes=3)
    (folder / "notes.txt").write_text("not an image")
    zipped = zip_folder(folder, tmp_path / "imgs.zip")
    a = torch.cat(list(ev_sources.files_source(folder).batches(4)))
    b = torch.cat(list(ev_sources.files_source(zipped).batches(3)))
    order = sorted(range(10), key=lambda i: (f"class_{i % 3}", i))  # sorted path order
    assert torch.equal(a, clean[order]) and torch.equal(b, clean[order])


def two_class_folder(root: Path, per_class: int = 6) -> Path:
    """root/class_a: dark images (pixels 0-63), root/class_b: bright ones (192-255), `per_class` PNGs each."""
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    for cls, low in (("class_a", 0), ("class_b", 192)):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(low, low + 64, (16, 16, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / cls / f"{i:03d}.png")
    return root


def _classes_of(images: torch.Tensor) -> list[str]:
    return sorted("a" if img.float().mean() < 128 else "b" for img in images)


def test_n_of_a_per_class_folder_or_zip_takes_each_class_its_share(tmp_path):
    """-n N of a folder scored its first N files in path order: of a per-class folder the first classes only, a
    biased FID. The N files are spread evenly over the sorted paths, so each class keeps its share."""
    folder = two_class_folder(tmp_path / "imgs")
    for path in (folder, zip_folder(folder, tmp_path / "imgs.zip")):
        src = ev_sources.open_images_or_stats(path, role="samples", n=6)
        assert src.count == 6
        assert _classes_of(torch.cat(list(src.batches(4)))) == ["a"] * 3 + ["b"] * 3, path
        whole = ev_sources.open_images_or_stats(path, role="samples", n=12)  # N = all of them: every file
        assert whole.count == 12 and _classes_of(torch.cat(list(whole.batches(5)))) == ["a"] * 6 + ["b"] * 6
    assert ev_sources.evenly_spread(12, 6) == [0, 2, 4, 6, 8, 10]
    assert ev_sources.evenly_spread(10, 4) == [0, 2, 5, 7]
    assert ev_sources.evenly_spread(3, 5) == [0, 1, 2]  # N >= total: all of them


def test_n_of_an_npz_or_a_datasets_images_takes_each_class_its_share(tmp_path):
    """-n of an .npz and --ref-limit of a run config's dataset took the first N images: of `ddpm sample
    --per-class`'s .npz, or of a per-class folder loaded in path order, the first classes alone (a biased FID).
    They are spread evenly too, as a folder's files are."""
    from conftest import tiny_overrides, write_yaml

    folder = two_class_folder(tmp_path / "imgs")
    from PIL import Image

    images = torch.cat([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)[None]
                        for f in sorted(folder.rglob("*.png"))])  # class a's six, then class b's
    npz = tmp_path / "per_class.npz"
    np.savez(npz, images.permute(0, 2, 3, 1).numpy())
    src = ev_sources.open_images_or_stats(npz, role="samples", n=6)
    assert src.count == 6 and _classes_of(torch.cat(list(src.batches(4)))) == ["a"] * 3 + ["b"] * 3
    cfg = tiny_overrides(tmp_path / "runs")
    cfg["data"] = {"dataset": "folder", "root": str(folder), "random_flip": False}
    yaml = write_yaml(tmp_path / "run.yaml", cfg)
    ref = ev_sources.open_images_or_stats(yaml, n=4, option="--ref-limit").ready()
    assert ref.count == 4 and _classes_of(torch.cat(list(ref.batches(3)))) == ["a"] * 2 + ["b"] * 2
    assert "spread" in ref.key and "first" not in ref.key  # (cached statistics of the first N are not reused)


def test_ddpm_cache_lists_clears_and_bounds_the_reference_statistics(tmp_path, monkeypatch):
    """eval's reference statistics (~120 MB an entry) are kept in a cache of their own: `ddpm cache info` lists
    it, `ddpm cache clear` empties it, it keeps the most recently used entries, and a folder of the user's named
    by DDPM_CACHE_DIR loses none of the user's files."""
    import os
    import time

    from ddpm_cli.engine.evaluation import stats_cache

    folder = tmp_path / "stats"
    monkeypatch.setenv("DDPM_CACHE_DIR", str(folder))
    folder.mkdir()
    for name in ("mine.npz", "notes-0123.npz", "settings.json"):
        (folder / name).write_text("the user's")
    for i in range(3):
        path = stats_cache.entry_path(folder, {"i": i})
        ev_stats.save_stats(ev_stats.FeatureStats(np.zeros(4), np.eye(4), 10 + i, None), path)
        stats_cache.describe(path, {"i": i}, f"ref{i}", 10 + i)
        os.utime(path.with_suffix(".json"), (time.time() - 100 + i, time.time() - 100 + i))
    assert stats_cache.prune(folder, max_entries=2) == 1  # the least recently used goes
    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)["fid_stats"]
    assert info["path"] == str(folder) and [e["source"] for e in info["entries"]] == ["ref2", "ref1"]
    assert [e["images"] for e in info["entries"]] == [12, 11]
    r = runner.invoke(app, ["cache", "info"])
    assert "reference statistics (ddpm eval): " + str(folder) in r.output and "2 entries" in r.output, r.output
    r = runner.invoke(app, ["cache", "clear"])
    assert r.exit_code == 0 and "removed 2 entries" in r.output and str(folder) in r.output, r.output
    assert sorted(p.name for p in folder.iterdir()) == ["mine.npz", "notes-0123.npz", "settings.json"]


def test_ddpm_cache_sees_and_clears_the_statistics_eval_kept_under_its_cache_dir(tmp_path, monkeypatch):
    """`ddpm eval --cache-dir D` keeps its reference statistics in D; `ddpm cache info|clear --cache-dir D` must
    list and empty that folder (they only knew DDPM_CACHE_DIR and the default), leaving the default alone."""
    from ddpm_cli.engine.evaluation import stats_cache

    default, mine = tmp_path / "default", tmp_path / "mine"
    monkeypatch.setenv("DDPM_CACHE_DIR", str(default))
    for folder, n in ((default, 1), (mine, 2)):
        folder.mkdir()
        for i in range(n):
            path = stats_cache.entry_path(folder, {"i": i})
            ev_stats.save_stats(ev_stats.FeatureStats(np.zeros(4), np.eye(4), 10, None), path)
            stats_cache.describe(path, {"i": i}, f"{folder.name}{i}", 10)
    r = runner.invoke(app, ["cache", "info", "--json", "--cache-dir", str(mine)])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)["fid_stats"]
    assert info["path"] == str(mine) and sorted(e["source"] for e in info["entries"]) == ["mine0", "mine1"]
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(mine)])
    assert r.exit_code == 0 and f"removed 2 entries (" in r.output and str(mine) in r.output, r.output
    assert stats_cache.list_entries(mine) == [] and len(stats_cache.list_entries(default)) == 1
    # a typo, or a file, is refused before any cache is cleared (clear empties all three)
    data = tmp_path / "data"
    monkeypatch.setenv("DDPM_DATA_CACHE_DIR", str(data))
    data.mkdir()
    for command in ("info", "clear"):
        for bad, needle in ((tmp_path / "nope", "no such folder"), (default / "x.json", "is a file, not a folder")):
            if needle.startswith("is a file"):
                bad.write_text("{}")
            r = runner.invoke(app, ["cache", command, "--cache-dir", str(bad)])
            assert r.exit_code == 2 and needle in r.output and "removed" not in r.output, r.output
    assert len(stats_cache.list_entries(default)) == 1
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "not-made-yet"))  # set, before eval ever wrote there
    r = runner.invoke(app, ["cache", "info"])
    assert r.exit_code == 0 and "not-made-yet  |  0 entries" in r.output, r.output


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes")
def test_a_folder_with_a_file_name_that_is_not_utf8_is_scored(clean, inception, tmp_path):
    """`ddpm train` reads such a folder, and `ddpm eval` failed on it with a UnicodeEncodeError traceback (its
    cache key encoded each name as UTF-8), after the reference's statistics had been computed."""
    import os

    folder = write_folder(clean[:4], tmp_path / "imgs", classes=1)
    first = sorted(folder.rglob("*.png"))[0]
    first.rename(first.with_name(os.fsdecode(b"b\xff.png")))
    stats = ev_reference.reference_stats(str(folder), inception, cache_dir=tmp_path / "cache")
    assert stats.n == 4
    assert ev_reference.reference_stats(str(folder), inception, cache_dir=tmp_path / "cache").n == 4  # cached


def test_a_run_directory_as_the_reference_is_its_training_data(trained_run):
    """`--ref RUN` was read as a folder of images: it scored the run's loss.png and training grids as the
    reference, silently. A run directory stands for its config's dataset, as `--ref RUN/config.yaml` does."""
    ref = ev_sources.open_images_or_stats(trained_run)
    assert ref.key["kind"] == "config" and "training data" in ref.name
    ref.ready()
    assert ref.count == 256 and ref.batches(64).__next__().shape[1:] == (3, 16, 16)  # the shapes it trained on


def test_reference_statistics_are_cached_and_invalidated(clean, inception, tmp_path):
    folder = write_folder(clean[:6], tmp_path / "ref", classes=1)
    cache = tmp_path / "cache"

    class Log(ev_stats.EvalCallbacks):
        def __init__(self):
            self.phases, self.messages = [], []

        def on_phase(self, name, total):
            self.phases.append((name, total))

        def on_message(self, text):
            self.messages.append(text)

    first, second, third = Log(), Log(), Log()
    s1 = ev_reference.reference_stats(str(folder), inception, cache_dir=cache, callbacks=first)
    assert first.phases == [("reference", 6)] and len(list(cache.glob("fid-*.bin"))) == 1
    s2 = ev_reference.reference_stats(str(folder), inception, cache_dir=cache, callbacks=second)
    assert second.phases == [] and any("cache" in m for m in second.messages)
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    write_folder(noisy(clean[:1], 30), folder / "extra")  # the folder changed: recomputed
    ev_reference.reference_stats(str(folder), inception, cache_dir=cache, callbacks=third)
    assert third.phases == [("reference", 7)] and len(list(cache.glob("fid-*.bin"))) == 2
    newest = max(cache.glob("fid-*.bin"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(newest.read_bytes()[:100])  # damaged: computed again, and said so (it was silent)
    fourth = Log()
    ev_reference.reference_stats(str(folder), inception, cache_dir=cache, callbacks=fourth)
    assert fourth.phases == [("reference", 7)] and any("damaged" in m for m in fourth.messages), fourth.messages


def test_reference_statistics_of_files_follow_the_decoder(clean, inception, tmp_path, monkeypatch):
    """A fix to how images decode (16-bit gray once read as white) must not be hidden by statistics of the old
    decoding."""
    folder = write_folder(clean[:4], tmp_path / "ref", classes=1)
    ev_reference.reference_stats(str(folder), inception, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(ev_sources, "fingerprint", lambda: "another decoder")
    ev_reference.reference_stats(str(folder), inception, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("fid-*.bin"))) == 2


# ----------------------------------------------------------------------------------------------------------
# The command


def _json_line(result) -> dict:
    lines = [x for x in result.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, result.stdout  # stdout holds the JSON line and nothing else
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def cli_files(clean, tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("cli")
    ref = write_folder(clean, root / "ref")
    samples = root / "samples.npz"
    np.savez(samples, arr_0=noisy(clean, NOISE[1]).permute(0, 2, 3, 1).numpy())  # as `ddpm sample` writes it
    return {"root": root, "ref": ref, "samples": samples, "cache": root / "cache",
            "common": ["--inception-weights", str(weights), "--cache-dir", str(root / "cache"), "--device", "cpu",
                       "--kid-subsets", "10", "--kid-subset-size", "40", "--batch-size", "32"]}


def test_sets_of_two_sizes_are_scored_with_a_warning(cli_files, clean):
    f = cli_files
    big = f["root"] / "big.npz"
    np.savez(big, arr_0=clean.repeat_interleave(2, 2).repeat_interleave(2, 3).permute(0, 2, 3, 1).numpy())
    r = runner.invoke(app, ["eval", str(big), "--ref", str(f["ref"]), "--no-cache", *f["common"]])
    assert r.exit_code == 0, r.output
    h, w = clean.shape[-2:]
    assert f"warning: the samples are {2 * h}x{2 * w} and the reference {h}x{w}" in r.stderr
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "--no-cache", *f["common"]])
    assert r.exit_code == 0 and "warning: the samples are" not in r.stderr


def test_cli_save_stats_named_as_a_folder_is_refused_before_the_work(cli_files):
    """--save-stats s/ for a folder not made yet wrote the statistics to a FILE named s (Path("s/") is Path("s"))."""
    f = cli_files
    bad = f"{f['root'] / 'new'}/"
    r = runner.invoke(app, ["eval", "--ref", str(f["ref"]), "--save-stats", bad, *f["common"]])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"--save-stats {bad} names a folder" in r.stderr and f"such as {bad}stats.npz" in r.stderr, r.stderr
    assert "reference:" not in r.stderr and not (f["root"] / "new").exists()  # refused before any image was read


def test_cli_save_stats_then_stats_ref_gives_the_folder_fid(cli_files, noisy_stats, clean_stats):
    f = cli_files
    stats = f["root"] / "ref_stats.npz"
    r = runner.invoke(app, ["eval", "--ref", str(f["ref"]), "--save-stats", str(stats), *f["common"]])
    assert r.exit_code == 0, r.output
    assert _json_line(r)["ref_n"] == N_REF and stats.exists()
    with np.load(stats, allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["sigma"].shape == (2048, 2048) and z["features"].shape == (N_REF, 2048)
    before = stats.read_bytes()
    r = runner.invoke(app, ["eval", "--ref", str(f["ref"]), "--save-stats", str(stats), *f["common"]])
    assert r.exit_code == 2 and "--overwrite" in r.output and stats.read_bytes() == before  # kept
    r = runner.invoke(app, ["eval", "--ref", str(f["samples"]), "--save-stats", str(f["samples"]), "--overwrite",
                            *f["common"]])
    assert r.exit_code == 2 and "also the --ref" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "--ref", str(f["ref"]), "--save-stats", str(stats), "--overwrite", *f["common"]])
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), *f["common"]])
    assert r.exit_code == 0, r.output
    by_folder = _json_line(r)
    assert "cache" in r.stderr  # the reference came from the cache the first call wrote
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(stats), *f["common"]])
    assert r.exit_code == 0, r.output
    by_stats = _json_line(r)
    assert by_stats["fid"] == pytest.approx(by_folder["fid"], rel=1e-9)
    assert by_stats["kid_mean"] == pytest.approx(by_folder["kid_mean"], rel=1e-9)
    assert by_folder["n"] == N_REF and by_folder["ref"] == str(f["ref"])
    # PNG files and an NHWC npz carry the same pixels as the tensors the engine scored directly (KID is left out:
    # the folder is read in path order, so its subsets hold other images)
    assert by_folder["fid"] == pytest.approx(ev_scores.frechet_distance(noisy_stats[NOISE[1]], clean_stats), rel=1e-6)


def test_cli_ref_from_a_run_config(cli_files, tmp_path, monkeypatch):
    from conftest import tiny_overrides, write_yaml

    f = cli_files
    cfg = tiny_overrides(tmp_path / "runs")
    cfg["data"] = {"dataset": "shapes", "shapes_count": 12}
    path = write_yaml(tmp_path / "tiny.yaml", cfg)
    args = ["eval", str(f["samples"]), "--ref", str(path), "-n", "12", *f["common"]]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    first = _json_line(r)
    assert first["ref_n"] == 12 and first["n"] == 12 and first["kid_subset_size"] == 12
    def no_loading(*a, **k):
        raise AssertionError("a cache hit must not load the dataset")

    monkeypatch.setattr("ddpm_cli.engine.data.load_dataset", no_loading)
    r = runner.invoke(app, args)  # the second time from the cache, without decoding the data
    assert r.exit_code == 0 and "from the cache" in r.stderr, r.output
    assert _json_line(r)["fid"] == first["fid"]


def test_cli_samples_a_checkpoint_and_scores_it(cli_files, clean_stats, trained_run, trained_conditional_run):
    f = cli_files
    stats = ev_stats.save_stats(clean_stats, f["root"] / "clean_stats.npz")
    r = runner.invoke(app, ["eval", str(trained_run), "-n", "6", "--steps", "2", "--ref", str(stats), "--seed", "3",
                            *f["common"]])
    assert r.exit_code == 0, r.output
    out = _json_line(r)
    assert out["n"] == 6 and out["sampler"] and out["steps"] == 2 and out["checkpoint"].endswith(".safetensors")
    assert np.isfinite(out["fid"]) and out["kid_subset_size"] == 6 and out["precision"] == "fp32"  # CPU
    r = runner.invoke(app, ["eval", str(trained_conditional_run), "-n", "10", "--steps", "2", "--guidance", "2",
                            "--sampler", "ddim", "--ref", str(stats), *f["common"]])
    assert r.exit_code == 0, r.output
    out = _json_line(r)  # the JSON says what was run: guidance evaluates twice a step
    assert out["guidance"] == 2.0 and out["steps"] == 2 and out["nfe_per_image"] == 4
    r = runner.invoke(app, ["eval", str(trained_run), "-n", "2", "--sampler", "dpm++2m", "--ref", str(stats),
                            *f["common"]])
    assert r.exit_code == 0, r.output
    out = _json_line(r)  # no --steps: the sampler's default, not null
    assert out["steps"] == 20 and out["nfe_per_image"] == 20
    r = runner.invoke(app, ["eval", str(trained_run), "-n", "4", "--guidance", "2", "--ref", str(stats),
                            *f["common"]])
    assert r.exit_code == 2 and "class-conditional" in r.stderr  # a usage error: --guidance on this checkpoint
    r = runner.invoke(app, ["eval", str(trained_run), "-n", "4", "--ema-decay", "0.5", "--ref", str(stats),
                            *f["common"]])
    assert r.exit_code == 1 and "holds no EMA weights with decay 0.5" in r.stderr


def test_cli_samples_a_checkpoint_under_any_suffix_and_refuses_a_pickle(cli_files, clean_stats, trained_run,
                                                                         tmp_path):
    """`ddpm sample m.ckpt` reads a checkpoint by its first bytes; `ddpm eval m.ckpt` took the same file for images
    ("not a folder, .zip, .npz or .yaml"). A torch.save file or a pickle is refused as sampling refuses it, whatever
    its suffix, and an .npz of images is still scored as images."""
    import pickle
    import shutil

    from ddpm_cli.engine.runs import resolve_checkpoint

    f = cli_files
    stats = ev_stats.save_stats(clean_stats, tmp_path / "clean_stats.npz")
    renamed = tmp_path / "model.ckpt"
    shutil.copy(resolve_checkpoint(trained_run), renamed)
    r = runner.invoke(app, ["eval", str(renamed), "-n", "2", "--steps", "2", "--ref", str(stats), *f["common"]])
    assert r.exit_code == 0, r.output
    assert Path(_json_line(r)["checkpoint"]).name == "model.ckpt"
    pickles = {"zip.pt": lambda p: torch.save({"w": torch.zeros(2)}, p),
               "legacy.pth": lambda p: torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False),
               "plain.bin": lambda p: p.write_bytes(pickle.dumps({"w": [0.0]}))}
    for name, write in pickles.items():
        write(tmp_path / name)
        r = runner.invoke(app, ["eval", str(tmp_path / name), "-n", "2", "--ref", str(stats), *f["common"]])
        assert r.exit_code == 1 and "is a pickle" in r.stderr, (name, r.output)
    r = runner.invoke(app, ["eval", str(f["samples"]), "-n", "4", "--ref", str(stats), *f["common"]])
    assert r.exit_code == 0 and "checkpoint" not in _json_line(r), r.output


def test_a_zip_of_images_holding_a_data_pkl_is_images_and_an_onnx_export_is_named(cli_files, clean, clean_stats,
                                                                                    tmp_path):
    """Since eval reads a checkpoint by its first bytes, a .zip of images that held any file named data.pkl was
    refused as a pickle (torch.save's zip holds data.pkl beside `version`), and an ONNX export got the images'
    message where `ddpm sample` names the export."""
    f = cli_files
    stats = ev_stats.save_stats(clean_stats, tmp_path / "clean_stats.npz")
    folder = write_folder(clean[:6], tmp_path / "imgs", classes=1)
    archive = zip_folder(folder, tmp_path / "imgs.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("imgs/data.pkl", b"someone's notes")
    r = runner.invoke(app, ["eval", str(archive), "--ref", str(stats), *f["common"]])
    assert r.exit_code == 0 and _json_line(r)["n"] == 6, r.output
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))  # a ModelProto's opening: ir_version, producer
    r = runner.invoke(app, ["eval", str(onnx), "-n", "2", "--ref", str(stats), *f["common"]])
    assert r.exit_code == 1 and "is an ONNX model" in r.stderr, r.output


def test_eval_of_a_checkpoint_scores_the_images_ddpm_sample_draws_with_a_noisy_sampler(cli_files, clean_stats,
                                                                                       trained_run, tmp_path):
    """A sampler that adds noise at each step draws it per batch: on the CPU eval sampled in Inception's batches
    of 50 and `ddpm sample` in its own 256, so `ddpm eval CKPT` scored other images than `ddpm sample CKPT` drew."""
    f = cli_files
    stats = ev_stats.save_stats(clean_stats, tmp_path / "clean_stats.npz")
    opts = ["--sampler", "ddim", "--eta", "1", "--steps", "2", "--seed", "5"]
    at = f["common"].index("--batch-size")
    common = f["common"][:at] + f["common"][at + 2:]  # each command's own default batches
    r = runner.invoke(app, ["sample", str(trained_run), "-n", "60", "--format", "npz", "--out",
                            str(tmp_path / "s.npz"), "--device", "cpu", *opts])
    assert r.exit_code == 0, r.output
    scores = []
    for what in (str(trained_run), str(tmp_path / "s.npz")):
        r = runner.invoke(app, ["eval", what, "-n", "60", "--ref", str(stats), *common,
                                *(opts if what == str(trained_run) else [])])
        assert r.exit_code == 0, r.output
        scores.append(_json_line(r)["fid"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-9), scores


def test_fewer_images_than_feature_dimensions_say_the_fid_is_biased(cli_files, tmp_path):
    """FID of n images in 2,048 dimensions is biased upward below n = 2,048 (a rank-deficient covariance): 1,000
    samples of one distribution read ~120 against it. The score says so, and that only equal n compare."""
    f = cli_files
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), *f["common"]])
    assert r.exit_code == 0, r.output
    assert "biased" in r.stderr and "2,048" in r.stderr, r.stderr


def test_a_non_square_run_configs_reference_is_served_from_the_cache(tmp_path, inception):
    """The key of a config's dataset held model.image_size as a tuple, which the stored key (JSON) holds as a
    list: they never compared equal, and a non-square model's reference was computed again every time."""
    from conftest import tiny_overrides, write_yaml

    class Log(ev_stats.EvalCallbacks):
        def __init__(self):
            self.messages = []

        def on_message(self, text):
            self.messages.append(text)

    cfg = tiny_overrides(tmp_path / "runs")
    cfg["model"]["image_size"] = [16, 24]
    cfg["data"] = {"dataset": "shapes", "shapes_count": 12}
    yaml = write_yaml(tmp_path / "rect.yaml", cfg)
    logs = [Log(), Log()]
    for log in logs:
        ev_reference.reference_stats(str(yaml), inception, cache_dir=tmp_path / "cache", callbacks=log)
    assert not any("from the cache" in m for m in logs[0].messages)
    assert any("from the cache" in m for m in logs[1].messages), logs[1].messages


def test_an_upper_case_safetensors_suffix_is_a_checkpoint_to_sample(cli_files, trained_run, tmp_path):
    """`ddpm sample M.SAFETENSORS` samples it, and `ddpm eval M.SAFETENSORS` said "not a folder, .zip, .npz or
    .yaml": eval told a checkpoint from samples by a case-sensitive suffix."""
    import shutil

    from ddpm_cli.engine.runs import latest_checkpoint

    f = cli_files
    lower = latest_checkpoint(trained_run)
    upper = shutil.copy(lower, tmp_path / "M.SAFETENSORS")
    args = ["-n", "4", "--steps", "2", "--ref", str(f["samples"]), *f["common"]]
    by_name = {}
    for ckpt in (lower, upper):
        r = runner.invoke(app, ["eval", str(ckpt), *args])
        assert r.exit_code == 0, r.output
        by_name[ckpt] = _json_line(r)
    assert by_name[upper]["n"] == 4 and by_name[upper]["fid"] == by_name[lower]["fid"]


def test_fid_of_model_for_the_training_loop(trained_conditional_run, clean_stats, inception):
    from ddpm_cli.engine.checkpoint import load_model

    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine.draw import Drawer

    model, diffusion, cfg, _ = load_model(trained_conditional_run)
    model.train()
    m = cfg.model
    drawer = Drawer(model, diffusion, SamplerSpec(steps=2), (3, m.image_size, m.image_size), m.num_classes,
                    guidance=1.5)
    res = ev_run.fid_of_model(drawer, 5, clean_stats, inception, batch_size=5)
    assert model.training  # its mode is restored
    assert res.n == 5 and np.isfinite(res.fid) and res.fid > 0 and res.kid_mean is None


class _Evil:
    """Unpickling this would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _one_clear_line(r, code: int, *phrases: str) -> None:
    """Exit `code`, no traceback, nothing on stdout; a project error is one `error:` line naming the phrases."""
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.exception
    assert r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for p in phrases:
        assert p in r.stderr, (p, r.stderr)


def test_cli_n_of_a_per_class_folder_scores_every_class(cli_files, tmp_path, monkeypatch):
    folder = two_class_folder(tmp_path / "samples")
    scored = []
    real = ev_run.compute_stats

    def spy(source, *args, **kwargs):
        if kwargs.get("phase") == "samples":
            scored.append(torch.cat(list(source.batches(64))))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ev_run, "compute_stats", spy)
    r = runner.invoke(app, ["eval", str(folder), "--ref", str(cli_files["ref"]), "-n", "6", *cli_files["common"]])
    assert r.exit_code == 0, r.output
    assert _json_line(r)["n"] == 6 and _classes_of(scored[0]) == ["a"] * 3 + ["b"] * 3


def test_cli_ref_limit_of_a_per_class_reference_takes_each_class_its_share(cli_files, tmp_path, monkeypatch):
    """--ref-limit N took the reference's first N files: of a per-class folder (cifar10-jpeg's train.zip is one)
    the first classes alone, a biased reference. Its N are spread evenly over the sorted paths, as -n's are."""
    folder = two_class_folder(tmp_path / "ref")
    seen = []
    real = ev_reference.compute_stats

    def spy(source, *args, **kwargs):
        seen.append(torch.cat(list(source.batches(64))))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ev_reference, "compute_stats", spy)
    r = runner.invoke(app, ["eval", str(cli_files["samples"]), "--ref", str(folder), "--ref-limit", "6",
                            *cli_files["common"]])
    assert r.exit_code == 0, r.output
    assert _json_line(r)["ref_n"] == 6 and _classes_of(seen[0]) == ["a"] * 3 + ["b"] * 3


def test_cli_n_with_statistics_to_score_is_a_usage_error_before_any_work(cli_files, clean_stats, monkeypatch):
    """-n picks images, and statistics hold none: it was silently ignored, the whole set's statistics scored."""
    stats = ev_stats.save_stats(clean_stats, cli_files["root"] / "stats_to_score.npz")

    def no_inception(*args, **kwargs):
        raise AssertionError("the usage error comes before Inception is loaded")

    monkeypatch.setattr(ev_run, "load_inception", no_inception)
    r = runner.invoke(app, ["eval", str(stats), "--ref", str(cli_files["ref"]), "-n", "10", *cli_files["common"]])
    _one_clear_line(r, 2, "-n", "statistics", str(stats))
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr


def test_cli_bad_inputs_give_one_clear_line(cli_files, tmp_path, monkeypatch, trained_run):
    f = cli_files
    common = f["common"]
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(tmp_path / "nowhere"), *common])
    _one_clear_line(r, 1, "nowhere", "not found")
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(tmp_path / "empty"), *common])
    _one_clear_line(r, 1, "no images found")
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "-n", "0", *common])
    _one_clear_line(r, 2, "--num")  # typer's usage error
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all")
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(junk), *common])
    _one_clear_line(r, 1, "junk.npz", "not an .npz file")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.array([object()], dtype=object), sigma=np.zeros((1, 1)))
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(pickled), *common])
    _one_clear_line(r, 1, "pickled.npz")
    r = runner.invoke(app, ["eval", "--ref", str(f["ref"]), *common])
    _one_clear_line(r, 2, "nothing to score")
    r = runner.invoke(app, ["eval", str(tmp_path / "missing.npz"), "--ref", str(f["ref"]), *common])
    _one_clear_line(r, 1, "missing.npz", "not found")
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "-n", "500", *common])
    _one_clear_line(r, 1, f"holds {N_REF} images")
    bad_weights = tmp_path / "w.pth"
    bad_weights.write_text("hello")
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), *common,
                            "--inception-weights", str(bad_weights)])
    _one_clear_line(r, 1, "w.pth", "state dict")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _Evil(marker)}, evil)
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), *common,
                            "--inception-weights", str(evil)])
    _one_clear_line(r, 1, "evil.pth", "refused", "open")
    assert not marker.exists()  # checked without unpickling, so torch-fidelity never loaded it
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "--sampler", "ddim", *common])
    _one_clear_line(r, 1, "not a checkpoint")
    r = runner.invoke(app, ["eval", str(trained_run), "--sampler", "nope", "--ref", str(f["ref"]), "--gpus", "2",
                            *common])
    _one_clear_line(r, 2, "--sampler", "nope")  # a usage error, before torchrun starts N processes
    from urllib.error import URLError

    from torchvision.datasets import CIFAR10

    def offline(self):
        raise URLError("no network (test)")

    monkeypatch.setattr(CIFAR10, "download", offline)  # as offline, also where CI has a network
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", "cifar10-test", "--data-root",
                            str(tmp_path / "nodata"), *common, "--inception-weights", str(bad_weights)])
    _one_clear_line(r, 1, "CIFAR-10", "--data-root")
    assert not (tmp_path / "nodata").exists()  # a failed download leaves no empty folder


def test_eval_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from ddpm_cli.cli.app import app; "
            "r = CliRunner().invoke(app, ['eval', '--help']); assert r.exit_code == 0 and '--ref' in r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------------------------------------
# The real weights (../shared), at the real 299 px: cheap, and skipped when the files are absent

REAL_WEIGHTS = SHARED / "assets" / "weights-inception-2015-12-05-fid-only-fp16.pth"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test.zip"


@pytest.mark.skipif(not (REAL_WEIGHTS.is_file() and CIFAR_TEST.is_file()), reason="../shared assets absent")
def test_real_weights_tell_cifar_from_noise(monkeypatch):
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 299)
    inc = ev_inception.load_inception(REAL_WEIGHTS, "cpu")
    src = ev_sources.files_source(CIFAR_TEST)
    assert src.count == 10_000
    first = next(src.batches(16))  # (16, 3, 32, 32): airplanes, in path order
    a = ev_stats.compute_stats(ev_sources.tensor_source(first[:8], "a"), inc, batch_size=8)
    b = ev_stats.compute_stats(ev_sources.tensor_source(first[8:], "b"), inc, batch_size=8)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    c = ev_stats.compute_stats(ev_sources.tensor_source(rand, "noise"), inc, batch_size=8)
    assert (a.features >= 0).all() and np.isfinite(a.features).all()
    # 8 images a side: FID is mostly small-sample bias, so the means tell the sets apart more sharply
    assert ev_scores.frechet_distance(a, b) < ev_scores.frechet_distance(a, c)
    assert np.sum((a.mu - b.mu) ** 2) < 0.5 * np.sum((a.mu - c.mu) ** 2)


def test_in_training_fid_is_logged(weights, small_resize, tmp_path):
    """logging.fid_every: FID of EMA samples against the training images, in metrics.jsonl, every N steps, and
    on the display `ddpm train` shows (its record of its own was read as a metrics line: a KeyError, no
    checkpoint)."""
    from conftest import tiny_config
    from ddpm_cli.cli.ui import TrainDisplay
    from ddpm_cli.engine.train import train

    cfg = tiny_config(tmp_path, train__steps=6, data__shapes_count=48, logging__fid_every=3,
                      logging__fid_samples=8, logging__fid_steps=2, logging__fid_inception_weights=str(weights))
    res = train(cfg, callbacks=TrainDisplay(6, live=False))
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in lines if "fid" in r]
    assert [r["step"] for r in fids] == [3, 6]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in fids)


def test_in_training_fid_settings_are_checked_before_the_run_and_named_as_the_config_names_them(tmp_path):
    """A missing reference or weights file failed at the first FID, hours in, naming `ddpm eval`'s flags."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train
    from ddpm_cli.errors import ConfigError

    for field, value, named in (("fid_ref", tmp_path / "nope.zip", "logging.fid_ref"),
                                ("fid_inception_weights", tmp_path / "nope.pth", "logging.fid_inception_weights")):
        cfg = tiny_config(tmp_path / field, train__steps=4, logging__fid_every=2, **{f"logging__{field}": str(value)})
        with pytest.raises(ConfigError, match=named) as e:
            train(cfg)
        assert "--ref" not in str(e.value) and "--inception-weights" not in str(e.value)
        assert not list((tmp_path / field).glob("*/checkpoints"))  # nothing trained


def test_in_training_fid_that_fails_mid_run_keeps_the_steps_and_names_the_config_fields(weights, small_resize,
                                                                                         tmp_path):
    """A reference that is there but cannot be read (here a text file) passed the start's check and failed at the
    first FID: the run ended with the steps since its last checkpoint lost, naming `ddpm eval`'s --ref."""
    from conftest import tiny_config
    from ddpm_cli.engine.runs import list_checkpoints
    from ddpm_cli.engine.train import train
    from ddpm_cli.errors import DdpmError

    bad = tmp_path / "ref.txt"
    bad.write_text("not images")
    cfg = tiny_config(tmp_path / "runs", train__steps=6, logging__fid_every=4, logging__checkpoint_every=100,
                      logging__fid_samples=8, logging__fid_steps=2, logging__fid_ref=str(bad),
                      logging__fid_inception_weights=str(weights))
    with pytest.raises(DdpmError) as e:
        train(cfg)
    said = str(e.value)
    assert "logging.fid_ref" in said and str(bad) in said and "--ref" not in said and "--resume" in said, said
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert [int(p.stem.split("-")[1]) for p in list_checkpoints(run_dir)] == [4]  # the steps before the FID


def test_in_training_fid_weights_that_cannot_be_loaded_are_refused_before_the_run(tmp_path):
    """Weights that are there but are not torch-fidelity's (here a text file) passed the start's check (it looked
    only for the file) and failed at the first FID, hours in."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train
    from ddpm_cli.errors import ConfigError

    bad = tmp_path / "inception.pth"
    bad.write_text("not weights")
    cfg = tiny_config(tmp_path / "runs", train__steps=4, logging__fid_every=2, logging__fid_inception_weights=str(bad))
    with pytest.raises(ConfigError, match="logging.fid_inception_weights") as e:
        train(cfg)
    assert "--inception-weights" not in str(e.value)
    assert not list((tmp_path / "runs").glob("*/checkpoints"))  # refused before it trained


def test_inception_that_cannot_be_loaded_fails_before_any_sampling(trained_run, clean, tmp_path, monkeypatch):
    """Under --gpus the images were drawn (eagerly, across ranks) and only then did the Inception download fail:
    with -n 50000, hours lost (a helper's sweep)."""
    from ddpm_cli.errors import DdpmError

    def offline(*a, **k):
        raise DdpmError("could not download torch-fidelity's Inception weights")

    def must_not_sample(*a, **k):
        raise AssertionError("sampled before Inception was ready")

    monkeypatch.setattr(ev_run, "load_inception", offline)
    monkeypatch.setattr(ev_run, "load_drawer", must_not_sample)
    req = ev_run.EvalRequest(ref=str(write_folder(clean[:4], tmp_path / "ref")), input=trained_run, n=4,
                             device="cpu")
    with pytest.raises(DdpmError, match="Inception"):
        ev_run.evaluate(req)


def test_eval_on_two_ranks_scores_the_images_of_one(clean, weights, trained_run, tmp_path):
    """`ddpm eval CKPT --gpus 2` (gloo here): each rank samples its batches, rank 0 gathers them in order and scores:
    the same images, so the same FID and KID, as one process; one JSON line."""
    from conftest import run_cli

    ref = write_folder(clean[:8], tmp_path / "ref")
    args = ["eval", str(trained_run), "-n", "7", "--batch-size", "3", "--steps", "2", "--ref", str(ref),
            "--inception-weights", str(weights), "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "3",
            "--kid-subset-size", "5"]
    env = {"OMP_NUM_THREADS": "1"}
    one = run_cli(*args, "--device", "cpu", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*args, "--gpus", "2", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, two))
    assert len(two.stdout.strip().splitlines()) == 1  # rank 0 alone prints
    assert "sampling (2 ranks)" in two.stderr  # and the work was spread
    assert a["n"] == b["n"] == 7 and a["fid"] == pytest.approx(b["fid"], rel=1e-9, abs=1e-9)
    assert a["kid_mean"] == pytest.approx(b["kid_mean"], rel=1e-9, abs=1e-12)


def test_eval_ema_decay_scores_the_images_of_that_average(cli_files, tmp_path):
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    run = train(tiny_config(tmp_path / "runs", train__steps=6, train__ema_decay=0.9, train__ema_extra=[0.3],
                            logging__checkpoint_every=6, logging__sample_every=100)).run_dir
    drawn = tmp_path / "drawn.npz"
    r = runner.invoke(app, ["sample", str(run), "-n", "10", "--steps", "3", "--ema-decay", "0.3", "--format", "npz",
                            "--out", str(drawn), "--seed", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    common = ["-n", "10", "--steps", "3", "--seed", "5", "--ref", str(drawn), "--no-cache", *cli_files["common"][:2],
              "--device", "cpu", "--kid-subsets", "3", "--kid-subset-size", "5"]
    same = runner.invoke(app, ["eval", str(run), "--ema-decay", "0.3", *common])
    main = runner.invoke(app, ["eval", str(run), *common])
    assert same.exit_code == 0 and main.exit_code == 0, same.output + main.output
    assert _json_line(same)["ema_decay"] == 0.3 and _json_line(main)["ema_decay"] == 0.9
    assert abs(_json_line(same)["fid"]) < 1e-6 * _json_line(main)["fid"]  # the main average draws other images


def test_eval_of_a_checkpoint_scores_the_images_ddpm_sample_draws(cli_files, trained_conditional_run, tmp_path):
    """Both routes to a checkpoint's FID see the same images (labels in turn, guidance, seeds, precision): the
    samples that `ddpm sample` writes, used as the reference, score 0 against `ddpm eval CKPT`'s own."""
    f = cli_files
    drawn = tmp_path / "drawn.npz"
    r = runner.invoke(app, ["sample", str(trained_conditional_run), "-n", "10", "--steps", "3", "--guidance", "2",
                            "--format", "npz", "--out", str(drawn), "--seed", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(trained_conditional_run), "-n", "10", "--steps", "3", "--guidance", "2",
                            "--seed", "5", "--ref", str(drawn), "--no-cache", *f["common"][:2], "--device", "cpu",
                            "--kid-subsets", "3", "--kid-subset-size", "5"])
    assert r.exit_code == 0, r.output
    out = _json_line(r)
    assert out["ema_decay"] == 0.9  # the tiny runs' train.ema_decay
    named = runner.invoke(app, ["eval", str(trained_conditional_run), "-n", "10", "--steps", "3", "--guidance", "2",
                                "--seed", "5", "--ref", str(drawn), "--no-cache", *f["common"][:2], "--device",
                                "cpu", "--kid-subsets", "3", "--kid-subset-size", "5", "--ema-decay", "0.9"])
    assert named.exit_code == 0 and abs(_json_line(named)["fid"]) < 1e-6  # naming the default: the same images
    other = runner.invoke(app, ["eval", str(trained_conditional_run), "-n", "10", "--steps", "3", "--guidance", "2",
                                "--seed", "6", "--ref", str(drawn), "--no-cache", *f["common"][:2], "--device",
                                "cpu", "--kid-subsets", "3", "--kid-subset-size", "5"])
    assert other.exit_code == 0, other.output
    assert abs(out["fid"]) < 1e-6 * _json_line(other)["fid"]  # another seed: other images, a clearly larger FID


def test_eval_with_autoguidance_scores_what_ddpm_sample_draws_with_it(cli_files, trained_run, tmp_path):
    f = cli_files
    early = trained_run / "checkpoints" / "ckpt-00000010.safetensors"
    drawn = tmp_path / "drawn.npz"
    guided = ["--steps", "3", "--guidance", "2", "--guide-model", str(early), "--seed", "5", "--device", "cpu"]
    r = runner.invoke(app, ["sample", str(trained_run), "-n", "10", "--format", "npz", "--out", str(drawn), *guided])
    assert r.exit_code == 0, r.output
    score = ["--ref", str(drawn), "--no-cache", *f["common"][:2], "--kid-subsets", "3", "--kid-subset-size", "5"]
    r = runner.invoke(app, ["eval", str(trained_run), "-n", "10", *guided, *score])
    assert r.exit_code == 0, r.output
    out = _json_line(r)
    assert out["guide"] == str(early) and out["guidance"] == 2.0 and abs(out["fid"]) < 1e-6
    plain = runner.invoke(app, ["eval", str(trained_run), "-n", "10", *guided[:2], *guided[6:], *score])
    assert plain.exit_code == 0 and _json_line(plain)["fid"] > 1e-3  # unguided: other images
    r = runner.invoke(app, ["eval", str(drawn), "--guide-model", str(early), *score])
    assert r.exit_code == 1 and "--guide-model" in r.stderr and "not a checkpoint" in r.stderr


def test_eval_of_a_checkpoint_with_a_stored_guide_scores_the_default_sample(cli_files, tmp_path):
    """`ddpm eval RUN` draws what `ddpm sample RUN` draws: autoguided by the stored guide, with DPM-Solver++(2M)."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    run = train(tiny_config(tmp_path / "runs", train__guide_step=10)).run_dir
    drawn = tmp_path / "drawn.npz"
    r = runner.invoke(app, ["sample", str(run), "-n", "10", "--format", "npz", "--out", str(drawn), "--steps", "3",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(run), "-n", "10", "--steps", "3", "--ref", str(drawn), "--no-cache",
                            *cli_files["common"][:2], "--device", "cpu", "--kid-subsets", "3", "--kid-subset-size",
                            "5"])
    assert r.exit_code == 0, r.output
    out = _json_line(r)
    assert out["sampler"] == "dpm++2m" and out["guidance"] == 2.0 and out["guide_step"] == 10
    assert abs(out["fid"]) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# The sampling options `ddpm sample` has, and a newcomer's eval (issue 26)

SAMPLE_ONLY = {"--out", "-o", "--format", "--grid", "--overwrite", "--per-class", "--class"}  # where images go


def _options(command: str) -> set[str]:
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def test_eval_offers_every_sampling_option_of_sample():
    sample, evaluate = _options("sample"), _options("eval")
    assert {"--eta", "--spacing", "--variance", "--ema", "--no-ema", "--ema-decay", "--compile"} <= sample
    assert sample - SAMPLE_ONLY <= evaluate, sorted(sample - SAMPLE_ONLY - evaluate)
    text = runner.invoke(app, ["eval", "--help"], terminal_width=200).output
    assert all(o in text for o in ("--eta", "--spacing", "--variance", "--no-ema", "--ema-decay", "--ref-limit"))


@pytest.fixture(scope="module")
def run_with_two_emas(tmp_path_factory):
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    cfg = tiny_config(tmp_path_factory.mktemp("emas"), train__steps=8, train__ema_decay=0.9, train__ema_extra=[0.3],
                      logging__checkpoint_every=8, logging__sample_every=100)
    return train(cfg).run_dir


def test_eval_s_sampling_options_change_what_it_draws(cli_files, clean_stats, run_with_two_emas):
    f = cli_files
    stats = ev_stats.save_stats(clean_stats, f["root"] / "clean_stats_opts.npz")
    base = ["eval", str(run_with_two_emas), "-n", "4", "--steps", "3", "--sampler", "ddim", "--ref", str(stats),
            *f["common"]]

    def fid(*extra: str) -> dict:
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == 0, r.output
        return _json_line(r)

    plain = fid()
    assert fid()["fid"] == plain["fid"]  # the same options draw the same images
    noisy_ddim = fid("--eta", "1")
    assert noisy_ddim["fid"] != plain["fid"] and noisy_ddim["eta"] == 1.0
    assert fid("--spacing", "quadratic")["fid"] != plain["fid"]
    other_ema = fid("--ema-decay", "0.3")
    assert other_ema["fid"] != plain["fid"] and other_ema["ema_decay"] == 0.3 and plain["ema_decay"] == 0.9
    raw = fid("--no-ema")
    assert raw["fid"] != plain["fid"] and raw["ema_decay"] is None
    r = runner.invoke(app, [*base, "--no-ema", "--ema-decay", "0.3"])
    _one_clear_line(r, 2, "--no-ema")


def test_eval_off_a_terminal_estimates_each_stage_and_says_how_far_it_is(cli_files, tmp_path):
    f = cli_files
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "--no-cache", *f["common"],
                            "--batch-size", "16"])  # 4 batches: the estimate comes after the second
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    start = lines.index(f"reference: {N_REF} images")
    assert re.match(rf"reference: about \d+ s for {N_REF} images at [\d.,]+ images/s", lines[start + 1]), lines
    assert any(re.match(rf"reference: {N_REF} images in [\d.]+ s", x) for x in lines[start + 2:]), lines


def test_an_eval_process_ends_without_the_teardown_and_prints_its_whole_json_line(cli_files):
    from conftest import run_main_probing_teardown

    f = cli_files
    few = f["root"] / "few.npz"  # (a fresh process's Inception runs at full size on the CPU: 16 images each side)
    np.savez(few, arr_0=np.load(f["samples"])["arr_0"][:16])
    common = [*f["common"], "--kid-subset-size", "8"]
    r = run_main_probing_teardown("eval", str(few), "--ref", str(f["ref"]), "--ref-limit", "16", *common)
    assert r.returncode == 0 and "TEARDOWN" not in r.stdout, r.stdout + r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 16


def test_plain_progress_estimates_from_the_batches_after_the_first(monkeypatch):
    """The first batch of a stage holds its one-off start (on a GPU: compiling the sampler). A 50,000-image
    eval on an H200 printed "about 45 min" after a 54 s first batch and took 135 s; the estimate and the rates
    must come from the batches after it."""
    import io

    from rich.console import Console

    from ddpm_cli.cli import ui

    clock = [100.0]
    monkeypatch.setattr(ui.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = ui.PlainProgress(Console(file=out, width=200), every_s=0.0)
    progress.start("samples", 10_000)
    clock[0] += 60.0  # the first batch: a minute of compiling
    progress.advance(1000)
    for done in range(2000, 10_001, 1000):  # then a batch a second
        clock[0] += 1.0
        progress.advance(done)
    progress.finish()
    text = out.getvalue().splitlines()
    assert len(text) == 1 + 1 + 7 + 1, text  # start, the estimate, a line a batch up to the last, the end
    assert text[1] == "samples: about 69 s for 10,000 images at 1,000 images/s (the first batch took 60.0 s)"
    assert text[2] == "samples: 3,000/10,000 images (30%), 1,000 images/s, about 7 s left"
    assert text[-1].startswith("samples: 10,000 images in 69.0 s")


def test_ref_limit_uses_n_images_of_the_reference_spread_evenly(cli_files, clean, inception):
    f = cli_files
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "--ref-limit", "40", *f["common"]])
    assert r.exit_code == 0, r.output
    out = _json_line(r)
    assert out["ref_n"] == 40 and out["ref_limit"] == 40 and out["n"] == N_REF
    whole = torch.cat(list(ev_sources.files_source(f["ref"]).batches(64)))  # sorted path order
    spread = whole[ev_sources.evenly_spread(len(whole), 40)]
    expect = ev_stats.compute_stats(ev_sources.tensor_source(spread, "40 spread"), inception, batch_size=32)
    samples = torch.from_numpy(np.load(f["samples"])["arr_0"]).permute(0, 3, 1, 2)
    got = ev_stats.compute_stats(ev_sources.tensor_source(samples, "samples"), inception, batch_size=32)
    assert out["fid"] == pytest.approx(ev_scores.frechet_distance(got, expect), rel=1e-6)
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "--ref-limit", "40", *f["common"]])
    assert "from the cache" in r.stderr and _json_line(r)["fid"] == out["fid"]  # cached apart from the whole
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), "--ref-limit", "1000", *f["common"]])
    assert r.exit_code == 0 and _json_line(r)["ref_n"] == N_REF  # a limit, not a demand
    stats = ev_stats.save_stats(ev_stats.load_stats(next(f["cache"].glob("fid-*.bin"))), f["root"] / "s.npz")
    r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(stats), "--ref-limit", "10", *f["common"]])
    _one_clear_line(r, 2, "--ref-limit", "statistics")


def test_kid_of_sets_no_larger_than_a_subset_reports_no_spread():
    rng = np.random.default_rng(3)
    a, b, big = (rng.standard_normal((n, 8)) for n in (12, 12, 40))
    notes = []

    class Log(ev_stats.EvalCallbacks):
        def on_message(self, text):
            notes.append(text)

    whole = ev_scores.score(_stats_of(a), _stats_of(b), kid_subsets=10, kid_subset_size=1000, callbacks=Log())
    assert whole.kid_mean is not None and whole.kid_std is None and whole.kid_subsets == 1  # not a std of 1e-16
    assert any("no spread" in m for m in notes)
    notes.clear()
    part = ev_scores.score(_stats_of(a), _stats_of(big), kid_subsets=10, kid_subset_size=12, callbacks=Log())
    assert part.kid_std > 0 and any("understates" in m for m in notes)


def test_a_folder_of_mixed_sizes_is_fitted_to_the_first_image_named_height_by_width(tmp_path):
    """The warning names the size as every other message does, height x width (it said width x height)."""
    from PIL import Image

    from ddpm_cli.engine.evaluation.sources import files_source

    Image.new("RGB", (24, 16), (200, 0, 0)).save(tmp_path / "a.png")  # PIL takes (width, height): 16 high, 24 wide
    Image.new("RGB", (30, 30), (0, 200, 0)).save(tmp_path / "b.png")
    src = files_source(tmp_path)
    batches = list(src.batches(8))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 16, 24)]
    assert src.warnings == [f"1 image(s) in {tmp_path} differ in size from the first one and were center-cropped "
                            f"and resized to 16x24 (height x width)"]


def test_sampling_options_with_samples_to_score_are_refused_seed_and_compile_too(cli_files):
    """The sampling options apply only when eval samples a checkpoint: with samples to score they were refused,
    but --seed and --compile were taken and ignored without a word."""
    f = cli_files
    for extra in (["--steps", "3"], ["--seed", "3"], ["--compile", "on"]):
        r = runner.invoke(app, ["eval", str(f["samples"]), "--ref", str(f["ref"]), *f["common"], *extra])
        assert r.exit_code == 1 and "not a checkpoint" in r.stderr and extra[0] in r.stderr, (extra, r.output)
