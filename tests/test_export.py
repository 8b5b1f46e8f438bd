"""`ddpm export`: slim safetensors that sample like the original, ONNX matching PyTorch in onnxruntime,
torch.export programs, the check failing loudly, and bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import cli, ok, one_line_error
from ddpm_cli.engine import export as export_mod
from ddpm_cli.engine.checkpoint import load_model, read_header
from ddpm_cli.engine.runs import latest_checkpoint

FAST = ["--steps", "4"]



def sample_npz(ckpt, out, *extra) -> np.ndarray:
    ok("sample", ckpt, "-n", 6, "--seed", 3, "--format", "npz", "--out", out, *FAST, *extra)
    with np.load(out) as d:
        return d["arr_0"]


def test_slim_fp32_export_samples_identical_images(trained_conditional_run, tmp_path):
    src = latest_checkpoint(trained_conditional_run)
    r = ok("export", trained_conditional_run, "--out", tmp_path / "slim.safetensors")
    assert "relative error" in r.stdout
    slim = tmp_path / "slim.safetensors"
    h, h_src = read_header(slim), read_header(src)
    assert set(h.tensors) == {k for k in h_src.tensors if k.startswith("model.")}  # EMA stored as the model
    assert all(t["dtype"] == "F32" for t in h.tensors.values())
    assert slim.stat().st_size < 0.6 * src.stat().st_size
    meta = h.metadata
    assert meta["kind"] == "export" and meta["has_ema"] == "false" and meta["source_weights"] == "ema"
    assert meta["config"] == h_src.metadata["config"] and meta["classes"] == h_src.metadata["classes"]
    assert meta["step"] == h_src.metadata["step"] and meta["exported_from"] == src.name
    info = json.loads(ok("inspect", slim, "--json").stdout)
    assert info["kind"] == "export" and info["has_ema"] is False and info["num_params"] == int(meta["num_params"])
    assert np.array_equal(sample_npz(src, tmp_path / "a.npz"), sample_npz(slim, tmp_path / "b.npz"))


@pytest.mark.parametrize("dtype,st_dtype,mean_tol", [("fp16", "F16", 0.25), ("bf16", "BF16", 1.0)])
def test_half_precision_exports_sample_within_tolerance(trained_run, tmp_path, dtype, st_dtype, mean_tol):
    src = latest_checkpoint(trained_run)
    out = tmp_path / f"slim-{dtype}.safetensors"
    ok("export", src, "--dtype", dtype, "--out", out)
    h = read_header(out)
    assert {t["dtype"] for t in h.tensors.values()} == {st_dtype} and h.metadata["dtype"] != "float32"
    assert out.stat().st_size < 0.3 * src.stat().st_size
    a = sample_npz(src, tmp_path / "a.npz").astype(int)
    b = sample_npz(out, tmp_path / "b.npz").astype(int)
    diff = np.abs(a - b)
    assert diff.mean() < mean_tol and (diff > 16).mean() < 0.01, (diff.mean(), diff.max())


def test_raw_weights_export_matches_no_ema_sampling(trained_run, tmp_path):
    src = latest_checkpoint(trained_run)
    ok("export", src, "--no-ema", "--out", tmp_path / "raw.safetensors")
    assert read_header(tmp_path / "raw.safetensors").metadata["source_weights"] == "model"
    assert np.array_equal(sample_npz(src, tmp_path / "a.npz", "--no-ema"),
                          sample_npz(tmp_path / "raw.safetensors", tmp_path / "b.npz"))


def test_an_extra_ema_average_exports_and_samples_as_it_does_in_place(tmp_path):
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    run = train(tiny_config(tmp_path / "runs", train__steps=6, train__ema_decay=0.9, train__ema_extra=[0.3],
                            logging__checkpoint_every=6, logging__sample_every=100)).run_dir
    src = latest_checkpoint(run)
    r = ok("export", src, "--ema-decay", 0.3, "--out", tmp_path / "fast.safetensors")
    assert "ema 0.3 weights" in r.stdout
    ok("export", src, "--ema-decay", 0.3, "--format", "pt2")
    assert (src.parent / f"{src.name.removesuffix('.safetensors')}-ema0.3.pt2").exists()
    assert read_header(tmp_path / "fast.safetensors").metadata["source_weights"] == "ema 0.3"
    assert np.array_equal(sample_npz(src, tmp_path / "a.npz", "--ema-decay", "0.3"),
                          sample_npz(tmp_path / "fast.safetensors", tmp_path / "b.npz"))
    assert not np.array_equal(sample_npz(src, tmp_path / "c.npz"), sample_npz(tmp_path / "fast.safetensors",
                                                                              tmp_path / "d.npz"))
    bad = cli("export", src, "--ema-decay", 0.5, "--out", tmp_path / "x.safetensors")
    assert "holds no EMA weights with decay 0.5" in one_line_error(bad)


def test_a_slim_export_keeps_the_autoguidance_guide_and_samples_as_the_source(tmp_path):
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    run = train(tiny_config(tmp_path / "runs", train__guide_step=10)).run_dir
    src = latest_checkpoint(run)
    ok("export", src, "--out", tmp_path / "slim.safetensors")
    h = read_header(tmp_path / "slim.safetensors")
    assert h.metadata["guide_step"] == "10" and any(k.startswith("guide.") for k in h.tensors)
    default = sample_npz(src, tmp_path / "a.npz")  # autoguided by the stored guide, in both
    assert np.array_equal(default, sample_npz(tmp_path / "slim.safetensors", tmp_path / "b.npz"))
    assert not np.array_equal(default, sample_npz(src, tmp_path / "c.npz", "--guidance", "1"))


def test_default_output_name_and_overwrite(trained_run, tmp_path):
    import shutil

    src = tmp_path / "ckpt-00000020.safetensors"
    shutil.copy(latest_checkpoint(trained_run), src)
    ok("export", src, "--dtype", "fp16")
    out = tmp_path / "ckpt-00000020-export-fp16.safetensors"
    assert out.exists()
    before = out.read_bytes()
    assert "already exists" in one_line_error(cli("export", src, "--dtype", "fp16"))
    assert out.read_bytes() == before
    ok("export", src, "--dtype", "fp16", "--overwrite")
    before = out.read_bytes()
    ok("export", src, "--dtype", "fp16", "--no-ema")  # another choice of weights, another default name
    assert (tmp_path / "ckpt-00000020-raw-export-fp16.safetensors").exists() and out.read_bytes() == before


def _onnx_vs_torch(path, run, batch=5):
    import onnx
    import onnxruntime as ort

    model, _, cfg, _ = load_model(run, "cpu")
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch dimension
    inputs = export_mod.random_inputs(cfg, batch, seed=11)
    got = session.run(None, {n: v.numpy() for n, v in zip(names, inputs)})[0]
    with torch.no_grad():
        want = model(*inputs) if len(inputs) == 3 else model(*inputs, None)
    assert got.shape == tuple(want.shape) and got.dtype == np.float32
    return names, props, export_mod.relative_error(torch.from_numpy(got), want)


def test_onnx_export_matches_pytorch(trained_conditional_run, tmp_path):
    r = ok("export", trained_conditional_run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert "relative error" in r.stdout and "onnxruntime" in r.stdout
    names, props, err = _onnx_vs_torch(tmp_path / "m.onnx", trained_conditional_run)
    assert names == ["x_t", "t", "y"] and err < 1e-4  # against the unfolded model as trained
    # the tiny model's one upsampling runs as a single transposed convolution (2.25x fewer multiply-adds)
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    convt = [n for n in graph.node if n.op_type == "ConvTranspose"]
    stored = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    assert len(convt) == 1 and convt[0].input[1] in stored  # a stored 4x4 kernel, not ops that build it per call
    assert "frozen_kernel" not in load_model(trained_conditional_run, "cpu")[0].state_dict()
    assert props["kind"] == "export" and json.loads(props["config"])["model"]["conditional"] is True
    assert json.loads(props["inputs"]) == names


def test_onnx_export_of_an_unconditional_model(trained_run, tmp_path):
    ok("export", trained_run, "--format", "onnx", "--out", tmp_path / "u.onnx")
    names, props, err = _onnx_vs_torch(tmp_path / "u.onnx", trained_run, batch=1)
    assert names == ["x_t", "t"] and err < 1e-4 and _onnx_output(tmp_path / "u.onnx") == props["output"] == "eps"


def test_the_exports_of_a_v_prediction_model_say_it_predicts_v(tmp_path):
    """A consumer of the file reads what the network predicts from its output's name and metadata."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    run = train(tiny_config(tmp_path, train__steps=4, diffusion__prediction="v")).run_dir
    ok("export", run, "--format", "onnx", "--out", tmp_path / "v.onnx")
    _, props, err = _onnx_vs_torch(tmp_path / "v.onnx", run, batch=2)
    assert err < 1e-4 and _onnx_output(tmp_path / "v.onnx") == props["output"] == "v"
    ok("export", run, "--format", "pt2", "--out", tmp_path / "v.pt2")
    extra = {export_mod.PT2_METADATA: ""}
    torch.export.load(str(tmp_path / "v.pt2"), extra_files=extra)
    assert json.loads(extra[export_mod.PT2_METADATA])["output"] == "v"


def _onnx_output(path) -> str:
    import onnx

    (out,) = onnx.load(str(path)).graph.output
    return out.name


def test_a_failed_check_fails_loudly_and_keeps_no_file(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "relative_error", lambda got, want: 0.5)
    msg = one_line_error(cli("export", trained_run, "--format", "onnx", "--out", tmp_path / "bad.onnx"))
    assert "export check failed" in msg and "0.5" in msg
    assert not (tmp_path / "bad.onnx").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_a_file_that_appears_while_exporting_is_not_replaced_without_overwrite(trained_run, tmp_path, monkeypatch,
                                                                                fmt):
    """The output's name is checked at the start; an export takes seconds to minutes (the check in onnxruntime), and
    another process may write that name meanwhile: the placing must not replace it (it did: os.replace)."""
    dst = tmp_path / f"out.{fmt}"
    checked = export_mod.check_export

    def check_then_another_writes(*a, **k):
        checked(*a, **k)
        dst.write_bytes(b"theirs")

    monkeypatch.setattr(export_mod, "check_export", check_then_another_writes)
    msg = one_line_error(cli("export", trained_run, "--format", fmt, "--out", dst))
    assert str(dst) in msg and "--overwrite" in msg
    assert dst.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == [dst.name]  # no temporary left
    ok("export", trained_run, "--format", fmt, "--out", dst, "--overwrite")
    assert dst.read_bytes() != b"theirs"


def test_pt2_export_matches_pytorch(trained_conditional_run, tmp_path):
    ok("export", trained_conditional_run, "--format", "pt2", "--out", tmp_path / "m.pt2")
    model, _, cfg, _ = load_model(trained_conditional_run, "cpu")
    extra = {export_mod.PT2_METADATA: ""}
    exported = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    assert "conv_transpose" in str(exported.graph)  # the upsampling folded, as in the ONNX export
    meta = json.loads(extra[export_mod.PT2_METADATA])  # what the program is, as the ONNX file says it
    assert meta["output"] == "eps" and json.loads(meta["inputs"]) == ["x_t", "t", "y"]
    assert json.loads(meta["config"])["model"]["conditional"] is True and meta["kind"] == "export"
    import zipfile

    names = zipfile.ZipFile(tmp_path / "m.pt2").namelist()  # the archive's folder is named for the file
    assert names and not any("tmp" in n for n in names), names[:3]
    program = exported.module()
    inputs = export_mod.random_inputs(cfg, 4, seed=5)
    with torch.no_grad():
        assert export_mod.relative_error(program(*inputs), model(*inputs)) < 1e-5


@pytest.mark.parametrize("kind,expect", [("missing", "not found"), ("truncated", "truncated"),
                                         ("no-ddpm-metadata", "without ddpm's metadata")])
def test_bad_checkpoints(tmp_path, trained_run, kind, expect):
    p = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        data = latest_checkpoint(trained_run).read_bytes()
        p.write_bytes(data[: len(data) - 1000])
    elif kind == "no-ddpm-metadata":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(4, np.float32)}, str(p))
    assert expect in one_line_error(cli("export", p, "--out", tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


def test_a_file_that_is_no_checkpoint_is_refused_before_torch_is_imported(tmp_path):
    """The header is read first (engine.checkpoint.format, no torch): a wrong file is refused at once, not after
    the seconds that importing torch takes."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    (tmp_path / "notes.txt").write_text("not weights\n")
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from ddpm_cli.cli.app import app\n"
            "for path in sys.argv[1:]:\n"
            "    r = CliRunner().invoke(app, ['export', path, '--out', path + '.exported'])\n"
            "    assert r.exit_code == 1 and r.stderr.startswith('error: '), r.output\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(junk), str(tmp_path / "notes.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
    assert not list(tmp_path.glob("*.exported"))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_onnx_and_pt2_are_fp32_only(trained_run, tmp_path, fmt):
    """Options that cannot go together are a usage error (exit 2), as click's own are; they exited 1."""
    msg = one_line_error(cli("export", trained_run, "--format", fmt, "--dtype", "fp16", "--out", tmp_path / "m"),
                         code=(2,))
    assert "fp32 only" in msg and "drop --dtype" in msg and not (tmp_path / "m").exists()


def test_ema_decay_with_no_ema_is_a_usage_error_found_before_the_weights_are_read(trained_run, tmp_path,
                                                                                   monkeypatch):
    import ddpm_cli.engine.export as export

    monkeypatch.setattr(export, "load_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    msg = one_line_error(cli("export", trained_run, "--no-ema", "--ema-decay", 0.9, "--out", tmp_path / "x"),
                         code=(2,))
    assert "--ema-decay picks EMA weights; drop --no-ema" in msg and not (tmp_path / "x").exists()


def test_ema_requested_from_a_checkpoint_without_it(trained_run, tmp_path):
    slim = tmp_path / "slim.safetensors"
    ok("export", trained_run, "--out", slim)
    assert "no EMA weights" in one_line_error(cli("export", slim, "--ema", "--out", tmp_path / "x.safetensors"))


@pytest.fixture(scope="module")
def exported_programs(trained_run, tmp_path_factory):
    """The tool's own ONNX and pt2 exports of a tiny run: files ddpm writes but cannot load (issue 26)."""
    d = tmp_path_factory.mktemp("exports")
    for fmt in ("onnx", "pt2"):
        ok("export", trained_run, "--format", fmt, "--out", d / f"model.{fmt}")
    return d


@pytest.mark.parametrize("fmt,what", [("onnx", "an ONNX model"), ("pt2", "a torch.export program")])
@pytest.mark.parametrize("command", ["sample", "inspect", "export", "resume"])
def test_an_onnx_or_pt2_export_given_back_says_what_it_is_and_what_to_pass(exported_programs, tmp_path, fmt, what,
                                                                           command):
    f = exported_programs / f"model.{fmt}"
    args = {"sample": ["sample", f, "-n", 1, "--out", tmp_path / "out"], "inspect": ["inspect", f],
            "export": ["export", f, "--out", tmp_path / "o.safetensors"], "resume": ["train", "--resume", f]}[command]
    msg = one_line_error(cli(*args))
    assert what in msg and f"ddpm export --format {fmt}" in msg and ".safetensors" in msg, msg
    assert "pickle" not in msg and "truncated" not in msg, msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt,what", [("onnx", "an ONNX model"), ("pt2", "a torch.export program")])
def test_an_export_is_recognised_by_its_content_not_its_name(exported_programs, tmp_path, fmt, what):
    f = tmp_path / "renamed.safetensors"
    f.write_bytes((exported_programs / f"model.{fmt}").read_bytes())
    assert what in one_line_error(cli("inspect", f))


def test_fp16_of_a_barely_trained_checkpoint_says_why_it_fails(tmp_path):
    """Its outputs (the zero-initialised last layer hardly moved) are below fp16's range: the check failed with
    "relative error 1 ... please report this"."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    run = train(tiny_config(tmp_path / "runs", train__steps=1, train__warmup_steps=100)).run_dir
    error = one_line_error(cli("export", run, "--dtype", "fp16", "-o", tmp_path / "h.safetensors"))
    assert "barely trained" in error and "bf16" in error and "report" not in error
    assert not (tmp_path / "h.safetensors").exists()
    error = one_line_error(cli("export", run, "--format", "diffusers", "--dtype", "fp16", "-o", tmp_path / "d"))
    assert "barely trained" in error and "report" not in error and not (tmp_path / "d").exists()
    ok("export", run, "--dtype", "bf16", "-o", tmp_path / "b.safetensors")  # bf16 has fp32's range


def test_the_out_suffix_chooses_the_format_and_a_contrary_one_is_refused(trained_run, tmp_path):
    """`export -o m.onnx` without -f wrote safetensors bytes into m.onnx (onnxruntime: "Protobuf parsing
    failed"). Without -f the suffix chooses; with a -f that the suffix contradicts, one line, exit 2, nothing
    written and torch not needed."""
    ckpt = latest_checkpoint(trained_run)
    for fmt, suffix in (("safetensors", ".onnx"), ("onnx", ".safetensors"), ("pt2", ".onnx"), ("diffusers", ".pt2")):
        out = tmp_path / f"m{suffix}"
        r = cli("export", ckpt, "-f", fmt, "-o", out)
        line = one_line_error(r, code=(2,))
        assert fmt in line and suffix in line and not out.exists(), line
    ok("export", ckpt, "-o", tmp_path / "m.pt2")
    assert zipfile.is_zipfile(tmp_path / "m.pt2")  # a torch.export archive; safetensors would be no zip


def test_an_upper_case_pt2_suffix_exports_without_torch_s_warnings(trained_run, tmp_path):
    """`-o m.PT2` chose pt2 (the suffix is read case-insensitively) but torch.export.save and load, which want a name
    ending in lower-case .pt2, logged two warnings to the user's terminal about a temporary file of ours."""
    out = tmp_path / "m.PT2"
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", "export", str(latest_checkpoint(trained_run)), "-o",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == "" and "torch.export.load" in r.stdout, r.stderr
    names = zipfile.ZipFile(out).namelist()  # a pt2 archive, its folder named for the file
    assert names and all(n.startswith("m/") for n in names), names[:3]


@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "pt2"])
def test_a_file_name_that_is_not_utf8_exports_and_samples(trained_run, tmp_path, fmt):
    """safetensors, ONNX and torch.export take only UTF-8 paths: `-o` a name that is not (b"o\\xff.onnx", a Latin-1
    name on a UTF-8 system) failed with its temporary file called corrupt, or aborted the process (pt2); a source so
    named was a traceback (its name in the metadata); and `ddpm sample` of a checkpoint so named called it corrupt."""
    out = tmp_path / os.fsdecode(b"o\xff." + fmt.encode())
    try:
        out.touch()
        out.unlink()
    except OSError:
        pytest.skip("this file system takes no such name")
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ddpm_cli", *(os.fsencode(str(a)) for a in args)],
                              capture_output=True, timeout=300)

    src = tmp_path / os.fsdecode(b"c\xff.safetensors")  # the source so named too: its name goes in the metadata
    src.write_bytes(latest_checkpoint(trained_run).read_bytes())
    r = run("export", src, "-f", fmt, "-o", out)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, src.name])  # no temporary
    if fmt == "safetensors":
        r = run("sample", out, "-n", 2, *FAST, "--format", "npz", "-o", tmp_path / "a.npz")
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        with np.load(tmp_path / "a.npz") as d:
            assert d["arr_0"].shape[0] == 2
