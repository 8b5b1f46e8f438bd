"""Non-square images (model.image_size [height, width]): the config, the data, the network, and a run through
`ddpm train`, `ddpm sample`, `ddpm inspect` and `ddpm export`. CPU, tiny models."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, ok, tiny_overrides, write_yaml
from ddpm_cli.config import DataConfig, validate_config
from ddpm_cli.engine.checkpoint import load_checkpoint, read_header
from ddpm_cli.engine.data import _fit_tensor, load_folder, make_shapes
from ddpm_cli.engine.runs import latest_checkpoint
from ddpm_cli.errors import ConfigError
from ddpm_cli.nn.unet import UNet

WIDE = [16, 24]  # height, width


# ----------------------------------------------------------------------------------------------------------
# the config


def test_image_size_is_a_side_or_height_and_width_and_old_ints_stay_ints():
    m = validate_config({"model": {"image_size": WIDE, "attention_resolutions": [8]}}).model
    assert m.image_size == (16, 24) and m.hw == (16, 24) and m.image_shape() == (3, 16, 24)
    assert m.levels() == [(16, 24), (8, 12), (4, 6), (2, 3)] and m.resolutions() == [16, 8, 4, 2]
    assert m.model_dump(mode="json")["image_size"] == [16, 24]  # as stored in checkpoints and config.yaml
    square = validate_config({"model": {"image_size": 32}}).model  # what every checkpoint so far stores
    assert square.image_size == 32 and square.hw == (32, 32) and square.model_dump(mode="json")["image_size"] == 32
    assert validate_config({"model": {"image_size": [32, 32]}}).model.image_size == 32  # a square pair: one side


def test_sizes_the_network_cannot_halve_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError) as e:  # 3 halvings: both sides must be multiples of 8, and 20 is not
        validate_config({"model": {"image_size": [16, 20]}})
    assert e.value.problems == ["model.image_size: 16x20 cannot be halved 3 times (one per channel_mults level "
                                "after the first): both sides must be multiples of 8, or the model needs fewer "
                                "levels"]
    with pytest.raises(ConfigError) as e:
        validate_config({"model": {"image_size": [20, 16]}})
    assert "model.image_size: 20x16 cannot be halved 3 times" in e.value.problems[0]
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs"))  # two levels: one halving
    r = cli("train", "--config", cfg, "--set", "model.image_size=[16, 25]")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert "model.image_size: 16x25 cannot be halved 1 times" in r.stderr and "both sides must be multiples of 2" in r.stderr
    for bad, shown in (("[16, 24, 8]", "[16, 24, 8]"), ("[4, 16]", "[4, 16]"), ("16x24", "'16x24'")):
        r = cli("train", "--config", cfg, "--set", f"model.image_size={bad}")
        problems = r.stderr.strip().splitlines()[1:]
        assert r.exit_code == 1 and len(problems) == 1, r.stderr
        assert "model.image_size: must be one side in pixels or [height, width], each 8 to 1024" in problems[0]
        assert f"(got {shown})" in problems[0]


def test_attention_is_named_by_a_level_s_shorter_side():
    with pytest.raises(ConfigError) as e:
        validate_config({"model": {"image_size": WIDE, "attention_resolutions": [12]}})
    assert e.value.problems == ["model.attention_resolutions: attention at 12 (a level's shorter side) but the model's levels are 16x24, "
                                "8x12, 4x6, 2x3; pick from 16, 8, 4, 2"]
    tall = UNet(image_size=(24, 16), base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), norm_groups=4)
    assert len(tall.down[2]) == 2 and len(tall.down[0]) == 1  # the 12x8 level's block has attention, 24x16's not


# ----------------------------------------------------------------------------------------------------------
# the data and the network


def test_shapes_are_drawn_at_height_and_width_and_square_ones_are_unchanged():
    wide = make_shapes(20, (16, 24), seed=3)
    assert wide.images.shape == (20, 3, 16, 24) and wide.images.dtype == torch.uint8
    assert torch.equal(make_shapes(20, (16, 16), seed=3).images, make_shapes(20, 16, seed=3).images)
    circle = wide.images[0].float().std(0)  # class 0: a circle, which stays round (its extent is alike both ways)
    rows, cols = (circle > circle.mean()).nonzero().unbind(1)
    assert abs(int(rows.max() - rows.min()) - int(cols.max() - cols.min())) <= 2


def test_cifar_sized_tensors_are_center_cropped_to_the_shape_then_resized():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[:, :, :5] = 255  # a band at the top that a crop to 2:3 (32 x 21 rows) cuts away
    images[:, :, -5:] = 255
    out = _fit_tensor(images, (16, 24), 3)
    assert out.shape == (2, 3, 16, 24) and int(out.max()) < 60  # only the blurred edge of a band is left
    assert torch.equal(_fit_tensor(images, 32, 3), images)  # the size it has: untouched
    assert _fit_tensor(images, (32, 16), 1).shape == (2, 1, 32, 16)


def test_folder_and_zip_images_of_any_shape_are_fitted_to_height_and_width(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    blobs = {}
    for i, (w, h) in enumerate([(30, 20), (20, 30), (24, 16), (64, 64)]):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(buf, "PNG")
        blobs[f"{i}.png"] = buf.getvalue()
        (folder / f"{i}.png").write_bytes(buf.getvalue())
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for name, blob in blobs.items():
            zf.writestr(name, blob)
    for root in (folder, tmp_path / "imgs.zip"):
        ds = load_folder(DataConfig(dataset="folder", root=str(root)), (16, 24), 3)
        assert ds.images.shape == (4, 3, 16, 24)
        assert [int(ds.images[i].float().mean().round()) for i in range(4)] == [0, 40, 80, 120]


def test_the_unet_takes_height_and_width_and_trains_with_checkpointing():
    from ddpm_cli.nn.unet import activation_checkpointing

    model = activation_checkpointing(UNet(image_size=(16, 24), base_channels=8, channel_mults=(1, 2, 2),
                                          num_res_blocks=1, attention_resolutions=(8,), norm_groups=4)).train()
    x = torch.randn(2, 3, 16, 24)
    out = model(x, torch.tensor([1, 50]))
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# a run through the CLI


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A 16x24 run trained with `ddpm train` (micro-batches and activation checkpointing on), then resumed."""
    tmp = tmp_path_factory.mktemp("wide")
    cfg = write_yaml(tmp / "wide.yaml", tiny_overrides(tmp / "runs", model__image_size=WIDE, train__steps=4,
                                                       train__grad_accum=2, model__checkpointing=True,
                                                       logging__sample_every=4, logging__checkpoint_every=4))
    r = ok("train", "--config", cfg)
    assert "done: step 4" in r.stdout
    run = tmp / "runs" / "tiny"
    ok("train", "--resume", run, "--set", "train.steps=6")
    return run


def test_a_non_square_run_trains_resumes_and_samples_images_of_its_size(wide_run, tmp_path):
    ck = latest_checkpoint(wide_run)
    assert ck.name == "ckpt-00000006.safetensors"
    assert load_checkpoint(ck).config.model.image_size == (16, 24)
    from ddpm_cli.engine.monitor import grid_plan

    n, _, per_row, _ = grid_plan(load_checkpoint(ck).config)  # the training grid: per_row images of 24x16 a row
    rows = -(-n // per_row)
    assert Image.open(wide_run / "samples" / "step_00000006.png").size == (per_row * 26 + 2, rows * 18 + 2)
    r = ok("sample", wide_run, "-n", 5, "--steps", 3, "--out", tmp_path / "s", "--grid", tmp_path / "grid.png")
    pngs = sorted((tmp_path / "s").glob("*.png"))
    assert len(pngs) == 5 and {Image.open(p).size for p in pngs} == {(24, 16)}  # PIL: (width, height)
    assert Image.open(tmp_path / "grid.png").size == (3 * 26 + 2, 2 * 18 + 2)  # 3 x 2, 2 px padding
    assert "5 images" in r.stdout
    ok("sample", wide_run, "-n", 2, "--steps", 3, "--format", "npz", "--out", tmp_path / "s.npz")
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 24, 3)  # (N, H, W, C)


def test_inspect_shows_height_x_width(wide_run):
    ck = latest_checkpoint(wide_run)
    table = ok("inspect", ck).stdout
    assert "16x24, 3 channel(s)" in table and "8x12 (1 head(s))" in table
    assert json.loads(ok("inspect", ck, "--json").stdout)["model"]["image_size"] == [16, 24]
    assert json.loads(read_header(ck).metadata["config"])["model"]["image_size"] == [16, 24]


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "safetensors"])
def test_exports_take_an_example_input_of_height_and_width(wide_run, tmp_path, fmt):
    ck = latest_checkpoint(wide_run)
    suffix = {"onnx": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors"}[fmt]
    r = ok("export", ck, "--format", fmt, "--out", tmp_path / f"m{suffix}")
    assert "check: relative error" in r.stdout
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
        x = np.random.default_rng(0).standard_normal((2, 3, 16, 24)).astype(np.float32)
        out = session.run(None, {"x_t": x, "t": np.array([3, 40], dtype=np.int64)})[0]
        assert out.shape == (2, 3, 16, 24)
