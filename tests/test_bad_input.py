"""Bad input through the CLI (issue 4): each case exits 1 or 2 with one clear line on stderr naming the problem,
never a traceback; and no pickle anywhere the project loads data."""
from __future__ import annotations

import ast
import builtins
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, tiny_overrides, write_yaml
from ddpm_cli.engine.runs import list_checkpoints, state_path

runner = CliRunner()


def invoke(*args):
    from ddpm_cli.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def assert_refused(r, *needles: str, codes=(1, 2), max_lines: int = 2) -> list[str]:
    """Exit 1 or 2, no exception escaped (so no traceback), and a short error on stderr naming the problem."""
    assert not (r.exception is not None and not isinstance(r.exception, SystemExit)), \
        f"an exception escaped: {type(r.exception).__name__}: {r.exception}"
    assert "Traceback" not in r.output
    assert r.exit_code in codes, (r.exit_code, r.output)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith("error:"), lines
    assert len(lines) <= max_lines, f"expected one clear line (plus one per config problem): {lines}"
    for line in lines:
        assert len(line) <= 400, f"an error line of {len(line)} characters is not one clear line: {line[:200]}..."
    for needle in needles:
        assert needle.lower() in r.stderr.lower(), f"{needle!r} not in {r.stderr!r}"
    return lines


def tiny(tmp_path: Path, **extra) -> dict:
    return tiny_overrides(tmp_path / "runs", **{"train__steps": 2, "logging__sample_every": 1000, **extra})


def train_with(tmp_path: Path, data, *sets: str):
    path = tmp_path / "cfg.yaml"
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        write_yaml(path, data)
    args = ["train", "--config", path]
    for s in sets:
        args += ["--set", s]
    return invoke(*args)


# ----------------------------------------------------------------------------------------------------------
# configs


def test_missing_config(tmp_path):
    assert_refused(invoke("train", "--config", tmp_path / "nope.yaml"), "not found", "nope.yaml")


def test_config_is_a_directory(tmp_path):
    assert_refused(invoke("train", "--config", tmp_path), "directory")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"], ids=["empty", "blank", "comment",
                                                                                   "doc-marker"])
def test_empty_config(tmp_path, text):
    assert_refused(train_with(tmp_path, text), "empty")


@pytest.mark.parametrize("blob", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"\xff" * 64,
                                  b"\xff\xfe\x00garbage"], ids=["all-bytes", "png", "bad-utf8"])
def test_binary_config(tmp_path, blob):
    assert_refused(train_with(tmp_path, blob), "not a text file")


@pytest.mark.parametrize("text", ["model: [unclosed\n", "a: b: c\n", "model:\n  image_size: 16\n image_size: 8\n",
                                  "\t- tab\n", "{{{{\n"])
def test_garbage_yaml(tmp_path, text):
    assert_refused(train_with(tmp_path, text), "not valid YAML")


@pytest.mark.parametrize("text", ["- model\n- train\n", "42\n", "just a sentence\n", "[1, 2, 3]\n", "true\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    assert_refused(train_with(tmp_path, text), "must be a mapping")


def test_deeply_nested_yaml_is_refused_cleanly(tmp_path):
    assert_refused(train_with(tmp_path, "model: " + "[" * 5000 + "]" * 5000 + "\n"))


@pytest.mark.parametrize("field,value,needle", [
    ("train__batch_size", "sixteen", "train.batch_size"),
    ("train__lr", [1, 2], "train.lr"),
    ("model__channel_mults", "1,2", "model.channel_mults"),
    ("model__conditional", "maybe", "model.conditional"),
    ("data__dataset", "imagenet", "data.dataset"),
    ("train__steps", 2.5, "train.steps"),
], ids=["str-for-int", "list-for-float", "str-for-tuple", "str-for-bool", "bad-choice", "float-for-int"])
def test_wrong_types(tmp_path, field, value, needle):
    assert_refused(train_with(tmp_path, tiny(tmp_path, **{field: value})), needle)


def test_unknown_keys_name_the_field_and_suggest(tmp_path):
    data = tiny(tmp_path)
    data["train"]["stpes"] = 5
    assert_refused(train_with(tmp_path, data), "train.stpes", "unknown field", "steps")
    data = tiny(tmp_path)
    data["optimiser"] = {"lr": 1}
    assert_refused(train_with(tmp_path, data), "optimiser")


def test_unknown_key_through_set(tmp_path):
    assert_refused(train_with(tmp_path, tiny(tmp_path), "train.batchsize=4"), "train.batchsize")


@pytest.mark.parametrize("sets,needle", [
    (["train.lr=-0.001"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=.inf"], "train.lr"),
    (["train.lr=.nan"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["model.channel_mults=[]"], "model.channel_mults"),
    (["model.attention_resolutions=[4]"], "4x4"),
    (["model.attention_resolutions=[32]"], "32x32"),
    (["train.steps=-5"], "train.steps"),
    (["model.dropout=1.5"], "model.dropout"),
    (["train.ema_decay=1"], "train.ema_decay"),
], ids=["negative-lr", "zero-lr", "inf-lr", "nan-lr", "batch-0", "empty-mults", "attn-4", "attn-32",
        "negative-steps", "dropout", "ema-decay-1"])
def test_out_of_range_values(tmp_path, sets, needle):
    assert_refused(train_with(tmp_path, tiny(tmp_path), *sets), needle)


def test_a_huge_wrong_value_still_gives_a_short_line(tmp_path):
    # e.g. a list pasted where a number belongs, or a YAML alias expanding to a big structure
    text = "train:\n  steps: [" + ", ".join(["12345"] * 3000) + "]\n"
    assert_refused(train_with(tmp_path, text), "train.steps")


def test_set_without_equals_is_a_clear_error(tmp_path):
    assert_refused(train_with(tmp_path, tiny(tmp_path), "train.steps"), "KEY=VALUE")


def test_set_into_a_value_is_a_clear_error(tmp_path):
    assert_refused(train_with(tmp_path, tiny(tmp_path), "train.steps.x=1"), "not a section")


def test_config_and_resume_together_is_a_usage_error(tmp_path, trained_run):
    r = invoke("train", "--config", write_yaml(tmp_path / "c.yaml", tiny(tmp_path)), "--resume", trained_run)
    assert_refused(r, "--resume", codes=(2,))


# ----------------------------------------------------------------------------------------------------------
# data folders (documented: files that are not images are skipped with a warning; a folder with no decodable
# image is refused)


def _folder_cfg(tmp_path: Path, root: Path, **extra) -> dict:
    return tiny(tmp_path, data__dataset="folder", data__root=str(root), train__batch_size=2, **extra)


def _png(path: Path, colour=(200, 30, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def test_missing_data_folder(tmp_path):
    assert_refused(train_with(tmp_path, _folder_cfg(tmp_path, tmp_path / "no-such-dir")), "does not exist",
                   "no-such-dir")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(train_with(tmp_path, _folder_cfg(tmp_path, tmp_path / "empty")), "no images")


def test_folder_of_non_image_files_is_refused(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(5):
        (d / f"note{i}.txt").write_text("hello")
    (d / "data.csv").write_text("a,b\n1,2\n")
    assert_refused(train_with(tmp_path, _folder_cfg(tmp_path, d)), "no images")


def test_folder_of_undecodable_images_is_refused(tmp_path):
    d = tmp_path / "fake"
    d.mkdir()
    for i in range(4):
        (d / f"img{i}.png").write_bytes(b"not really a png" * (i + 1))
    assert_refused(train_with(tmp_path, _folder_cfg(tmp_path, d)), "could be decoded")


def test_data_root_that_is_a_plain_file_is_refused(tmp_path):
    f = tmp_path / "images.tar"
    f.write_bytes(b"\0" * 1024)
    assert_refused(train_with(tmp_path, _folder_cfg(tmp_path, f)), "not a .zip")


def _cut_zips(d: Path) -> dict[str, Path]:
    """A .zip of images and an .npz of them, each cut in half (an interrupted copy: no central directory)."""
    import zipfile

    import numpy as np

    for i in range(8):
        _png(d / "images" / f"{i}.png", (30 * i, 20, 20))
    with zipfile.ZipFile(d / "whole.zip", "w") as z:
        for f in sorted((d / "images").iterdir()):
            z.write(f, f.name)
    np.savez(d / "whole.npz", images=np.zeros((8, 3, 20, 20), np.uint8))
    cut = {}
    for name in ("images.zip", "images.npz"):
        data = (d / f"whole{Path(name).suffix}").read_bytes()
        cut[name] = d / name
        cut[name].write_bytes(data[:len(data) // 2])
    return cut


def test_a_zip_cut_short_is_called_damaged_not_something_else(tmp_path):
    """A .zip of images cut short (a copy interrupted) said "is a file but not a .zip" as data.root, and "not a
    folder, .zip, .npz or .yaml" to eval: it is a .zip, and the fix is to copy it again."""
    from ddpm_cli.engine.evaluation.sources import open_images_or_stats
    from ddpm_cli.errors import DataError

    cut = _cut_zips(tmp_path / "d")
    ok = (tmp_path / "d" / "whole.zip", tmp_path / "d" / "whole.npz")
    for r in (train_with(tmp_path, _folder_cfg(tmp_path, cut["images.zip"])),  # as training data
              *(invoke("eval", ok[i], "--ref", cut[name]) for i, name in enumerate(cut))):  # as eval's reference
        line = assert_refused(r, "damaged", "cut short", "copy it again", codes=(1,), max_lines=1)[0]
        assert "not a .zip" not in line and "not a folder" not in line and "not an .npz" not in line, line
    for name, f in cut.items():  # as the samples eval scores (opened after Inception is loaded, so here directly)
        with pytest.raises(DataError, match=f"{f.name} is a damaged .*cut short.*copy it again"):
            open_images_or_stats(f, role="samples")


def test_non_images_among_images_are_skipped_with_a_warning(tmp_path):
    d = tmp_path / "mixed"
    for i in range(6):
        _png(d / f"img{i}.png", (40 * i, 100, 200 - 30 * i))
    (d / "README.txt").write_text("not an image")
    (d / "broken.png").write_bytes(b"\x89PNG broken")
    r = train_with(tmp_path, _folder_cfg(tmp_path, d))
    assert r.exit_code == 0, r.output
    assert "warning: skipped 1 file(s)" in r.output and "without an image extension" in r.output
    assert "not readable images" in r.output and "broken.png" in r.output
    assert "done: step 2" in r.output


def test_conditional_model_on_a_flat_folder_is_refused(tmp_path):
    d = tmp_path / "flat"
    for i in range(4):
        _png(d / f"img{i}.png")
    assert_refused(train_with(tmp_path, _folder_cfg(tmp_path, d, model__conditional=True)), "class subfolders")


# ----------------------------------------------------------------------------------------------------------
# checkpoints given to --resume


@pytest.fixture
def ckpt_copy(tmp_path, trained_run) -> Path:
    """A private copy of the trained run's latest checkpoint (weights + state) in its own run directory."""
    src = list_checkpoints(trained_run)[-1]
    dst_dir = tmp_path / "copy" / "checkpoints"
    dst_dir.mkdir(parents=True)
    shutil.copy(src, dst_dir / src.name)
    shutil.copy(state_path(src), dst_dir / state_path(src).name)
    return dst_dir / src.name


def _resume(target, *sets):
    args = ["train", "--resume", target]
    for s in sets:
        args += ["--set", s]
    return invoke(*args)


def test_resume_of_a_missing_path(tmp_path):
    assert_refused(_resume(tmp_path / "gone.safetensors"), "not found")


def test_resume_of_a_run_dir_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    assert_refused(_resume(tmp_path / "run"), "no checkpoints")


@pytest.mark.parametrize("keep", [0, 4, 7, 100, "half", "minus1"])
def test_resume_of_a_truncated_checkpoint(ckpt_copy, keep):
    data = ckpt_copy.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    ckpt_copy.write_bytes(data[:n])
    assert_refused(_resume(ckpt_copy), str(ckpt_copy.name))


def test_resume_with_a_truncated_state_file(ckpt_copy):
    sp = state_path(ckpt_copy)
    sp.write_bytes(sp.read_bytes()[:-10])
    assert_refused(_resume(ckpt_copy), "truncated")


def test_resume_with_a_state_file_missing(ckpt_copy):
    state_path(ckpt_copy).unlink()
    assert_refused(_resume(ckpt_copy), "no training state")


@pytest.mark.parametrize("content", [b"hello, this is text and not a checkpoint\n", b"\0" * 64,
                                     b"\xff" * 8 + b"{}", json.dumps({"a": 1}).encode()],
                         ids=["text", "zeros", "huge-length", "bare-json"])
def test_resume_of_a_file_that_is_not_safetensors(tmp_path, content):
    f = tmp_path / "checkpoints" / "ckpt-00000001.safetensors"
    f.parent.mkdir()
    f.write_bytes(content)
    assert_refused(_resume(f), "safetensors")


@pytest.mark.parametrize("name", ["config.yaml", "notes.txt", "ckpt-00000001.safetensors"])
@pytest.mark.parametrize("command", ["resume", "sample", "export", "inspect", "guide", "eval"])
def test_a_text_file_where_a_checkpoint_goes_says_it_is_text(tmp_path, trained_run, command, name):
    """A config or any text file read as a checkpoint said "header of 2308721996212760429 bytes in a 1980-byte
    file": its first 8 characters read as the header's length."""
    f = tmp_path / name
    if name == "config.yaml":
        f.write_text((trained_run / "config.yaml").read_text())
    else:
        f.write_text("# notes on the run: señor, 1000 steps was enough\n")  # UTF-8 beyond ASCII is text too
    out = tmp_path / "out"
    args = {"resume": ["train", "--resume", f], "sample": ["sample", f, "-n", "1", "--out", out],
            "export": ["export", f, "--out", out / "m.onnx"], "inspect": ["inspect", f],
            "guide": ["sample", trained_run, "--guide-model", f, "-n", "1", "--out", out],
            "eval": ["eval", f, "--ref", f, "-n", "1"]}[command]
    if command == "eval" and not name.endswith(".safetensors"):
        pytest.skip("eval scores images or a config's dataset: a text file is neither a .safetensors nor opens "
                    "as a checkpoint")
    line = assert_refused(invoke(*args), str(f.name), "text file", "not a safetensors checkpoint", codes=(1,),
                          max_lines=1)[0]
    assert "header of" not in line, line
    if name.endswith(".yaml"):
        assert "ddpm train -c" in line, line  # where a config goes
    assert not out.exists()


def _diffusers_folder(root: Path, pipeline: bool) -> Path:
    """What `huggingface-cli download google/ddpm-cifar10-32` leaves (a DDPMPipeline: model_index.json, unet/,
    scheduler/), or a UNet2DModel's folder alone; its weights a safetensors file of diffusers' (metadata format pt)."""
    from safetensors.torch import save_file

    unet = root / "unet" if pipeline else root
    unet.mkdir(parents=True)
    if pipeline:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    save_file({"conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(unet / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("layout", ["pipeline", "unet"])
@pytest.mark.parametrize("command", ["sample", "eval", "export", "inspect", "resume", "guide"])
def test_a_diffusers_model_where_a_checkpoint_goes_points_to_ddpm_import(tmp_path, trained_run, command, layout):
    """A diffusers model folder given to sample said it "holds no checkpoints" (eval: "no images found"), and its
    weights file that it is "not written by ddpm": `ddpm import` makes a checkpoint of it."""
    folder = _diffusers_folder(tmp_path / "ddpm-cifar10-32", pipeline=layout == "pipeline")
    weights = folder / ("unet" if layout == "pipeline" else "") / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "out"
    for given in (folder, weights):
        args = {"sample": ["sample", given, "-n", "1", "--out", out], "eval": ["eval", given, "--ref", given],
                "export": ["export", given, "--out", out / "m.onnx"], "inspect": ["inspect", given],
                "resume": ["train", "--resume", given],
                "guide": ["sample", trained_run, "--guide-model", given, "-n", "1", "--out", out]}[command]
        line = assert_refused(invoke(*args), "diffusers", f"ddpm import {folder}", codes=(1,), max_lines=1)[0]
        assert "holds no checkpoints" not in line and "no images" not in line, line
    assert not out.exists()


def test_resume_of_a_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(f), metadata={"source": "somebody else"})
    assert_refused(_resume(f), "not written by ddpm")


def test_resume_of_another_architecture(ckpt_copy):
    assert_refused(_resume(ckpt_copy, "model.base_channels=32"), "architecture")


def test_resume_cannot_change_what_the_network_predicts(ckpt_copy):
    """The weights, their averages and the stored guide learned to predict the noise; a resume that called their
    output v would mix the two in one checkpoint. Refused before anything is written."""
    before = sorted(p.name for p in ckpt_copy.parent.parent.rglob("*"))
    assert_refused(_resume(ckpt_copy, "diffusion.prediction=v"), "diffusion.prediction=eps -> v")
    assert sorted(p.name for p in ckpt_copy.parent.parent.rglob("*")) == before


@pytest.mark.parametrize("change", ["model.num_heads=4", "model.norm_eps=0.1", "diffusion.schedule=cosine",
                                    "diffusion.num_timesteps=500", "model.activation=relu"])
def test_resume_cannot_change_what_the_weights_compute_or_their_noise(ckpt_copy, change):
    """Each loaded into the same tensors, trained on, and the new checkpoint named a network or schedule its
    weights were never trained as (a helper's sweep)."""
    before = sorted(p.name for p in ckpt_copy.parent.parent.rglob("*"))
    assert_refused(_resume(ckpt_copy, change), f"{change.split('=')[0]}=")
    assert sorted(p.name for p in ckpt_copy.parent.parent.rglob("*")) == before


def test_resume_at_another_image_size_says_so(ckpt_copy):
    """The weights fit any size, so the run goes on at the new one (a fine-tune); it used to do so silently."""
    r = _resume(ckpt_copy, "model.image_size=[16,24]", "train.steps=21")
    assert r.exit_code == 0, r.output
    warned = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
    assert len(warned) == 1 and "16x16" in warned[0] and "16x24" in warned[0], r.stderr
    r = invoke("train", "--resume", ckpt_copy, "--set", "train.steps=22", "--overwrite")  # (replaces step 21's)
    assert r.exit_code == 0 and "16x24" not in r.stderr  # no size change, no word of one


def test_resume_of_a_checkpoint_copied_without_its_samples_folder_finishes(ckpt_copy):
    r = _resume(ckpt_copy, "train.steps=21")
    assert r.exit_code == 0, r.output


def _forge(path: Path, ckpt: Path, **meta_changes) -> Path:
    """A checkpoint with the real tensors and edited metadata (safetensors.torch.save_file)."""
    from safetensors.torch import load_file, save_file

    from ddpm_cli.engine.checkpoint import read_header

    meta = dict(read_header(ckpt).metadata)
    meta.update(meta_changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(ckpt)), str(path), metadata=meta)
    shutil.copy(state_path(ckpt), state_path(path))
    return path


def test_resume_of_a_newer_format_version(tmp_path, ckpt_copy):
    f = _forge(tmp_path / "new" / "checkpoints" / "ckpt-00000020.safetensors", ckpt_copy, format_version="99")
    assert_refused(_resume(f), "format 99", "upgrade")


BROKEN_CONFIGS = ["", "{not json", "[1, 2]", "null", "42", json.dumps({"model": {"image_size": 7}}),
                  json.dumps({"model": [1, 2]}), "[" * 5000 + "]" * 5000,
                  json.dumps({"diffusion": {"prediction": ["eps"]}})]  # (a dict key of the table's: unhashable)
BROKEN_IDS = ["empty", "not-json", "list", "null", "number", "invalid", "model-list", "deep", "prediction-list"]


@pytest.mark.parametrize("config", BROKEN_CONFIGS, ids=BROKEN_IDS)
def test_resume_of_a_checkpoint_with_a_broken_stored_config(tmp_path, ckpt_copy, config):
    f = _forge(tmp_path / "bad" / "checkpoints" / "ckpt-00000020.safetensors", ckpt_copy, config=config)
    assert_refused(_resume(f, "train.steps=25"), codes=(1,))
    assert_refused(_resume(f), codes=(1,))


@pytest.mark.parametrize("config", BROKEN_CONFIGS, ids=BROKEN_IDS)
def test_inspect_of_a_checkpoint_with_a_broken_stored_config(tmp_path, ckpt_copy, config):
    if "inspect" not in _commands():
        pytest.skip("`ddpm inspect` does not exist yet")
    f = _forge(tmp_path / "bad" / "checkpoints" / "ckpt-00000020.safetensors", ckpt_copy, config=config)
    for extra in ([], ["--json"]):
        r = invoke("inspect", f, *extra)
        # showing what can be read (exit 0) or refusing in one line (exit 1) are both fine; a crash is not
        if r.exit_code != 0 or r.exception is not None:
            assert_refused(r, codes=(1,))
        else:  # and what is shown says why the config's rows are empty ('-' everywhere, and no word why)
            shown = json.loads(r.stdout)["config_problem"] if extra else r.stdout
            assert "config" in shown and ("unusable" in shown or extra), shown


@pytest.mark.parametrize("config", BROKEN_CONFIGS, ids=BROKEN_IDS)
def test_sample_of_a_checkpoint_with_a_broken_stored_config(tmp_path, ckpt_copy, config):
    if "sample" not in _commands():
        pytest.skip("`ddpm sample` does not exist yet")
    f = _forge(tmp_path / "bad" / "checkpoints" / "ckpt-00000020.safetensors", ckpt_copy, config=config)
    r = invoke("sample", f, "-n", "1", "--out", tmp_path / "out", "--device", "cpu")
    assert_refused(r, codes=(1,))


@pytest.mark.parametrize("state", ["{}", "[]", '{"step": "x"}', '{"step": 3}'])
def test_resume_with_garbage_training_state_metadata(tmp_path, ckpt_copy, state):
    from safetensors.torch import load_file, save_file

    from ddpm_cli.engine.checkpoint import read_header

    sp = state_path(ckpt_copy)
    meta = dict(read_header(sp).metadata)
    meta["state"] = state
    save_file(load_file(str(sp)), str(sp), metadata=meta)
    assert_refused(_resume(ckpt_copy, "train.steps=25"), codes=(1,))


def test_resume_with_a_bad_set_value_blames_the_set_not_the_checkpoint(ckpt_copy):
    lines = assert_refused(_resume(ckpt_copy, "train.steps=-3"), "--set", "train.steps", codes=(1,))
    assert "not valid for this ddpm" not in lines[0]


def test_resume_of_a_training_state_file_instead_of_weights(ckpt_copy):
    assert_refused(_resume(state_path(ckpt_copy)), "cannot be resumed", codes=(1,))


# ----------------------------------------------------------------------------------------------------------
# no pickle


FORBIDDEN_NAMES = {"torch.load", "torch.serialization.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                   "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "dill.loads",
                   "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads",
                   "shelve.open"}
FORBIDDEN_ATTRS = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                   "recv_object_list", "send_object_list", "Unpickler"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
TEXT_PATTERNS = ("torch.load(", "import pickle", "pickle.load", "allow_pickle=True", "broadcast_object_list(")


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def test_the_package_never_unpickles():
    problems = []
    files = sorted((ROOT / "ddpm_cli").rglob("*.py"))
    assert files
    for path in files:
        rel = path.relative_to(ROOT)
        source = path.read_text()
        for node in ast.walk(ast.parse(source, str(path))):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if mod.split(".")[0] in FORBIDDEN_MODULES:
                    problems.append(f"{where}: from {mod} import ...")
                problems += [f"{where}: from {mod} import {a.name}" for a in node.names
                             if a.name in FORBIDDEN_ATTRS or f"{mod}.{a.name}" in FORBIDDEN_NAMES]
            elif isinstance(node, ast.Attribute):
                name = _dotted(node)
                if node.attr in FORBIDDEN_ATTRS or name in FORBIDDEN_NAMES:
                    problems.append(f"{where}: {name}")
            elif isinstance(node, ast.keyword):
                value = node.value.value if isinstance(node.value, ast.Constant) else "?"
                if node.arg == "allow_pickle" and value is not False:
                    problems.append(f"{where}: allow_pickle={value}")
                if node.arg == "weights_only" and value is not True:
                    problems.append(f"{where}: weights_only={value}")
        # the literal patterns as well, on code (comments stripped; a comment may say what is avoided)
        for i, line in enumerate(source.splitlines(), 1):
            code = line.split("#", 1)[0]
            problems += [f"{rel}:{i}: {pat}" for pat in TEXT_PATTERNS if pat in code]
    assert not problems, "pickle-based loading in the package:\n" + "\n".join(sorted(set(problems)))


class _Evil:
    """Unpickling this creates the marker file (pickle calls open(marker, 'w'))."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    d = tmp_path / "evil"
    d.mkdir(parents=True)
    files = []
    p = d / "model.pt"
    torch.save({"state_dict": _Evil(marker)}, p)  # zip container
    files.append(p)
    p = d / "legacy.pth"
    torch.save({"state_dict": _Evil(marker)}, p, _use_new_zipfile_serialization=False)
    files.append(p)
    for proto in (0, 2, 5):
        p = d / f"proto{proto}.safetensors"  # a lying extension
        p.write_bytes(pickle.dumps(_Evil(marker), protocol=proto))
        files.append(p)
    # a run directory whose "checkpoint" is a pickle
    run = tmp_path / "evil-run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(files[0], run / "ckpt-00000005.safetensors")
    files.append(run.parent)
    return files


def test_the_malicious_payload_is_armed(tmp_path):
    """Control: the payload really does create its marker when unpickled (so the refusals below mean something)."""
    marker = tmp_path / "armed"
    p = _evil_files(tmp_path, marker)[0]
    torch.load(p, weights_only=False)
    assert marker.exists()


def _commands() -> set[str]:
    import typer.main

    from ddpm_cli.cli.app import app

    return set(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", ["train", "sample", "inspect"])
def test_a_pickle_is_refused_without_being_unpickled(tmp_path, command):
    if command not in _commands():
        pytest.skip(f"`ddpm {command}` does not exist yet")
    marker = tmp_path / "PWNED"
    for f in _evil_files(tmp_path / command, marker):
        if command == "train":
            r = invoke("train", "--resume", f)
        elif command == "sample":
            r = invoke("sample", f, "-n", "1", "--out", tmp_path / "out", "--device", "cpu")
        else:
            r = invoke("inspect", f)
        assert not marker.exists(), f"`ddpm {command} {f}` unpickled the file"
        if command == "inspect" and f.is_dir():  # a run directory is listed, the pickle marked unreadable
            assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
            assert "pickle" in r.output.lower(), r.output
            continue
        assert_refused(r, codes=(1,))
        if f.is_file() and f.read_bytes()[:2] in (b"PK", b"\x80\x02", b"\x80\x05"):
            assert "pickle" in r.stderr.lower(), r.stderr


def test_a_pickle_state_file_is_refused(tmp_path, ckpt_copy):
    marker = tmp_path / "PWNED"
    torch.save(_Evil(marker), state_path(ckpt_copy))
    r = _resume(ckpt_copy)
    assert not marker.exists()
    assert_refused(r, "pickle", codes=(1,))


def _zips(d: Path) -> dict[str, Path]:
    """torch.save's zips (a pickle, data.pkl, beside the tensors), whole and cut short, and zips that are not."""
    import zipfile

    d.mkdir(parents=True)
    torch.save({"w": torch.zeros(4)}, d / "model.pt")
    (d / "cut.pt").write_bytes((d / "model.pt").read_bytes()[:200])  # no central directory: an interrupted copy
    with zipfile.ZipFile(d / "images.zip", "w") as z:  # a dataset zip, given where a checkpoint goes
        z.writestr("cat/0.png", b"\x89PNG\r\n\x1a\n")
        z.writestr("notes/data.pkl.txt", b"")
    zipfile.ZipFile(d / "empty.zip", "w").close()
    return {name: d / name for name in ("model.pt", "cut.pt", "images.zip", "empty.zip")}


def test_a_checkpoint_whose_header_length_opens_like_a_pickle_is_read(ckpt_copy):
    """The 8-byte header length of a safetensors file can open with 0x80 and a byte <= 5, as a pickle's PROTO does
    (a header of 384 bytes: 80 01 00 ..): such a checkpoint of ddpm's own was refused as a pickle."""
    import struct

    from ddpm_cli.engine.checkpoint import load_checkpoint, read_header
    from ddpm_cli.errors import CheckpointError

    data = ckpt_copy.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    padded = next(m for m in range(n, n + 2**16 + 1) if m % 256 == 0x80 and (m >> 8) % 256 <= 5)
    header = data[8:8 + n] + b" " * (padded - n)  # safetensors pads its JSON header with spaces itself
    ckpt_copy.write_bytes(struct.pack("<Q", padded) + header + data[8 + n:])
    assert ckpt_copy.read_bytes()[0] == 0x80 and ckpt_copy.read_bytes()[1] <= 5
    assert read_header(ckpt_copy).metadata["format"] == "ddpm-cli"
    assert load_checkpoint(ckpt_copy).step > 0
    for cut in (padded // 2, padded + 8 + 100):  # cut short in its header, in its tensors: truncated, no pickle
        ckpt_copy.write_bytes(struct.pack("<Q", padded) + (header + data[8 + n:])[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            read_header(ckpt_copy)


def _save_with_header_length(path: Path, tensors: dict, metadata: dict, length: int) -> Path:
    """safetensors.torch.save_file with a metadata entry padded so the JSON header is exactly `length` bytes (it pads
    the header with spaces to a multiple of 8 itself: `length` must be one)."""
    import struct

    from safetensors.torch import save_file

    def written(pad: int) -> int:
        save_file(tensors, str(path), metadata={**metadata, "padding": "x" * pad})
        return struct.unpack("<Q", path.read_bytes()[:8])[0]

    base = written(0)
    pad = next(p for p in range(length - base - 8, length - base + 1) if written(p) == length)
    assert written(pad) == length, (base, length)
    return path


@pytest.mark.parametrize("extra_64k", [0, 1])
def test_a_checkpoint_whose_header_length_opens_like_a_zip_is_read(ckpt_copy, extra_64k):
    """A header length of 19,280 + k * 65,536 bytes (0x4B50) opens the file with "PK", as a zip does: such a
    checkpoint of ddpm's own was refused as a zip archive."""
    from safetensors.torch import load_file

    from ddpm_cli.engine.checkpoint import load_checkpoint, read_header

    meta = read_header(ckpt_copy).metadata
    if extra_64k == 0:  # exactly 19,280: too small for a real run's config, so ddpm's format keys and one tensor
        tensors, meta = {"model.w": torch.zeros(4)}, {k: meta[k] for k in ("format", "format_version")}
    else:  # the trained checkpoint itself, its header grown to 19,280 + 65,536
        tensors = load_file(str(ckpt_copy))
    f = _save_with_header_length(ckpt_copy.with_name("pk.safetensors"), tensors, meta, 0x4B50 + extra_64k * 65536)
    assert f.read_bytes()[:2] == b"PK"
    assert read_header(f).metadata["format"] == "ddpm-cli"
    r = invoke("inspect", f)
    assert r.exit_code == 0 and "zip" not in r.output, r.output
    if extra_64k:
        assert load_checkpoint(f).step > 0


@pytest.mark.parametrize("command", ["inspect", "sample", "train"])
def test_a_torch_zip_is_called_a_pickle_and_any_other_zip_a_zip(tmp_path, command):
    for name, f in _zips(tmp_path / "in").items():
        args = {"inspect": ["inspect", f], "sample": ["sample", f, "-n", "1", "--out", tmp_path / "out"],
                "train": ["train", "--resume", f]}[command]
        line = assert_refused(invoke(*args), str(f), codes=(1,), max_lines=1)[0]
        if name.endswith(".pt"):
            assert "pickle" in line and "zip archive" not in line, line
        else:
            assert "zip archive" in line and "pickle" not in line and ".safetensors" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["sample", "inspect", "resume"])
def test_checkpoint_of_a_newer_ddpm_with_unknown_settings_says_upgrade(tmp_path, ckpt_copy, command):
    from ddpm_cli.engine.checkpoint import read_header

    cfg = json.loads(read_header(ckpt_copy).metadata["config"])
    cfg["train"]["some_future_setting"] = 1
    f = _forge(tmp_path / "new" / "checkpoints" / "ckpt-00000020.safetensors", ckpt_copy, config=json.dumps(cfg),
               ddpm_version="99.0.0")
    args = ["-n", "1", "--out", tmp_path / "out", "--device", "cpu"] if command == "sample" else []
    r = _resume(f, "train.steps=25") if command == "resume" else invoke(command, f, *args)
    if command == "inspect" and r.exit_code == 0:  # inspect may show what it can read: the writer's version
        assert "99.0.0" in r.stdout, r.output
        return
    assert_refused(r, "ddpm 99.0.0", "train.some_future_setting", "upgrade", codes=(1,))
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_an_older_ddpm_with_removed_settings_names_its_version(tmp_path, ckpt_copy):
    from ddpm_cli.engine.checkpoint import read_header

    cfg = json.loads(read_header(ckpt_copy).metadata["config"])
    cfg["model"]["some_removed_setting"] = 1
    f = _forge(tmp_path / "old" / "checkpoints" / "ckpt-00000020.safetensors", ckpt_copy, config=json.dumps(cfg),
               ddpm_version="0.0.1")
    r = invoke("sample", f, "-n", "1", "--out", tmp_path / "out", "--device", "cpu")
    lines = assert_refused(r, "ddpm 0.0.1", "model.some_removed_setting", "no longer has", codes=(1,))
    assert "upgrade" not in lines[0]


@pytest.mark.parametrize("setting", ["logging.run_name=newbranch", "logging.run_dir=other"])
def test_a_resume_cannot_move_the_run(ckpt_copy, setting):
    """The run went on in its own folder while its config.yaml and checkpoints said the new folder."""
    before = sorted(p.name for p in ckpt_copy.parent.iterdir())
    assert_refused(_resume(ckpt_copy, setting, "train.steps=21"), setting.split("=")[0], "copy", codes=(2,))
    assert sorted(p.name for p in ckpt_copy.parent.iterdir()) == before


# ----------------------------------------------------------------------------------------------------------
# outputs never replace inputs, --overwrite or not (cli/outputs.py)


def test_no_output_replaces_the_commands_input_even_with_overwrite(ckpt_copy, tmp_path):
    before = ckpt_copy.read_bytes()
    fast = ["--steps", "2", "--device", "cpu", "--overwrite"]
    for args in (["sample", ckpt_copy, "-n", 2, "--grid", ckpt_copy],
                 ["sample", tmp_path / "other.safetensors", "-n", 2, "--guide-model", ckpt_copy, "--grid", ckpt_copy]):
        if args[1].name == "other.safetensors":
            shutil.copy(ckpt_copy, args[1])
        assert_refused(invoke(*args, *fast), "input", "--", codes=(2,))
        assert ckpt_copy.read_bytes() == before
    assert_refused(invoke("export", ckpt_copy, "-o", ckpt_copy, "--overwrite"), "--out", "input", codes=(2,))
    assert ckpt_copy.read_bytes() == before
    # nor a training checkpoint or a file the run wrote, the sampled checkpoint's run or not
    run = ckpt_copy.parent.parent
    other = ckpt_copy.with_name("ckpt-00000005.safetensors")
    shutil.copy(ckpt_copy, other)
    shutil.copy(state_path(ckpt_copy), state_path(other))
    (run / "latest.json").write_text('{"weights": "checkpoints/%s"}' % ckpt_copy.name)
    for target in (other, state_path(other), run / "latest.json"):
        kept = target.read_bytes()
        assert_refused(invoke("export", ckpt_copy, "-o", target, "--overwrite"), "--out", codes=(2,))
        assert_refused(invoke("sample", ckpt_copy, "-n", 2, "--grid", target, *fast), "--grid", codes=(2,))
        assert target.read_bytes() == kept
    for mine in (run / "export.safetensors", ckpt_copy.with_name("slim.safetensors")):  # the user's: replaced
        assert invoke("export", ckpt_copy, "-o", mine).exit_code == 0                   # when asked
        assert invoke("export", ckpt_copy, "-o", mine, "--overwrite").exit_code == 0
    samples = tmp_path / "s.npz"
    samples.write_bytes(b"mine")
    assert_refused(invoke("eval", samples, "--ref", ckpt_copy, "--save-stats", samples, "--overwrite"),
                   "--save-stats", "input", codes=(2,))
    assert samples.read_bytes() == b"mine"
    folder = tmp_path / "dm"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    assert_refused(invoke("import", folder, "-o", folder / "diffusion_pytorch_model.safetensors", "--overwrite"),
                   "input", codes=(2,))
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"


def test_no_output_replaces_another_runs_own_files(ckpt_copy, tmp_path):
    """The run files were guarded only for the run of the command's input: `ddpm export RUN -o OTHER/metrics.jsonl
    --overwrite` (or sample's grid, ema's and import's outputs) replaced another run's files, and that run's next
    resume failed with a traceback. Whichever run an output lands in, its own files are refused."""
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    for name, text in (("config.yaml", "model: {}\n"), ("metrics.jsonl", '{"step": 1}\n'), ("latest.json", "{}"),
                       ("loss.png", "png")):
        (other / name).write_text(text)
    fast = ["--steps", "2", "--device", "cpu", "--overwrite"]
    for name in ("metrics.jsonl", "config.yaml", "latest.json"):
        target = other / name
        kept = target.read_bytes()
        assert_refused(invoke("export", ckpt_copy, "-o", target, "--overwrite"), "--out", "run", codes=(2,))
        assert_refused(invoke("sample", ckpt_copy, "-n", 2, "--grid", target, *fast), "--grid", "run", codes=(2,))
        assert target.read_bytes() == kept
    assert_refused(invoke("sample", ckpt_copy, "-n", 2, "--grid", other / "loss.png", *fast), "--grid", codes=(2,))
    assert invoke("sample", ckpt_copy, "-n", 2, "--grid", other / "mine.png", *fast).exit_code == 0  # the user's


def test_a_file_output_that_is_a_folder_is_refused_before_the_work(ckpt_copy, tmp_path):
    """--overwrite skipped the existence check, and the folder was found only after every image was sampled."""
    folder = tmp_path / "g.npz"
    folder.mkdir()
    for args in (["sample", ckpt_copy, "-n", 2, "--grid", folder], ["sample", ckpt_copy, "-n", 2, "--format", "npz",
                 "--out", folder], ["export", ckpt_copy, "-o", folder], ["eval", ckpt_copy, "--ref", ckpt_copy,
                 "--save-stats", folder]):
        r = invoke(*args, "--overwrite")
        assert_refused(r, "is a folder", codes=(2,))
        assert "sampled" not in r.stdout
    assert_refused(invoke("export", ckpt_copy, "-o", ckpt_copy / "slim.safetensors"),  # under a file
                   "is a file, not a folder", codes=(2,))


def test_an_out_named_as_an_image_file_is_refused_before_the_work(ckpt_copy, tmp_path):
    """`--out x.png` (one picture, the user meant) made a folder named x.png, with the npz or the PNG files
    inside; an existing folder of that name is still a folder."""
    for fmt in ([], ["--format", "npz"], ["--format", "png"]):
        for name in ("x.png", "x.JPG"):
            r = invoke("sample", ckpt_copy, "-n", 2, "--steps", 1, "--out", tmp_path / name, *fmt)
            assert_refused(r, f"--out {tmp_path / name} names an image file", "--grid", codes=(2,))
            assert "sampled" not in r.stdout and not (tmp_path / name).exists()
    (tmp_path / "old.png").mkdir()
    r = invoke("sample", ckpt_copy, "-n", 2, "--steps", 1, "--out", tmp_path / "old.png")
    assert r.exit_code == 0 and len(list((tmp_path / "old.png").glob("*.png"))) == 2, r.output
    r = invoke("sample", ckpt_copy, "-n", 2, "--steps", 1, "--out", f"{tmp_path / 'new.png'}/")  # a folder, said so
    assert r.exit_code == 0 and len(list((tmp_path / "new.png").glob("*.png"))) == 2, r.output
    r = invoke("sample", ckpt_copy, "-n", 2, "--steps", 1, "--out", tmp_path / "y.png", "--grid", tmp_path / "g.png")
    assert_refused(r, "--grid already writes one picture", codes=(2,))


def test_an_npz_larger_than_memory_is_refused_before_sampling(ckpt_copy, tmp_path, monkeypatch):
    """It was sampled in full, then the array of every image ended the process. Here the machine has 4 MB."""
    import os

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1024}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    r = invoke("sample", ckpt_copy, "-n", 10_000, "--format", "npz", "--out", tmp_path / "s.npz", "--steps", 1)
    assert_refused(r, "7.3 MB npz, held in memory", "--format png", codes=(2,))
    assert "sampled" not in r.stdout and not (tmp_path / "s.npz").exists()
    monkeypatch.undo()
    for command in ("sample", "eval"):  # more than anyone samples: a typo, whose file names alone filled the memory
        r = invoke(command, ckpt_copy, "-n", 10**12, "--ref", ckpt_copy) if command == "eval" else \
            invoke(command, ckpt_copy, "-n", 10**12, "--out", tmp_path / "many")
        assert_refused(r, "more than the 10,000,000 images", codes=(2,))
        assert not (tmp_path / "many").exists()


def test_the_grid_is_not_one_of_the_sampled_images(ckpt_copy, tmp_path):
    out = tmp_path / "imgs"
    r = invoke("sample", ckpt_copy, "-n", 2, "--steps", "2", "--device", "cpu", "--out", out, "--grid",
               out / "000001.png")
    assert_refused(r, "--grid", "one of the images", codes=(2,))
    assert not (out / "000001.png").exists()


def test_a_file_output_named_with_a_trailing_separator_is_refused_before_the_work(ckpt_copy, tmp_path, monkeypatch):
    """`--grid out/` for a folder not made yet wrote a FILE named out: Typer handed the option over as a Path, and
    Path("out/") is Path("out"). A name that ends in a separator (or /. or /..) names a folder."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    fast = ["--steps", "2", "--device", "cpu"]
    for args, bad, example in ((["sample", ckpt_copy, "-n", 2, *fast, "--grid"], "g/", "g/grid.png"),
                               (["sample", ckpt_copy, "-n", 2, *fast, "--overwrite", "--grid"], "a/g/.",
                                "a/g/./grid.png"),
                               (["sample", ckpt_copy, "-n", 2, *fast, "--out", "s", "--grid"], "s/g/", "s/g/grid.png"),
                               (["sample", ckpt_copy, "-n", 2, *fast, "--format", "npz", "--out"], "s.npz/",
                                "s.npz/samples.npz"),
                               (["export", ckpt_copy, "-o"], "e/", "e/model.safetensors"),
                               (["export", ckpt_copy, "--format", "pt2", "--overwrite", "-o"], "e/", "e/model.pt2")):
        r = invoke(*args, bad)
        option = "--out" if args[-1] == "-o" else args[-1]
        assert_refused(r, f"{option} {bad} names a folder", f"such as {example}", codes=(2,))
        assert "sampled" not in r.stdout and list(here.iterdir()) == [], (args, list(here.iterdir()))
    # a folder is still welcome where a folder is written: the PNGs, and an npz's folder (its samples.npz)
    for args in (["--out", "p/"], ["--format", "npz", "--out", "n/"]):
        r = invoke("sample", ckpt_copy, "-n", 1, *fast, *args)
        assert r.exit_code == 0, r.output
    assert (here / "p" / "000000.png").is_file() and (here / "n" / "samples.npz").is_file()


def test_wandb_that_cannot_start_is_one_line_and_leaves_no_run(tmp_path, monkeypatch):
    """`logging.wandb: online` with no wandb login: wandb.init's own error escaped as a traceback."""
    wandb = pytest.importorskip("wandb")

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    r = train_with(tmp_path, tiny(tmp_path), "logging.wandb=online")
    assert_refused(r, "wandb", "No API key", "logging.wandb=off", codes=(1,))
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_device_without_cuda_is_named_as_the_user_gave_it(tmp_path, monkeypatch, ckpt_copy):
    """`train.device: cuda` on a machine without CUDA said "use --device cpu", a flag `ddpm train` does not have: the
    message names train.device where the config gave it, and --device where the command line did."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for data, sets in ((tiny(tmp_path, train__device="cuda"), ()), (tiny(tmp_path), ("train.device=cuda:0",))):
        r = train_with(tmp_path, data, *sets)
        assert_refused(r, "train.device cuda", "CUDA is not available", "set train.device=cpu", codes=(1,))
        assert "--device" not in r.stderr and not (tmp_path / "runs" / "tiny").exists()
    r = invoke("sample", ckpt_copy, "-n", 1, "--device", "cuda", "--out", tmp_path / "out")
    assert_refused(r, "--device cuda", "CUDA is not available", "use --device cpu", codes=(1,))
    assert "train.device" not in r.stderr and not (tmp_path / "out").exists()


def test_a_cpu_allocation_that_fails_is_one_line(tmp_path, monkeypatch):
    """The CPU allocator's error ("can't allocate memory") is not "out of memory", and escaped as a traceback."""
    from ddpm_cli.engine import train as engine_train

    def too_big(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 360000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(engine_train.Trainer, "run", too_big)
    r = train_with(tmp_path, tiny(tmp_path))
    assert_refused(r, "ran out of memory", "batch size", codes=(1,))


def test_config_validate_takes_c_as_show_and_train_do(tmp_path):
    """`ddpm config validate -c FILE` was "No such option: -c", where `show -c` and `train -c` take it."""
    path = write_yaml(tmp_path / "c.yaml", tiny(tmp_path))
    for args in (["-c", path], ["--config", path], [path]):
        r = invoke("config", "validate", *args)
        assert r.exit_code == 0 and "valid" in r.stdout, (args, r.output)
    assert_refused(invoke("config", "validate"), "config", codes=(2,))
    assert_refused(invoke("config", "validate", path, "-c", path), "once", codes=(2,))


def test_a_symlink_loop_as_the_checkpoint_is_one_line(tmp_path):
    """Path.resolve() raised RuntimeError("Symlink loop from ...") through sample, export and ema: a traceback."""
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    for args in (["sample", tmp_path / "loopA", "-n", "1"], ["export", tmp_path / "loopA"]):
        r = invoke(*args)
        assert_refused(r, "loopA", codes=(1,))
        assert "symlink loop" in r.stderr.lower() or "symbolic links" in r.stderr.lower(), r.stderr  # 3.13: OSError


def test_an_empty_output_path_is_refused(ckpt_copy, tmp_path):
    """`--grid ""` said "--grid  names a folder": an empty path names nothing."""
    for args in (["sample", ckpt_copy, "-n", 1, "--grid", ""], ["export", ckpt_copy, "-o", " "]):
        assert_refused(invoke(*args), "is empty", codes=(2,))


def test_train_arguments_written_as_another_tool_would_say_what_ddpm_train_takes(trained_run):
    """A newcomer's first tries: the config as a positional argument, a config field as an option (as in
    diffusers' training script). Click said "Got unexpected extra argument(s)" and "No such option: --steps
    (Possible options: --gpus, --help, --set)", which does not say what to write."""
    from conftest import cli

    config = ROOT / "examples" / "quickstart.yaml"
    had_runs = (ROOT / "runs").exists()  # the quickstart's run folder, had any of these started training
    cases = [
        (["train", str(config)], f"ddpm train -c {config}"),
        (["train", "-c", str(config), "--steps", "5"], "--set train.steps=5"),
        (["train", "-c", str(config), "--batch-size=8"], "--set train.batch_size=8"),
        (["train", "-c", str(config), "--image-size", "64"], "--set model.image_size=64"),
        (["train", str(trained_run)], f"ddpm train --resume {trained_run}"),
        (["train", "-c", str(config), "--bogus"], "ddpm train -h"),
        (["train", "--confg", str(config)], "did you mean --config?"),  # click's own suggestion, kept
    ]
    for args, named in cases:
        r = cli(*args)
        said = r.stderr.strip()
        assert r.exit_code == 2 and named in said, (args, r.exit_code, r.stdout, said)
        assert len(said.splitlines()) == 1 and "Traceback" not in said, said
    assert (ROOT / "runs").exists() == had_runs


@pytest.mark.parametrize("args,named", [
    (["sample", "x.safetensors", "--bogus"], "ddpm sample has no option --bogus; see ddpm sample -h"),
    (["sample", "x.safetensors", "--step", "5"], "did you mean --steps?"),
    (["eval", "--nope"], "ddpm eval has no option --nope"),
    (["inspect"], "ddpm inspect needs its checkpoint argument: ddpm inspect CHECKPOINT"),
    (["sample", "x.safetensors", "-n", "abc"], "invalid value for '-n' / '--num'"),
    # (typer 0.2x words a choice's error as pydantic does: "Value error, 'foo' is not one of ...")
    (["sample", "x.safetensors", "--sampler", "foo"], "invalid value for '--sampler': 'foo' is not one of 'ddpm'"),
    (["config", "show", "--x"], "ddpm config show has no option --x"),
    (["cache", "--zz"], "ddpm cache has no option --zz"),
    (["config", "validate", "a.yaml", "b.yaml", "c.yaml"], "unexpected extra argument"),
])
def test_every_commands_usage_errors_are_one_line_and_exit_2(args, named):
    """Click's usage errors (an unknown option, a missing argument, a value of the wrong type) were click's usage text
    and a box around the message on every command but train: now one `error:` line, as every other error, naming a
    close option where there is one."""
    r = invoke(*args)
    lines = assert_refused(r, codes=(2,), max_lines=1)
    assert named in lines[0], lines
    assert "╭" not in r.output and "Usage:" not in r.output, r.output


def test_usage_errors_through_the_console_script_too():
    from conftest import run_cli

    r = run_cli("sample", "--bogus")  # (its program name is `python -m ddpm_cli` here)
    said = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(said) == 1 and said[0].startswith("error: "), r.stderr
    assert "sample has no option --bogus; see " in said[0] and said[0].endswith("sample -h"), said
    r = run_cli()
    assert r.returncode == 2 and "Usage: " in r.stdout and "Commands" in r.stdout  # no command: the help, as before
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("ddpm ")


def test_an_unbounded_kid_subsets_is_a_usage_error_before_any_work(tmp_path):
    """--kid-subsets 10**23 failed with numpy's "Maximum allowed dimension exceeded" (a traceback), and 10**12 with
    "out of memory; lower the batch size", both after Inception had run: a bound, said at once."""
    assert_refused(invoke("eval", tmp_path / "none.npz", "--ref", tmp_path / "none.npz", "--kid-subsets",
                          "99999999999999999999999"), "--kid-subsets", codes=(2,))


@pytest.mark.skipif(sys.platform != "linux", reason="/proc takes no files")
def test_a_png_folder_or_stats_file_that_cannot_be_written_is_refused_before_the_work(ckpt_copy, tmp_path):
    """`-o /proc/x` drew every image and then failed on the first PNG; `--save-stats /proc/x/s.npz` computed the
    reference's statistics first. Both are said before the work, as an unwritable npz or grid already was."""
    r = invoke("sample", ckpt_copy, "-n", 2, "--steps", 2, "--device", "cpu", "-o", "/proc/ddpm-nope")
    assert_refused(r, "cannot write", "/proc/ddpm-nope")
    assert "sampled" not in r.output
    folder = tmp_path / "imgs"
    folder.mkdir()
    r = invoke("eval", folder, "--ref", folder, "--save-stats", "/proc/ddpm-nope/s.npz")
    assert_refused(r, "cannot write", "--save-stats")
    assert "reference:" not in r.output
