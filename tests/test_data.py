"""Data sources: the built-in shapes, CIFAR-10's offline error, folders and zips, and the batcher's order."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.config import DataConfig, validate_config
from ddpm_cli.engine.data import Batcher, load_dataset, load_folder, make_shapes
from ddpm_cli.errors import DataError


def test_shapes_are_deterministic_by_seed_at_any_size():
    a, b, c = make_shapes(30, 24, seed=1), make_shapes(30, 24, seed=1), make_shapes(30, 24, seed=2)
    assert a.images.shape == (30, 3, 24, 24) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.labels.tolist() == [i % 10 for i in range(30)] and len(a.classes) == 10
    gray = make_shapes(4, 16, channels=1)
    assert gray.images.shape == (4, 1, 16, 16)
    # classes really differ: mean images of two classes are far apart
    s = make_shapes(200, 16).images.float()
    assert (s[0::10].mean(0) - s[3::10].mean(0)).abs().mean() > 5


def test_cifar10_offline_and_absent_is_one_clear_error(tmp_path):
    cfg = validate_config({"data": {"dataset": "cifar10", "root": str(tmp_path), "download": False}})
    with pytest.raises(DataError, match="data.dataset=folder"):
        load_dataset(cfg.data, cfg.model)


def test_cifar10_that_cannot_download_does_not_ask_to_turn_download_on(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>") if download else \
            RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    cfg = validate_config({"data": {"dataset": "cifar10", "root": str(tmp_path / "c"), "download": True}})
    with pytest.raises(DataError) as e:
        load_dataset(cfg.data, cfg.model)
    assert "could not be downloaded" in str(e.value) and "set data.download=true" not in str(e.value)
    assert "check the network" in str(e.value) and not (tmp_path / "c").exists()


def _write_images(root, names, size=(20, 12)):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(len(name)).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def test_folder_tree_flat_folder_and_zip(tmp_path):
    tree = tmp_path / "tree"
    _write_images(tree, ["cat/a.png", "cat/b.png", "dog/c.jpg"])
    (tree / "dog" / "notes.txt").write_text("not an image")
    (tree / "dog" / "broken.png").write_bytes(b"not really a png")
    cfg = validate_config({"model": {"image_size": 16, "conditional": True, "num_classes": 2,
                                     "attention_resolutions": [], "channel_mults": [1, 2]},
                           "data": {"dataset": "folder", "root": str(tree)}})
    ds = load_dataset(cfg.data, cfg.model)
    assert ds.images.shape == (3, 3, 16, 16) and ds.classes == ["cat", "dog"]  # resized and center-cropped
    assert sorted(ds.labels.tolist()) == [0, 0, 1]
    assert any("without an image extension" in w for w in ds.warnings)
    assert any("not readable images" in w for w in ds.warnings)

    zpath = tmp_path / "tree.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(tree.rglob("*.*")):
            zf.write(p, "train/" + p.relative_to(tree).as_posix())
    zcfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(zpath)})})
    zds = load_dataset(zcfg.data, zcfg.model)
    assert zds.classes == ["cat", "dog"] and torch.equal(zds.images.sum(), ds.images.sum())

    flat = tmp_path / "flat"
    _write_images(flat, ["x.png", "y.png"])
    fcfg = validate_config({"model": {"image_size": 16, "attention_resolutions": [], "channel_mults": [1, 2]},
                            "data": {"dataset": "folder", "root": str(flat)}})
    assert load_dataset(fcfg.data, fcfg.model).classes == []
    ccfg = validate_config({"model": {"image_size": 16, "attention_resolutions": [], "channel_mults": [1, 2],
                                      "conditional": True}, "data": {"dataset": "folder", "root": str(flat)}})
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(ccfg.data, ccfg.model)


def test_batcher_covers_each_epoch_once_and_resumes_in_place():
    ds = make_shapes(40, 8)
    ds.images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 8, 8).contiguous()
    seen = []
    b = Batcher(ds, 8, seed=3, device=torch.device("cpu"), on_device=False, flip=False)
    for _ in range(5):
        x, _ = b.next()
        seen += ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    assert sorted(seen) == list(range(40))  # one epoch: every image exactly once
    state = b.state_dict()
    nxt = b.next()[0]
    b2 = Batcher(ds, 8, seed=3, device=torch.device("cpu"), on_device=False, flip=False)
    b2.load_state_dict(state)
    assert torch.equal(b2.next()[0], nxt)


def test_a_holdout_that_leaves_less_than_a_batch_names_the_holdout_and_how_many_to_hold_out():
    """The batcher, given the training part, said "train.batch_size 16 x 1 process(es) is larger than the dataset
    (4 images); lower the batch size" of a dataset of 64: it was the held-out images that left too few."""
    from ddpm_cli.engine.data import training_batches

    ds = make_shapes(64, 16)
    for holdout, world, most in ((60, 1, 48), (40, 2, 32)):
        cfg = validate_config({"train": {"batch_size": 16, "early_stopping": {"enabled": True, "holdout": holdout}}})
        with pytest.raises(DataError) as e:
            training_batches(cfg, ds, torch.device("cpu"), world=world)
        msg = str(e.value)
        assert f"train.early_stopping.holdout {holdout} leaves {64 - holdout} of the dataset's 64 images" in msg, msg
        assert f"train.batch_size 16 x {world} process(es)" in msg and f"hold out at most {most}" in msg, msg
    cfg = validate_config({"train": {"batch_size": 16, "early_stopping": {"enabled": True, "holdout": 48}}})
    batcher, val = training_batches(cfg, ds, torch.device("cpu"))  # exactly a batch left
    assert len(val) == 48 and batcher.next()[0].shape[0] == 16
    cfg = validate_config({"train": {"batch_size": 80, "early_stopping": {"enabled": True, "holdout": 8}}})
    with pytest.raises(DataError, match=r"; lower train.batch_size \(the dataset itself holds no more than a batch"):
        training_batches(cfg, ds, torch.device("cpu"))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_every_channel_count_decodes_to_that_many_channels_from_folders_and_cifar_tensors(tmp_path, channels):
    """model.in_channels 2 (gray + alpha) and 4 (RGBA) used to decode to one channel, and the first step crashed
    in the network's first convolution."""
    from ddpm_cli.engine.data import _fit_tensor

    folder = tmp_path / "imgs"
    folder.mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgba[:, :, :3], "RGB").save(folder / "rgb.png")
    ds = load_folder(DataConfig(dataset="folder", root=str(folder)), (8, 8), channels)
    assert ds.images.shape == (2, channels, 8, 8)
    rgb_img, rgba_img = ds.images[0], ds.images[1]  # sorted by name: rgb.png, rgba.png
    if channels in (2, 4):
        assert torch.equal(rgba_img[-1], torch.from_numpy(rgba[:, :, 3]))  # alpha kept
        assert bool((rgb_img[-1] == 255).all())  # none: an opaque one
    if channels == 4:
        assert torch.equal(rgba_img[:3], torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1))
    cifar = torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1)[None]  # as read_cifar10 gives them
    fitted = _fit_tensor(cifar, 8, channels)
    assert fitted.shape == (1, channels, 8, 8)
    assert torch.equal(fitted[0, :channels - (channels in (2, 4))], ds.images[0, :channels - (channels in (2, 4))])


@pytest.mark.parametrize("channels, mode", [(4, "RGBA"), (2, "LA"), (1, "L")])
def test_a_folder_with_alpha_trains_and_samples_images_with_alpha(tmp_path, channels, mode):
    from conftest import ok, tiny_overrides, write_yaml

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(folder / f"{i}.png")
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", model__in_channels=channels,
                                                         data__dataset="folder", data__root=str(folder),
                                                         train__steps=2, train__batch_size=4,
                                                         logging__sample_every=2, logging__checkpoint_every=2))
    ok("train", "--config", cfg)
    run = tmp_path / "runs" / "tiny"
    assert Image.open(run / "samples" / "step_00000002.png").mode == mode
    ok("sample", run, "-n", 2, "--steps", 2, "--out", tmp_path / "s")
    assert {Image.open(p).mode for p in (tmp_path / "s").glob("*.png")} == {mode}


def test_sixteen_bit_gray_and_exif_orientation_decode_as_they_look():
    """convert() clipped 16-bit gray to white (mid-gray 32768 -> 255), and a photo stored sideways with an EXIF
    orientation came out sideways: torchvision's ImageFolder loader does both."""
    import io

    from ddpm_cli.engine.decode import decode_image

    def png(im, fmt="PNG", **kw) -> bytes:
        out = io.BytesIO()
        im.save(out, fmt, **kw)
        return out.getvalue()

    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    for channels in (1, 3):
        arr, _ = decode_image(png(Image.fromarray(ramp)), None, channels)
        assert arr.shape == (channels, 8, 8) and np.array_equal(arr[0], (ramp >> 8).astype(np.uint8))
    # float and 32-bit images carry no range: [0, 1] floats and 0-255 integers (both were decoded black)
    values = np.linspace(0, 1, 64).reshape(8, 8)
    for pixels, mode in ((values.astype(np.float32), "F"), ((values * 255).round().astype(np.int32), "I")):
        arr, _ = decode_image(png(Image.fromarray(pixels, mode), "TIFF"), None, 1)
        assert np.array_equal(arr[0], (values * 255).round().astype(np.uint8)), mode
    left_white = np.zeros((4, 8, 3), np.uint8)
    left_white[:, :4] = 255  # a wide image, white on the left
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    arr, _ = decode_image(png(Image.fromarray(left_white), "JPEG", exif=exif, quality=95), None, 3)
    assert arr.shape == (3, 8, 4)  # tall, as a viewer shows it
    assert arr[:, :3].mean() > 200 and arr[:, 5:].mean() < 50  # white on top


def test_a_damaged_or_encrypted_zip_entry_is_skipped_with_a_warning(tmp_path):
    """zipfile raised out of the loader (Bad CRC-32; 'password required'): a traceback from train and eval."""
    import io

    def png(value) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(out, "PNG")
        return out.getvalue()

    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for i in range(4):
            zf.writestr(f"{i}.png", png(40 * i))
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    damaged, encrypted = infos[1], infos[2]
    raw[damaged.header_offset + 30 + len(damaged.filename) + 20] ^= 0xFF  # a byte of its data: the CRC fails
    raw[encrypted.header_offset + 6] |= 1  # the local header's "encrypted" flag
    for pos in range(len(raw) - 46):
        if raw[pos:pos + 4] == b"PK\x01\x02" and raw[pos + 46:pos + 46 + len(encrypted.filename)] == \
                encrypted.filename.encode():
            raw[pos + 8] |= 1  # and the central directory's
    archive.write_bytes(bytes(raw))
    ds = load_folder(DataConfig(dataset="folder", root=str(archive)), (8, 8), 3)
    assert [int(x) for x in ds.images[:, 0, 0, 0]] == [0, 120]  # 0.png and 3.png
    assert any("2 file(s) that are not readable" in w for w in ds.warnings), ds.warnings
    # the streamed path (decoding workers) reads through the same function: a clear error, no traceback
    from ddpm_cli.engine import decode

    with zipfile.ZipFile(archive) as zf:
        assert [decode.read_file(zf, i.filename) is None for i in infos] == [False, True, True, False]


def test_folders_linked_in_are_data_and_hidden_folders_are_not(tmp_path):
    """A class folder symlinked from elsewhere was skipped without a word (half the data gone), and a hidden
    folder (.thumbs) became a class."""
    import os

    _write_images(tmp_path / "elsewhere", ["d1.png", "d2.png"])
    root = tmp_path / "set"
    _write_images(root, ["cats/c1.png", "cats/c2.png", ".thumbs/t.png"])
    os.symlink(tmp_path / "elsewhere", root / "dogs")
    os.symlink(root, root / "cats" / "loop")  # a link back up ends, each real folder read once
    ds = load_folder(DataConfig(dataset="folder", root=str(root)), (8, 8), 3)
    assert ds.classes == ["cats", "dogs"] and sorted(ds.labels.tolist()) == [0, 0, 1, 1]


def test_a_large_jpeg_decodes_at_a_reduced_scale_to_nearly_the_same_pixels():
    """libjpeg's 1/2-1/8 scaling (PIL's draft) before the resize, for photos much larger than the model's size:
    within a level or two of decoding every pixel, for any target shape and EXIF turn (too coarse a scale would
    blur it past that)."""
    import io

    from ddpm_cli.engine.decode import decode_image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((1024, 768),
                                                                                      Image.Resampling.BICUBIC)
    for exif_turn in (None, 6):
        out = io.BytesIO()
        exif = Image.new("RGB", (1, 1)).getexif()
        if exif_turn:
            exif[0x0112] = exif_turn
        photo.save(out, "JPEG", quality=92, exif=exif)
        for size in ((64, 64), (96, 48), (48, 96)):  # PIL's (W, H)
            fast, resized = decode_image(out.getvalue(), size, 3)
            with Image.open(io.BytesIO(out.getvalue())) as im:  # every pixel decoded, then fitted
                from PIL import ImageOps

                full = np.asarray(ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), size,
                                               method=Image.Resampling.BICUBIC)).transpose(2, 0, 1)
            assert resized and fast.shape == full.shape == (3, size[1], size[0])
            assert np.abs(fast.astype(int) - full).mean() < 2.5, (exif_turn, size)
    # exactly 8 times the size: libjpeg alone makes it, and it counts as resized (eval's warning says how many)
    out = io.BytesIO()
    photo.resize((512, 512)).save(out, "JPEG", quality=92)
    assert decode_image(out.getvalue(), (64, 64), 3)[1] is True


def test_a_very_large_image_decodes_without_pil_s_warning(monkeypatch, recwarn):
    """PIL printed its two-line DecompressionBombWarning for each image over 89M pixels: the user's own data."""
    import io

    from PIL import Image

    from ddpm_cli.engine import decode

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40x40 image counts as one over the limit
    blob = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(blob, "PNG")
    out, resized = decode.decode_image(blob.getvalue(), (8, 8), 3)
    assert out.shape == (3, 8, 8) and resized and int(out.max()) == 9
    assert not [w for w in recwarn.list if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("as_zip", [False, True])
def test_a_large_set_decodes_in_processes_to_the_very_arrays_of_threads(tmp_path, monkeypatch, as_zip):
    """From data.PROCESS_DECODE_MIN files the in-memory path decodes in worker processes (threads of one process
    wait on its lock for small images): the same images, strides, labels and warnings as the threads give, an
    unreadable file skipped either way. (Where processes may start: the test after this one.)"""
    from ddpm_cli.engine import data

    root = tmp_path / "imgs"
    names = [f"{c}/{i:02d}.{'png' if i % 3 else 'jpg'}" for c in ("cat", "dog") for i in range(12)]
    _write_images(root, names)
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    src = root
    if as_zip:
        src = tmp_path / "imgs.zip"
        with zipfile.ZipFile(src, "w") as z:
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(root).as_posix())
    monkeypatch.setenv("DDPM_DATA_CACHE", "off")
    cfg = DataConfig(dataset="folder", root=str(src))
    monkeypatch.setattr(data, "PROCESS_DECODE_MIN", 10**9)
    threads = load_folder(cfg, (8, 10), 3)
    monkeypatch.setattr(data, "PROCESS_DECODE_MIN", 4)
    monkeypatch.setattr(data, "_processes_allowed", lambda: True)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # two workers anywhere
    calls = []
    real = data._decode_in_processes
    monkeypatch.setattr(data, "_decode_in_processes", lambda *a: calls.append(a[3]) or real(*a))
    procs = load_folder(cfg, (8, 10), 3)
    assert calls == [2]
    assert procs.images.shape == threads.images.shape == (24, 3, 8, 10)
    assert torch.equal(procs.images, threads.images) and procs.images.stride() == threads.images.stride()
    assert torch.equal(procs.labels, threads.labels) and procs.classes == threads.classes
    assert procs.warnings == threads.warnings and "broken.png" in procs.warnings[0]


def test_decoding_processes_start_only_where_the_main_module_is_safe_to_run_again(tmp_path):
    """A new process runs the main module's file first: `python -c` (no file) and `python -m ddpm_cli` may start
    decoding processes; a user's script (whose guard is unknown) may not, and decodes in threads."""
    import os
    import subprocess
    import sys

    probe = "from ddpm_cli.engine.data import _processes_allowed; print(_processes_allowed())"
    script = tmp_path / "user_script.py"
    script.write_text(probe + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {"-c": [sys.executable, "-c", probe], "script": [sys.executable, str(script)]}
    said = {k: subprocess.run(v, capture_output=True, text=True, env=env, timeout=120).stdout.strip()
            for k, v in runs.items()}
    assert said == {"-c": "True", "script": "False"}
