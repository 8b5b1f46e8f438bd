"""What a new user meets first (issue 26): messages print what they were given, warnings go to stderr, --set
problems are blamed on the --set, a failed start leaves nothing behind, and a resumed run keeps one history."""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import cli, one_line_error, tiny_config, tiny_overrides, write_yaml


def test_an_error_prints_a_path_with_brackets_as_written(tmp_path):
    path = tmp_path / "runs[red]" / "model[v2].safetensors"
    line = one_line_error(cli("sample", path))
    assert str(path) in line, line  # rich markup would have eaten [red] and [v2]


def test_an_install_hint_keeps_its_extra_in_brackets(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the export extra were not installed
    line = one_line_error(cli("export", trained_run, "--format", "onnx", "-o", tmp_path / "m.onnx"))
    assert "pip install 'ddpm-cli[export]'" in line, line


def test_inspect_prints_class_names_with_brackets_as_written(tmp_path):
    from ddpm_cli.engine.train import train

    d = tmp_path / "data"
    from PIL import Image

    for cls in ("cat[1]", "[bold]dog"):
        (d / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (60 * i, 90, 30)).save(d / cls / f"{i}.png")
    cfg = tiny_config(tmp_path / "runs", data__dataset="folder", data__root=str(d), model__conditional=True,
                      model__num_classes=2, train__steps=1, train__batch_size=4, logging__sample_every=1000)
    res = train(cfg)
    r = cli("inspect", res.checkpoint)
    assert r.exit_code == 0, r.output
    assert "cat[1]" in r.stdout and "[bold]dog" in r.stdout, r.stdout


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file(tmp_path):
    cfg = write_yaml(tmp_path / "mine.yaml", tiny_overrides(tmp_path / "runs"))
    r = cli("train", "--config", cfg, "--set", "train.steps=abc")
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "error: --set: 1 problem(s)", lines  # not "mine.yaml: 1 problem(s)"
    assert "train.steps" in lines[1] and "(from --set train.steps=abc)" in lines[1], lines
    # a problem of the file itself is still the file's
    bad = write_yaml(tmp_path / "bad.yaml", {**tiny_overrides(tmp_path / "runs"), "train": {"steps": "x"}})
    r = cli("train", "--config", bad, "--set", "train.lr=abc")
    assert r.stderr.startswith(f"error: {bad} with --set: 2 problem(s)"), r.stderr


@pytest.mark.parametrize("bad", ["train.steps", "train.steps.x=1"])
def test_a_malformed_set_is_a_usage_error(tmp_path, bad):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs"))
    line = one_line_error(cli("train", "--config", cfg, "--set", bad), code=(2,))
    assert "--set" in line


def test_training_warnings_go_to_stderr(tmp_path):
    from PIL import Image

    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(d / f"img{i}.png")
    (d / "notes.txt").write_text("not an image")
    cfg = tiny_overrides(tmp_path / "runs", data__dataset="folder", data__root=str(d), train__steps=1,
                         train__batch_size=4, logging__sample_every=1000)
    r = cli("train", "--config", write_yaml(tmp_path / "c.yaml", cfg))
    assert r.exit_code == 0, r.output
    assert "warning: skipped 1 file(s)" in r.stderr and "warning:" not in r.stdout, (r.stdout, r.stderr)


def test_train_without_a_config_is_a_usage_error_that_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(cli("train"), code=(2,))
    assert "--config" in line and "examples/" in line
    assert list(tmp_path.iterdir()) == []  # no runs/, no data/


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    runs = tmp_path / "runs"
    cfg = tiny_overrides(runs, data__dataset="folder", data__root=str(tmp_path / "missing"))
    cfg["logging"]["run_name"] = None
    one_line_error(cli("train", "--config", write_yaml(tmp_path / "c.yaml", cfg)))
    assert not runs.exists()  # it made runs/ for the run, so it takes it away
    (runs / "older").mkdir(parents=True)
    one_line_error(cli("train", "--config", tmp_path / "c.yaml"))
    assert [p.name for p in runs.iterdir()] == ["older"]  # what was there stays; no new empty run folder


def test_a_failed_cifar_download_leaves_no_data_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            if not download:
                raise RuntimeError("Dataset not found or corrupted.")  # as torchvision says
            os.makedirs(root, exist_ok=True)  # as torchvision does before it downloads
            open(os.path.join(root, "cifar-10-python.tar.gz"), "wb").close()
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    cfg = tiny_overrides(tmp_path / "runs", data__dataset="cifar10", data__root=str(tmp_path / "data" / "cifar10"),
                         data__download=True)
    line = one_line_error(cli("train", "--config", write_yaml(tmp_path / "c.yaml", cfg)))
    assert "could not be downloaded" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no data/, no runs/


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """kill -9 between checkpoints: the steps after the last checkpoint were logged, and are trained (and
    logged) again on resume; metrics.jsonl must read as one run, not step 8 followed by step 6."""
    from ddpm_cli.engine.train import train

    first = train(tiny_config(tmp_path, train__steps=8, logging__log_every=1, logging__checkpoint_every=5))
    run, ckpts = first.run_dir, first.run_dir / "checkpoints"
    for f in ckpts.glob("ckpt-00000008*"):  # as if killed at step 8, before its checkpoint
        f.unlink()
    (run / "latest.json").unlink()
    (run / "metrics.jsonl").open("a").write('{"step": 9, "lo')  # and a line cut by the kill
    train(tiny_config(tmp_path, train__steps=10, logging__log_every=1, logging__checkpoint_every=5),
          resume=ckpts / "ckpt-00000005.safetensors")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11)), steps
