"""`ddpm inspect`: the table and --json fields from the header alone, --sha256, run directories, no torch, errors."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli, ok, one_line_error
from ddpm_cli.engine.checkpoint import read_header
from ddpm_cli.engine.runs import latest_checkpoint, list_checkpoints



def test_json_fields(trained_conditional_run):
    path = latest_checkpoint(trained_conditional_run)
    info = json.loads(ok("inspect", path, "--json").stdout)
    header = read_header(path)
    assert info["path"] == str(path) and info["file_size"] == path.stat().st_size
    assert info["format"] == "ddpm-cli" and info["format_version"] == 1 and info["kind"] == "train"
    assert info["step"] == 20 and info["images_seen"] == 20 * 16
    assert info["ddpm_version"] and info["created"]
    assert info["has_ema"] is True
    model_numel = sum(int(np.prod(t["shape"])) for k, t in header.tensors.items() if k.startswith("model."))
    assert info["num_params"] == model_numel
    m = info["model"]
    assert (m["image_size"], m["base_channels"], m["channel_mults"], m["num_res_blocks"],
            m["attention_resolutions"], m["conditional"], m["num_classes"]) == (16, 16, [1, 2], 1, [8], True, 10)
    d = info["diffusion"]
    assert (d["schedule"], d["num_timesteps"], d["schedule_low"], d["schedule_high"]) == ("linear", 100, 1e-4, 0.02)
    assert len(info["classes"]) == 10
    assert info["tensors"] == {"count": len(header.tensors), "dtypes": {"F32": len(header.tensors)}}
    assert "sha256" not in info


def test_table_shows_every_field(trained_run):
    path = latest_checkpoint(trained_run)
    out = ok("inspect", path).stdout
    for label in ("format", "ddpm version", "created", "step", "images seen", "image size", "base channels",
                  "channel multipliers", "residual blocks", "attention", "classes", "parameters", "EMA weights",
                  "schedule", "network predicts", "tensors", "file size"):
        assert label in out, label
    meta = read_header(path).metadata
    assert "ddpm-cli v1" in out and f"{int(meta['num_params']):,}" in out and "unconditional" in out
    assert "linear, T = 100, low 0.0001 / high 0.02" in out and "16x16, 3 channel(s)" in out
    assert "the noise (eps)" in out
    assert f"{path.stat().st_size:,} bytes" in out and "sha256" not in out


def test_sha256(trained_run):
    path = latest_checkpoint(trained_run)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(ok("inspect", path, "--json", "--sha256").stdout)["sha256"] == want
    assert want in ok("inspect", path, "--sha256").stdout


def test_run_directory_lists_its_checkpoints(trained_run):
    found = list_checkpoints(trained_run)
    info = json.loads(ok("inspect", trained_run, "--json").stdout)
    assert [c["path"] for c in info["checkpoints"]] == [str(p) for p in found]
    assert [c["step"] for c in info["checkpoints"]] == [10, 20]
    assert [c["latest"] for c in info["checkpoints"]] == [False, True]
    assert info["latest"] == str(latest_checkpoint(trained_run))
    table = ok("inspect", trained_run).stdout
    assert all(p.name in table for p in found) and f"{found[-1].name}*" in table
    # its checkpoints/ folder (what tab completion gives) is the run: it said "holds no checkpoints"
    assert json.loads(ok("inspect", trained_run / "checkpoints", "--json").stdout) == info


def test_the_commands_it_suggests_can_be_pasted(trained_run, tmp_path):
    import shlex
    import shutil

    odd = tmp_path / "my runs [1]"  # a space and brackets: the suggested command quotes the path
    shutil.copytree(trained_run, odd)
    line = next(x for x in ok("inspect", odd).stdout.splitlines() if x.startswith("details of one:"))
    assert shlex.split(line.removeprefix("details of one:"))[-1] == str(latest_checkpoint(odd))


def test_inspect_never_imports_torch(trained_run):
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from ddpm_cli.cli.app import app\n"
            "for args in ([sys.argv[1]], [sys.argv[1], '--json', '--sha256'], [sys.argv[2]]):\n"
            "    r = CliRunner().invoke(app, ['inspect', *args])\n"
            "    assert r.exit_code == 0, r.output\n"
            "heavy = [m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules]\n"
            "assert 'torch' not in sys.modules, heavy\n"
            "print('ok', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code, str(latest_checkpoint(trained_run)), str(trained_run)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def _bad(tmp_path, kind, trained_run):
    p = tmp_path / f"{kind}.safetensors"
    if kind == "not-safetensors":
        p.write_bytes(b"\x00" * 3)
    elif kind == "bad-json":
        p.write_bytes((12).to_bytes(8, "little") + b"{not json!!}" + b"\x00" * 8)
    elif kind == "truncated":
        data = latest_checkpoint(trained_run).read_bytes()
        p.write_bytes(data[:-100])
    elif kind == "no-ddpm-metadata":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(4, np.float32)}, str(p))
    return p


@pytest.mark.parametrize("kind,expect", [("missing", "not found"), ("not-safetensors", "not a safetensors"),
                                         ("bad-json", "not JSON"), ("truncated", "truncated"),
                                         ("no-ddpm-metadata", "without ddpm's metadata")])
def test_bad_files_give_one_line(tmp_path, trained_run, kind, expect):
    for extra in ([], ["--json"]):
        assert expect in one_line_error(cli("inspect", _bad(tmp_path, kind, trained_run), *extra))


def test_a_runs_training_state_is_refused_naming_the_weights_beside_it(trained_run):
    """It was shown as a table saying the stored config is unreadable ("use another checkpoint"), exit 0."""
    from ddpm_cli.engine.runs import state_path

    state = state_path(latest_checkpoint(trained_run))
    for extra in ([], ["--json"]):
        line = one_line_error(cli("inspect", state, *extra))
        assert "training-state file" in line and latest_checkpoint(trained_run).name in line, line


def test_empty_run_directory(tmp_path):
    assert "holds no checkpoints" in one_line_error(cli("inspect", tmp_path))
