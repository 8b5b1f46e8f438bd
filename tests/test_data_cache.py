"""The decoded-data cache (engine/data_cache.py): a folder or .zip decoded once at a size is loaded, not decoded, by
the next run on the same files; a changed file, size or damaged entry decodes again; nothing it does stops a run;
`ddpm cache` shows and clears it."""
from __future__ import annotations

import json
import os
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ok
from ddpm_cli.config import DataConfig, ModelConfig
from ddpm_cli.engine import data, data_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DDPM_DATA_CACHE", "on")
    monkeypatch.setenv("DDPM_DATA_CACHE_DIR", str(folder))
    return folder


def _images(root, n=12, bad=0):
    """n PNGs of two classes (random pixels, so any decoding difference shows), and `bad` unreadable files."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / ("cats" if i % 2 else "dogs") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    for i in range(bad):
        (root / "cats" / f"broken{i}.png").write_bytes(b"not a png")
    return root


def _load(root, size=16, channels=3):
    return data.load_dataset(DataConfig(dataset="folder", root=str(root)),
                             ModelConfig(image_size=size, in_channels=channels))


def _no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decoded although the set is cached")

    monkeypatch.setattr(data, "decode_image", refuse)


def _same(a, b):
    """The same set, laid out the same: training on it gives the same losses, bit for bit (test_streaming.py)."""
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes
    assert a.images.stride() == b.images.stride(), (a.images.stride(), b.images.stride())


def test_a_second_load_is_the_first_s_tensor_without_decoding(cache, tmp_path, monkeypatch):
    root = _images(tmp_path / "imgs", bad=1)
    first = _load(root)
    assert first.images.shape == (12, 3, 16, 16) and first.classes == ["cats", "dogs"]
    assert [e.name[:5] for e in data_cache.list_entries()] == ["data-"]
    _no_decoding(monkeypatch)
    second = _load(root)
    _same(first, second)
    assert second.warnings == first.warnings and "not readable" in second.warnings[0]  # said again from the entry


@pytest.mark.parametrize("channels", [3, 1])
def test_a_cached_set_trains_as_the_decoded_one(cache, tmp_path, channels):
    """Same tensor and strides, so the same losses: a run's second start must not train differently."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    root = _images(tmp_path / "imgs", n=40)
    losses = []
    for run in ("first", "cached"):
        cfg = tiny_config(tmp_path / run, train__steps=6, logging__log_every=2, data__dataset="folder",
                          data__root=str(root), model__in_channels=channels, model__conditional=False)
        losses.append([r["loss"] for r in train(cfg).metrics if "loss" in r])
    assert len(data_cache.list_entries()) == 1 and losses[0] == losses[1], losses


def test_a_zip_is_cached_by_its_entries(cache, tmp_path, monkeypatch):
    root = _images(tmp_path / "imgs")
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, p.relative_to(root).as_posix())
    first = _load(archive)
    real_decode = data.decode_image
    _no_decoding(monkeypatch)
    _same(first, _load(archive))
    monkeypatch.setattr(data, "decode_image", real_decode)
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))  # the same entries, touched: still a hit
    _same(first, _load(archive))
    assert len(data_cache.list_entries()) == 1
    size, mtime = archive.stat().st_size, archive.stat().st_mtime_ns
    with zipfile.ZipFile(archive, "w") as zf:  # other pixels in an archive of the same size and time
        for p in sorted(root.rglob("*.png")):
            zf.writestr(p.relative_to(root).as_posix(), _png(np.full((20, 24, 3), 7, dtype=np.uint8)))
    os.utime(archive, ns=(mtime, mtime))
    other = _load(archive)
    assert int(other.images.max()) == 7 and len(data_cache.list_entries()) == 2, archive.stat().st_size == size


def _png(pixels) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_changed_file_or_size_decodes_again(cache, tmp_path):
    root = _images(tmp_path / "imgs")
    first = _load(root)
    st = (root / "cats" / "003.png").stat()
    (root / "cats" / "003.png").write_bytes(_png(np.full((20, 24, 3), 9, dtype=np.uint8)))
    os.utime(root / "cats" / "003.png", ns=(st.st_atime_ns, st.st_mtime_ns))  # its time put back, as cp -p does
    assert int(_load(root).images[1].max()) == 9  # cats/001, cats/003: the new pixels, not the cached ones
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(root / "dogs" / "000.png")  # new content
    second = _load(root)
    assert not torch.equal(first.images, second.images) and int(second.images[6].max()) == 0  # dogs/000, after cats
    (root / "cats" / "001.png").unlink()  # a file gone
    assert len(_load(root).images) == 11
    assert _load(root, size=8).images.shape[-1] == 8  # another size is another entry
    assert len(data_cache.list_entries()) == 5


def test_a_changed_decoder_decodes_again(cache, tmp_path, monkeypatch):
    """A fix to engine/decode.py (4-channel sets once decoded to one channel) must not be hidden by entries the old
    decoder wrote, though ddpm's version is the same."""
    from ddpm_cli.engine import decode

    root = _images(tmp_path / "imgs")
    _load(root)
    assert decode.fingerprint() == decode.fingerprint()
    monkeypatch.setattr(decode, "fingerprint", lambda: "another decoder")
    calls = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    _load(root)
    assert calls and len(data_cache.list_entries()) == 2


def test_a_damaged_entry_is_decoded_again_and_replaced(cache, tmp_path, monkeypatch):
    root = _images(tmp_path / "imgs")
    first = _load(root)
    (entry,) = data_cache.list_entries()
    blob = cache / f"{entry.name}.bin"
    blob.write_bytes(blob.read_bytes()[:100])
    again = _load(root)
    _same(first, again)
    assert len(again.warnings) == 1 and "is damaged" in again.warnings[0] and "decoding the images again" in \
        again.warnings[0]
    _no_decoding(monkeypatch)
    assert _load(root).warnings == []  # replaced: a good entry again
    monkeypatch.setattr(os, "utime", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    _same(first, _load(root))  # a cache it cannot touch still serves


def test_off_too_large_or_unwritable_the_run_goes_on(cache, tmp_path, monkeypatch):
    root = _images(tmp_path / "imgs")
    monkeypatch.setenv("DDPM_DATA_CACHE", "off")
    assert _load(root).warnings == [] and not cache.exists()
    monkeypatch.setenv("DDPM_DATA_CACHE", "on")
    monkeypatch.setattr(data_cache, "MAX_BYTES", 2 * 12 * 3 * 16 * 16)  # half of it is less than this set
    assert _load(root).warnings == [] and data_cache.list_entries() == []
    monkeypatch.undo()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DDPM_DATA_CACHE", "on")
    monkeypatch.setenv("DDPM_DATA_CACHE_DIR", str(blocked / "cache"))
    ds = _load(root)
    assert len(ds.images) == 12 and len(ds.warnings) == 1 and "could not keep the images" in ds.warnings[0]
    from safetensors import SafetensorError

    def full_disk(*a, **k):
        raise SafetensorError("No space left on device (os error 28)")  # safetensors' own error, not an OSError

    monkeypatch.setenv("DDPM_DATA_CACHE_DIR", str(tmp_path / "full"))
    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    ds = _load(root)
    assert len(ds.images) == 12 and "No space left on device" in ds.warnings[0]
    assert not [p for p in (tmp_path / "full").iterdir() if p.suffix != ".lock"]  # no temporary file left


def test_under_torchrun_a_host_s_first_process_keeps_the_set(cache, tmp_path, monkeypatch):
    """Every process decodes the set; one writing it is enough (8 ranks wrote 8 copies of CIFAR-10 at once)."""
    root = _images(tmp_path / "imgs")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert len(_load(root).images) == 12 and data_cache.list_entries() == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    _load(root)
    assert len(data_cache.list_entries()) == 1


@pytest.mark.skipif(os.name != "posix", reason="a file name that is not UTF-8 needs a POSIX file system")
def test_a_file_name_that_is_not_utf8_is_cached_too(cache, tmp_path):
    root = _images(tmp_path / "imgs", n=3)
    os.rename(root / "cats" / "001.png", os.path.join(os.fsencode(root / "cats"), b"\xff.png"))
    assert len(_load(root).images) == 3 and len(data_cache.list_entries()) == 1


def test_ddpm_cache_shows_and_clears_the_data_entries(cache, tmp_path):
    _load(_images(tmp_path / "imgs"))
    info = json.loads(ok("cache", "info", "--json").output)["data"]
    assert info["path"] == str(cache) and info["enabled"] is True and info["bytes"] > 12 * 3 * 16 * 16
    (row,) = info["entries"]
    assert row["images"] == 12 and row["shape"] == [3, 16, 16] and row["source"] == str((tmp_path / "imgs").resolve())
    text = ok("cache", "info").output
    assert f"data cache: {cache}" in text and "12 images of 3x16x16" in text
    desc = cache / f"{row['name']}.json"  # a description damaged by hand or by another version: shown, not a crash
    meta = json.loads(desc.read_text())
    desc.write_text(json.dumps({**meta, "shape": 5, "count": None, "key": {"source": []}}))
    assert "? images of ?  from ?" in ok("cache", "info").output
    assert json.loads(ok("cache", "info", "--json").output)["data"]["entries"][0]["shape"] is None
    out = ok("cache", "clear").output.splitlines()
    assert out[1].startswith("removed 1 entry (") and str(cache) in out[1]
    assert data_cache.list_entries() == []


def _shapes(count, size=32, seed=0, channels=3):
    return data.load_dataset(DataConfig(dataset="shapes", shapes_count=count, shapes_seed=seed),
                             ModelConfig(image_size=size, in_channels=channels))


def test_a_large_shapes_set_is_drawn_once_then_read_back(cache, monkeypatch):
    """The built-in set is drawn once (seconds at 50,000 images) and read back the same tensor, strides included,
    for any size and channels; another seed, count, size or channels draws its own; a small set is not kept; a
    damaged entry is drawn again."""
    monkeypatch.setattr(data, "SHAPES_CACHED_PIXELS", 64 * 16 * 16)
    monkeypatch.setattr(data_cache, "SHAPES_MAX_ENTRIES", 8)
    make_shapes = data.make_shapes
    sets = [(64, 16, 0, 3), (64, 16, 1, 3), (65, 16, 0, 3), (64, (16, 24), 0, 3), (64, 16, 0, 1)]
    first = [_shapes(n, size, seed, ch) for n, size, seed, ch in sets]
    _shapes(63, 16)  # under the size kept
    assert len(data_cache.list_entries()) == len(sets)
    drawn = []
    monkeypatch.setattr(data, "make_shapes", lambda *a: drawn.append(a) or make_shapes(*a))
    for (n, size, seed, ch), before in zip(sets, first):
        again = _shapes(n, size, seed, ch)
        _same(before, again)
        _same(again, make_shapes(n, size, ch, seed))  # the drawn set, not only the first run's
        assert again.warnings == []
    assert drawn == []
    blob = cache / f"{data_cache.entry_name(data_cache.shapes_key(64, (16, 16), 3, 0))}.bin"
    blob.write_bytes(b"damaged")
    third = _shapes(64, size=16)
    _same(first[0], third)
    assert len(drawn) == 1 and "damaged" in third.warnings[0] and "drawing the built-in set" in third.warnings[0]
    assert "built-in shapes, seed 0" in ok("cache", "info").output
    rows = json.loads(ok("cache", "info", "--json").output)["data"]["entries"]  # a machine reads fields, not prose
    assert all(r["source"] is None and r["builtin"]["dataset"] == "shapes" for r in rows), rows
    assert {r["builtin"]["seed"] for r in rows} == {seed for _, _, seed, _ in sets}
    # a sweep over seeds keeps the latest shapes sets within their own bound and pushes out no decoded set
    monkeypatch.setattr(data_cache, "SHAPES_MAX_ENTRIES", 3)
    monkeypatch.setattr(data_cache, "MAX_ENTRIES", 3)
    _load(_images(cache.parent / "imgs"))
    for seed in range(2, 8):
        _shapes(64, 16, seed)
    names = [e.name.split("-")[0] for e in data_cache.list_entries()]
    assert names.count("shapes") == 3 and names.count("data") == 1, names


def test_a_shapes_set_is_not_kept_with_the_cache_off_or_by_a_second_rank(cache, monkeypatch):
    monkeypatch.setattr(data, "SHAPES_CACHED_PIXELS", 1)
    monkeypatch.setenv("DDPM_DATA_CACHE", "off")
    _shapes(8, 16)
    monkeypatch.setenv("DDPM_DATA_CACHE", "on")
    monkeypatch.setenv("LOCAL_RANK", "1")
    _shapes(8, 16)
    assert data_cache.list_entries() == []
