"""Data sources: the built-in shapes, CIFAR-10's offline error, folders and zips, and the batcher's order."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.config import validate_config
from ddpm_cli.engine.data import Batcher, load_dataset, make_shapes
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
