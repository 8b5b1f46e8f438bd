"""`ddpm sample`: files, shapes and dtypes, reproducibility, class planning, grids, samplers, errors."""
from __future__ import annotations

import concurrent.futures
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import cli, ok, one_line_error, perturbed_unet, run_cli, run_main_probing_teardown
from ddpm_cli.engine.runs import latest_checkpoint
from ddpm_cli.engine.sampling import grid_layout, plan_labels
from ddpm_cli.errors import DdpmError, UsageError

FAST = ["--steps", "3"]  # DDIM with 3 steps: a few hundred ms for the tiny models



def npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_png_files_have_the_right_count_names_shape_and_dtype(trained_run, tmp_path):
    out = tmp_path / "imgs"  # created if missing
    r = ok("sample", trained_run, "-n", 5, "--batch-size", 2, "--out", out, *FAST)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)]
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("5 images in ") and "images/s" in summary and str(out) in summary


def test_npz_holds_uint8_images_and_the_per_class_labels(trained_conditional_run, tmp_path):
    ok("sample", trained_conditional_run, "-n", 20, "--per-class", "--format", "npz", "--out", tmp_path / "s.npz",
       "--batch-size", 8, *FAST)
    d = npz(tmp_path / "s.npz")
    assert d["arr_0"].shape == (20, 16, 16, 3) and d["arr_0"].dtype == np.uint8
    assert d["labels"].tolist() == [k for k in range(10) for _ in range(2)]
    assert d["arr_0"].std() > 0  # real images, not a blank array


@pytest.fixture(scope="module")
def run_with_two_emas(tmp_path_factory):
    from ddpm_cli.engine.train import train

    from conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("emas"), train__steps=8, train__ema_decay=0.9,
                      train__ema_extra=[0.3], logging__checkpoint_every=8, logging__sample_every=100)
    return train(cfg).run_dir


def test_ema_decay_picks_the_extra_average_and_refuses_one_it_lacks(run_with_two_emas, tmp_path):
    from ddpm_cli.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(latest_checkpoint(run_with_two_emas))
    key = "down.0.0.conv1.weight"
    raw, slow, fast = ck.model_state[key], ck.ema_state[key], ck.extra_ema[0.3][key]
    assert (fast - raw).norm() < (slow - raw).norm()  # decay 0.3 follows the weights more closely than 0.9

    def draw(name, *extra):
        ok("sample", run_with_two_emas, "-n", 2, "--format", "npz", "--out", tmp_path / name, *FAST, *extra)
        return np.load(tmp_path / name)["arr_0"]

    default, main, other = draw("d.npz"), draw("m.npz", "--ema-decay", 0.9), draw("o.npz", "--ema-decay", 0.3)
    assert np.array_equal(default, main) and not np.array_equal(default, other)
    r = cli("sample", run_with_two_emas, "-n", 2, "--out", tmp_path / "x", "--ema-decay", 0.7)
    assert r.exit_code == 1
    assert one_line_error(r).endswith("holds no EMA weights with decay 0.7; it holds 0.9, 0.3 (train.ema_extra "
                                      "keeps more)")
    shown = cli("inspect", latest_checkpoint(run_with_two_emas))
    assert shown.exit_code == 0 and "0.9, 0.3" in shown.output


def test_sampling_reads_only_the_weights_it_uses(tmp_path, monkeypatch):
    """A checkpoint holds the raw weights, every average and the guide; `ddpm sample` reads the average it draws
    with and the guide it is guided by, nothing else (the file read whole was the checkpoint phase's time, and
    twice its size in memory)."""
    from ddpm_cli.engine.checkpoint import tensors
    from ddpm_cli.engine.train import train

    from conftest import tiny_config

    run = train(tiny_config(tmp_path / "runs", train__steps=8, train__ema_decay=0.9, train__ema_extra=[0.3],
                            train__guide_step=4, logging__checkpoint_every=8, logging__sample_every=100)).run_dir
    read, original = [], tensors.read_tensors
    monkeypatch.setattr(tensors, "read_tensors", lambda path, prefix=None: read.append(prefix) or original(path, prefix))

    def prefixes(*extra):
        read.clear()
        ok("sample", run, "-n", 2, "--format", "npz", "--out", tmp_path / "o.npz", "--overwrite", *FAST, *extra)
        return sorted(read)

    assert prefixes() == ["ema.", "guide."]  # autoguided by the stored guide, by default
    assert prefixes("--ema-decay", 0.3) == ["ema1.", "guide."]
    assert prefixes("--guidance", 1) == ["ema."]


def test_ema_extra_needs_ema_and_bad_metadata_lists_no_decay(tmp_path):
    from conftest import tiny_config
    from ddpm_cli.engine.checkpoint import Header, ema_decays, extra_ema_decays
    from ddpm_cli.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, train__ema=False, train__ema_extra=[0.5])
    assert any("ema_extra needs ema: true" in p for p in err.value.problems)
    for bad in ("[1e999]", "[NaN]", "[2.0]", "[" * 5000, "not json", "{}"):
        assert extra_ema_decays({"ema_extra": bad}) == []
    cfg = tiny_config(tmp_path, train__ema_decay=0.9)
    listed_only = Header(tmp_path / "x", {"has_ema": "true", "ema_extra": "[0.3, 0.5]"},
                         {"ema.w": {}, "ema2.w": {}}, 0)  # ema1.* is missing from the file
    assert ema_decays(listed_only, cfg.train.ema_decay) == [0.9, 0.5]


def test_the_summary_prints_the_output_path_verbatim(trained_run, tmp_path):
    out = tmp_path / "sweep-ddim:100:1.npz"  # rich would turn :100: into an emoji
    r = run_cli("sample", str(trained_run), "-n", "2", "--format", "npz", "--out", str(out), *FAST,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.exists() and str(out) in r.stdout + r.stderr


def test_npz_into_a_folder_and_no_labels_for_an_unconditional_model(trained_run, tmp_path):
    ok("sample", trained_run, "-n", 3, "--format", "npz", "--out", tmp_path, *FAST)
    d = npz(tmp_path / "samples.npz")
    assert set(d) == {"arr_0"} and d["arr_0"].shape == (3, 16, 16, 3)


def test_an_upper_case_npz_suffix_names_an_npz_file(trained_run, tmp_path):
    """`-o x.NPZ` wrote a folder of PNGs named x.NPZ (and with --format npz, x.NPZ/samples.npz): the suffix that
    picks the file over the folder was compared case-sensitively, as no other suffix check of the CLI is."""
    ok("sample", trained_run, "-n", 2, "--out", tmp_path / "a.NPZ", *FAST)
    ok("sample", trained_run, "-n", 2, "--format", "npz", "--out", tmp_path / "b.Npz", *FAST)
    for name in ("a.NPZ", "b.Npz"):
        assert (tmp_path / name).is_file(), list((tmp_path / name).iterdir())
        assert npz(tmp_path / name)["arr_0"].shape == (2, 16, 16, 3)
    msg = one_line_error(cli("sample", trained_run, "-n", 2, "--format", "png", "--out", tmp_path / "c.NPZ", *FAST))
    assert "names an .npz file" in msg and not (tmp_path / "c.NPZ").exists()


def test_per_class_png_names_show_the_class(trained_conditional_run, tmp_path):
    ok("sample", trained_conditional_run, "-n", 10, "--per-class", "--out", tmp_path, *FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"class{k}_{k:06d}.png" for k in range(10)]


def test_class_option_labels_every_image(trained_conditional_run, tmp_path):
    ok("sample", trained_conditional_run, "-n", 4, "--class", 3, "--format", "npz", "--out", tmp_path / "c.npz",
       *FAST)
    assert npz(tmp_path / "c.npz")["labels"].tolist() == [3, 3, 3, 3]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(trained_run, tmp_path):
    # eta = 1 makes DDIM stochastic, so the per-step noise must be seeded too.
    args = ("sample", trained_run, "-n", 3, "--eta", 1, *FAST)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        ok(*args, "--seed", seed, "--out", tmp_path / name)
    a, b, c = ([(tmp_path / d / f"{i:06d}.png").read_bytes() for i in range(3)] for d in "abc")
    assert a == b
    assert all(x != y for x, y in zip(a, c))


def test_deterministic_images_do_not_depend_on_the_batch_size(trained_run, tmp_path):
    ok("sample", trained_run, "-n", 5, "--batch-size", 5, "--format", "npz", "--out", tmp_path / "a.npz", *FAST)
    ok("sample", trained_run, "-n", 5, "--batch-size", 2, "--format", "npz", "--out", tmp_path / "b.npz", *FAST)
    assert np.array_equal(npz(tmp_path / "a.npz")["arr_0"], npz(tmp_path / "b.npz")["arr_0"])


@pytest.mark.parametrize("args", [["--sampler", "ddim", "--steps", "2"],
                                  ["--sampler", "ddim", "--steps", "4", "--spacing", "quadratic", "--eta", "0.5"],
                                  ["--sampler", "dpm++2m", "--steps", "3"],
                                  ["--sampler", "ddpm", "--variance", "posterior"]])
def test_each_sampler_runs(trained_run, tmp_path, args):
    ok("sample", trained_run, "-n", 2, "--format", "npz", "--out", tmp_path / "s.npz", *args)
    assert npz(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_samplers_and_step_counts_give_different_images(trained_run, tmp_path):
    ok("sample", trained_run, "-n", 2, "--format", "npz", "--out", tmp_path / "a.npz", "--steps", "2")
    ok("sample", trained_run, "-n", 2, "--format", "npz", "--out", tmp_path / "b.npz", "--steps", "5")
    assert not np.array_equal(npz(tmp_path / "a.npz")["arr_0"], npz(tmp_path / "b.npz")["arr_0"])


def test_ema_and_raw_weights_differ(trained_run, tmp_path):
    ok("sample", trained_run, "-n", 2, "--format", "npz", "--out", tmp_path / "ema.npz", *FAST)
    r = ok("sample", trained_run, "-n", 2, "--format", "npz", "--out", tmp_path / "raw.npz", "--no-ema", *FAST)
    assert "raw weights" in r.stdout
    assert not np.array_equal(npz(tmp_path / "ema.npz")["arr_0"], npz(tmp_path / "raw.npz")["arr_0"])


def test_guidance_changes_conditional_images(trained_conditional_run, tmp_path):
    for name, w in (("plain", "1"), ("guided", "3")):
        ok("sample", trained_conditional_run, "-n", 2, "--class", 4, "--guidance", w, "--format", "npz",
           "--out", tmp_path / f"{name}.npz", *FAST)
    assert not np.array_equal(npz(tmp_path / "plain.npz")["arr_0"], npz(tmp_path / "guided.npz")["arr_0"])


def test_grid_alone_and_a_row_per_class(trained_run, trained_conditional_run, tmp_path):
    ok("sample", trained_run, "-n", 4, "--grid", tmp_path / "g.png", *FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]  # --grid alone writes no image files
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 cells of 16 px, 2 px padding
    ok("sample", trained_conditional_run, "-n", 20, "--per-class", "--grid", tmp_path / "pc.png", *FAST)
    with Image.open(tmp_path / "pc.png") as im:
        assert im.size == (2 + 2 * 18, 2 + 10 * 18)  # a row per class, two per row


def test_existing_files_are_kept_unless_overwrite(trained_run, tmp_path):
    ok("sample", trained_run, "-n", 2, "--out", tmp_path, *FAST)
    (tmp_path / "000001.png").write_bytes(b"mine")
    msg = one_line_error(cli("sample", trained_run, "-n", 2, "--out", tmp_path, *FAST))
    assert "already exists" in msg and "--overwrite" in msg
    assert (tmp_path / "000001.png").read_bytes() == b"mine"
    ok("sample", trained_run, "-n", 2, "--out", tmp_path, "--overwrite", *FAST)
    assert (tmp_path / "000001.png").read_bytes().startswith(b"\x89PNG")
    # fewer images into the same folder: the earlier ones stay, and would be scored with these; it says so
    ok("sample", trained_run, "-n", 3, "--out", tmp_path, "--overwrite", *FAST)
    r = ok("sample", trained_run, "-n", 1, "--out", tmp_path, "--overwrite", *FAST)
    assert "holds 2 other images" in r.stderr
    assert "other image" not in ok("sample", trained_run, "-n", 3, "--out", tmp_path, "--overwrite", *FAST).stderr


def test_the_grid_is_a_png(trained_run, tmp_path):
    msg = one_line_error(cli("sample", trained_run, "-n", 2, "--grid", tmp_path / "g.jpg", *FAST))
    assert "name it .png" in msg and not (tmp_path / "g.jpg").exists()


def test_option_choices_are_the_sampler_vocabulary_and_each_one_runs():
    import torch

    from ddpm_cli.cli.options import Sampler, Spacing, Variance
    from ddpm_cli.diffusion import sampler_spec, samplers
    from ddpm_cli.diffusion.gaussian import GaussianDiffusion
    from ddpm_cli.diffusion.schedules import make_betas

    assert tuple(s.value for s in Sampler) == sampler_spec.SAMPLERS
    assert tuple(s.value for s in Spacing) == sampler_spec.SPACINGS
    assert tuple(v.value for v in Variance) == sampler_spec.VARIANCES
    d = GaussianDiffusion(make_betas("linear", 100))
    for name in sampler_spec.SAMPLERS:  # every name the CLI offers is one the sampler runs
        for spacing in sampler_spec.SPACINGS:
            spec = sampler_spec.SamplerSpec(name, 3, spacing=spacing)
            x = samplers.sample(lambda x, t, y: 0.1 * x, d, torch.randn(1, 1, 2, 2), spec=spec)
            assert torch.isfinite(x).all()


def test_plan_labels():
    assert plan_labels(3, conditional=False, num_classes=10) is None
    assert plan_labels(12, conditional=True, num_classes=4, per_class=True) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert plan_labels(5, conditional=True, num_classes=3) == [0, 1, 2, 0, 1]
    assert plan_labels(2, conditional=True, num_classes=3, class_index=2) == [2, 2]
    with pytest.raises(DdpmError, match="unconditional"):
        plan_labels(2, conditional=False, num_classes=10, per_class=True)
    with pytest.raises(DdpmError, match="out of range"):
        plan_labels(2, conditional=True, num_classes=3, class_index=3)
    with pytest.raises(DdpmError, match="at least 1"):
        plan_labels(0, conditional=False, num_classes=3)
    rows = grid_layout(plan_labels(6, conditional=True, num_classes=3, per_class=True), 6, True, 3)
    assert rows == [[0, 1], [2, 3], [4, 5]]
    for n, nearest in ((15, "-n 10 or -n 20"), (5, "-n 10")):  # per class: the same count for every class
        with pytest.raises(UsageError, match=nearest):
            plan_labels(n, conditional=True, num_classes=10, per_class=True)


# -- errors: one line, exit 1 or 2, no traceback ------------------------------------------------------------


def bad_file(tmp_path, kind: str, trained_run):
    """A checkpoint path that is wrong in the named way."""
    p = tmp_path / f"{kind}.safetensors"
    if kind == "missing":
        return p
    if kind == "not-safetensors":
        p.write_text("just some text, not a checkpoint\n")
    elif kind == "truncated":
        data = latest_checkpoint(trained_run).read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "no-ddpm-metadata":
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(4, np.float32)}, str(p), metadata={"producer": "someone else"})
    elif kind == "pickle":
        import pickle

        p = tmp_path / "model.pt"
        p.write_bytes(pickle.dumps({"w": [0.0]}))
    return p


@pytest.mark.parametrize("kind,expect", [("missing", "not found"), ("not-safetensors", "not a safetensors"),
                                         ("truncated", "truncated"), ("no-ddpm-metadata", "without ddpm's metadata"),
                                         ("pickle", "pickle")])
def test_bad_checkpoint_files(tmp_path, trained_run, kind, expect):
    msg = one_line_error(cli("sample", bad_file(tmp_path, kind, trained_run), "-n", 2, "--out", tmp_path / "o"))
    assert expect in msg
    assert not (tmp_path / "o").exists()


def test_per_class_on_an_unconditional_model(trained_run, tmp_path):
    msg = one_line_error(cli("sample", trained_run, "-n", 4, "--per-class", "--out", tmp_path))
    assert "--per-class" in msg and "unconditional" in msg


@pytest.mark.parametrize("k", ["10", "-1"])
def test_class_out_of_range(trained_conditional_run, tmp_path, k):
    msg = one_line_error(cli("sample", trained_conditional_run, "-n", 4, "--class", k, "--out", tmp_path))
    assert f"--class {k} is out of range" in msg and "0 to 9" in msg


@pytest.mark.parametrize("n", ["0", "-5"])
def test_non_positive_n(trained_run, tmp_path, n):
    msg = one_line_error(cli("sample", trained_run, "-n", n, "--out", tmp_path), code=(2,))
    assert "-n must be at least 1" in msg


@pytest.mark.parametrize("args,expect", [(["--batch-size", "0"], "--batch-size"), (["--eta", "2"], "--eta"),
                                         (["--steps", "0"], "--steps"),
                                         (["--class", "1"], "unconditional"), (["--guidance", "2"], "unconditional"),
                                         (["--device", "nonsense:7"], "--device 'nonsense:7' is not a device")])
def test_other_bad_options(trained_run, tmp_path, args, expect):
    assert expect in one_line_error(cli("sample", trained_run, "-n", 2, "--out", tmp_path, *args))


def test_ema_requested_but_absent(trained_run, tmp_path):
    from ddpm_cli.engine.export import export_checkpoint

    slim = export_checkpoint(trained_run, tmp_path / "slim.safetensors").path
    assert "no EMA weights" in one_line_error(cli("sample", slim, "-n", 2, "--ema", "--out", tmp_path / "o"))


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    r = run_cli("sample", str(tmp_path / "nope.safetensors"), "-n", "2", timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'nope.safetensors'} not found; pass a .safetensors file written by ddpm "
        f"or a run directory"]


def test_a_sample_process_ends_without_the_teardown_and_loses_no_output(trained_run, tmp_path):
    """`ddpm sample` ends its process once its work is written, skipping Python's teardown (on a GPU seconds of
    it), and keeps its exit code; a usage error or a command that did not ask for it still tears down (eval's
    own quick exit: tests/test_eval.py)."""
    run = run_main_probing_teardown
    out = tmp_path / "s.npz"
    r = run("sample", str(trained_run), "-n", "5", "--steps", "3", "--format", "npz", "--out", str(out))
    assert r.returncode == 0 and "TEARDOWN" not in r.stdout, r.stdout + r.stderr
    assert "5 images" in r.stdout and np.load(out)["arr_0"].shape == (5, 16, 16, 3)  # printed and written whole
    r = run("sample", str(tmp_path / "nope.safetensors"))
    assert r.returncode == 1 and "TEARDOWN" not in r.stdout and "not found" in r.stderr  # its code kept
    r = run("sample", str(trained_run), "--bogus")
    assert r.returncode == 2 and "TEARDOWN" in r.stdout  # a usage error never reaches the command
    r = run("config", "show", "--help")
    assert r.returncode == 0 and "TEARDOWN" in r.stdout


def test_run_directory_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    assert "holds no checkpoints" in one_line_error(cli("sample", tmp_path / "run", "-n", 2))


def test_copy_of_a_checkpoint_elsewhere_still_samples(trained_run, tmp_path):
    # The checkpoint alone is enough: no config file or run directory beside it.
    lone = tmp_path / "lone.safetensors"
    shutil.copy(latest_checkpoint(trained_run), lone)
    ok("sample", lone, "-n", 1, "--out", tmp_path / "o", *FAST)
    assert (tmp_path / "o" / "000000.png").exists()


# -- autoguidance: --guidance W --guide-model WEAKER ---------------------------------------------------------


def test_autoguided_is_the_guide_plus_w_times_the_difference():
    import torch

    from ddpm_cli.diffusion.samplers import autoguided

    x, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 9])
    main = lambda x, t, y: 2 * x + t[:, None, None, None]  # noqa: E731
    guide = lambda x, t, y: x  # noqa: E731
    out = autoguided(main, guide, 2.5)(x, t, None)
    assert torch.allclose(out, x + 2.5 * (x + t[:, None, None, None]))


def test_both_guidances_combine_a_bf16_networks_outputs_in_float32():
    """Under bf16 autocast (generate on CUDA) classifier-free guidance combined the two outputs in bf16, where
    autoguidance converts them first: eps_u + w (eps_c - eps_u) lost bits in the difference, which w magnifies."""
    import torch

    from ddpm_cli.diffusion.samplers import autoguided, guided

    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([5, 9]), torch.tensor([1, 2])
    net = lambda x, t, y: (x * (1 + y[:, None, None, None] / 3)).bfloat16()  # noqa: E731 - a bf16 network's output
    eps = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])).float()
    want = eps[2:] + 4.0 * (eps[:2] - eps[2:])
    got = guided(net, 4.0, 10)(x, t, y)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert autoguided(net, lambda x, t, y: net(x, t, torch.full_like(y, 10)), 4.0)(x, t, y).dtype == torch.float32


def test_autoguidance_of_an_unconditional_model_by_an_earlier_checkpoint(trained_run, tmp_path):
    early = trained_run / "checkpoints" / "ckpt-00000010.safetensors"
    assert early.exists()
    ok("sample", trained_run, "-n", 3, "--format", "npz", "--out", tmp_path / "plain.npz", *FAST)
    r = ok("sample", trained_run, "-n", 3, "--format", "npz", "--out", tmp_path / "auto.npz", "--guide-model", early,
           *FAST)  # the weight defaults to train.guide_weight, 2
    assert f"autoguided by {early} at 2" in r.stdout
    plain, auto = npz(tmp_path / "plain.npz")["arr_0"], npz(tmp_path / "auto.npz")["arr_0"]
    assert auto.shape == plain.shape and not np.array_equal(auto, plain)


def test_a_model_guided_by_itself_is_the_model_alone(trained_run):
    """eps_g + w (eps - eps_g) = eps when the guide is the model, at any weight: the same images as unguided."""
    import torch

    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine.checkpoint import load_model
    from ddpm_cli.engine.generate import generate

    model, diffusion, _, _ = load_model(trained_run)
    draw = lambda **kw: torch.cat([b for _, b, _ in generate(model, diffusion, 3, SamplerSpec(steps=3),  # noqa
                                                               image_shape=(3, 16, 16), seed=1, **kw)])
    assert torch.equal(draw(guidance=3.0, guide=model), draw())
    assert not torch.equal(draw(guidance=3.0, guide=lambda x, t, y: model(x, t, y) * 0.5), draw())


def test_autoguidance_bad_inputs(trained_run, trained_conditional_run, tmp_path):
    early = trained_run / "checkpoints" / "ckpt-00000010.safetensors"
    out = ["-n", 2, "--out", tmp_path / "o", *FAST]
    assert "no effect at --guidance 1" in one_line_error(cli("sample", trained_run, "--guidance", 1, "--guide-model",
                                                             early, *out))
    msg = one_line_error(cli("sample", trained_run, "--guidance", 2, "--guide-model", trained_conditional_run, *out))
    assert "differs from the checkpoint in its classes" in msg and "earlier checkpoint of the same run" in msg
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    v_run = train(tiny_config(tmp_path / "v", train__steps=2, diffusion__prediction="v")).run_dir  # else the same
    msg = one_line_error(cli("sample", trained_run, "--guidance", 2, "--guide-model", v_run, *out))
    assert "differs from the checkpoint in its prediction (diffusion.prediction)" in msg, msg
    msg = one_line_error(cli("sample", trained_run, "--guidance", 2, "--guide-model", tmp_path / "nope.safetensors",
                             *out))
    assert msg.startswith("error: --guide-model: checkpoint") and "not found" in msg
    assert "is the checkpoint itself" in one_line_error(cli("sample", trained_run, "--guide-model", trained_run, *out))
    for bad in ("nan", "inf"):  # a usage error, as --eta nan is (it was exit 1)
        msg = one_line_error(cli("sample", trained_run, "--guidance", bad, "--guide-model", early, *out), code=(2,))
        assert "--guidance must be a finite number" in msg, msg
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for where in (["--format", "npz", "--out", blocker / "x.npz"], ["--grid", blocker / "g.png", *out]):
        msg = one_line_error(cli("sample", trained_run, "-n", 2, *where))  # before drawing, not after
        assert "cannot write" in msg and "a-file" in msg
    r = cli("sample", trained_run, "--seed", 2**64, *out)  # an overflow in torch's generator was a traceback
    assert r.exit_code == 2 and "--seed" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_broken_stored_guide_is_refused_before_any_work(guided_run, tmp_path):
    """guide.* tensors without a usable guide_step: one line, also before --gpus would start any process; inspect
    shows the file and says why its guide is unusable."""
    import json

    from safetensors.torch import load_file, save_file

    from ddpm_cli.engine.checkpoint import read_header
    from ddpm_cli.engine.runs import latest_checkpoint

    src = latest_checkpoint(guided_run)
    meta = read_header(src).metadata
    tensors = load_file(src)
    for name, bad_meta in (("nostep", {k: v for k, v in meta.items() if k != "guide_step"}),
                           ("future", {**meta, "guide_step": "999"})):
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, bad, metadata=bad_meta)
        for extra in ([], ["--gpus", "2"], ["--guide-model", "none"]):
            msg = one_line_error(cli("sample", bad, "-n", 2, "--out", tmp_path / "o", *extra))
            assert "without a valid guide_step" in msg
        info = json.loads(ok("inspect", bad, "--json").stdout)
        assert info["guide_step"].startswith("unusable")
    assert not (tmp_path / "o").exists()


def test_a_non_finite_weight_is_refused_for_a_stored_guide_too(guided_run, tmp_path):
    for w in ("nan", "inf"):
        assert "finite" in one_line_error(cli("sample", guided_run, "-n", 1, "--guidance", w, "--out", tmp_path))


def test_eta_with_the_stored_guides_default_sampler_warns(guided_run, tmp_path):
    r = ok("sample", guided_run, "-n", 2, "--out", tmp_path / "o", "--eta", 1, *FAST)
    assert "--eta applies to ddim only" in r.stderr and "pass --sampler ddim" in r.stderr


def test_variance_with_another_sampler_warns(trained_run, guided_run, tmp_path):
    """--variance only sets the ddpm sampler's sigma^2; with ddim, or with no --sampler (ddim, or dpm++2m for a
    checkpoint with a stored guide), it was ignored without a word."""
    for i, (run, args, name) in enumerate(((trained_run, ["--sampler", "ddim"], "ddim"), (trained_run, [], "ddim"),
                                           (guided_run, [], "dpm++2m"))):
        r = ok("sample", run, "-n", 1, "--out", tmp_path / str(i), "--variance", "posterior", *FAST, *args)
        warned = [line for line in r.stderr.splitlines() if "--variance" in line]
        assert len(warned) == 1 and warned[0].startswith("warning: ") and f"samples with {name}" in warned[0], r.stderr
        assert ("pass --sampler ddpm" in warned[0]) == (not args), warned
    r = ok("sample", trained_run, "-n", 1, "--out", tmp_path / "ddpm", "--sampler", "ddpm", "--variance", "beta")
    assert "--variance" not in r.stderr


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """A tiny unconditional run whose checkpoints carry their step-10 EMA weights as the autoguidance guide."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    return train(tiny_config(tmp_path_factory.mktemp("guided"), train__guide_step=10, train__guide_weight=2.5)).run_dir


def test_a_checkpoint_with_a_stored_guide_is_autoguided_by_default(guided_run, tmp_path):
    """`ddpm sample RUN` of a run trained with train.guide_step: DPM-Solver++(2M) autoguided by the stored weights at
    train.guide_weight, exactly the images of the explicit --guide-model path to that step's checkpoint (whose EMA
    weights the guide is); --guidance 1 and --guide-model none sample it unguided with DDIM."""
    r = ok("sample", guided_run, "-n", 3, "--format", "npz", "--out", tmp_path / "d.npz")
    assert "dpm++2m" in r.stdout and "autoguided by its step-10 weights at 2.5" in r.stdout
    explicit = guided_run / "checkpoints" / "ckpt-00000010.safetensors"
    assert explicit.exists()
    ok("sample", guided_run, "-n", 3, "--format", "npz", "--out", tmp_path / "e.npz", "--sampler", "dpm++2m",
       "--steps", 20, "--guidance", 2.5, "--guide-model", explicit)
    default = npz(tmp_path / "d.npz")["arr_0"]
    assert np.array_equal(default, npz(tmp_path / "e.npz")["arr_0"])
    for off in (["--guidance", "1"], ["--guide-model", "none"]):
        r = ok("sample", guided_run, "-n", 3, "--format", "npz", "--out", tmp_path / "u.npz", "--overwrite", *off)
        assert "ddim" in r.stdout and "autoguided" not in r.stdout
        assert not np.array_equal(npz(tmp_path / "u.npz")["arr_0"], default)
    r = ok("sample", guided_run, "-n", 3, "--format", "npz", "--out", tmp_path / "w.npz", "--guidance", 4, *FAST)
    assert "autoguided by its step-10 weights at 4" in r.stdout


def test_the_python_api_autoguides_too(trained_run):
    import torch

    from ddpm_cli.api import Diffusion

    d = Diffusion.from_checkpoint(trained_run, device="cpu")
    early = Diffusion.from_checkpoint(trained_run / "checkpoints" / "ckpt-00000010.safetensors", device="cpu")
    plain = d.sample(2, steps=3, seed=4)
    same = Diffusion.from_checkpoint(trained_run, device="cpu")  # (the object itself is refused: it guides nothing)
    assert torch.equal(d.sample(2, steps=3, seed=4, guidance=2.0, guide=same), plain)  # by its own weights: unchanged
    guided = d.sample(2, steps=3, seed=4, guidance=2.0, guide=early)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)


def test_a_guide_must_share_the_noise_schedule_itself_not_its_unused_fields(tmp_path):
    """Cosine ignores schedule_low/high: guides that differ only there are accepted; another schedule is refused."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    def run(name, **diffusion):
        extra = {f"diffusion__{k}": v for k, v in diffusion.items()}
        return train(tiny_config(tmp_path / name, train__steps=2, logging__checkpoint_every=2,
                                 logging__sample_every=100, **extra)).run_dir

    main = run("main", schedule="cosine")
    same = run("same", schedule="cosine", schedule_low=2e-4)
    other = run("other", schedule="linear")
    out = ["-n", 1, "--out", tmp_path / "o", "--guidance", 2, *FAST]
    ok("sample", main, "--guide-model", same, *out)
    assert "noise schedule" in one_line_error(cli("sample", main, "--guide-model", other, *out, "--overwrite"))


def test_the_compile_decision_counts_the_evaluations_each_sampler_and_guidance_make():
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec as S
    from ddpm_cli.diffusion.schedules import make_betas
    from ddpm_cli.engine.generate import COMPILE_MIN_NFE

    ab = np.cumprod(1 - make_betas("linear", 1000))
    assert S().evaluations(ab) == 100 and S("ddim", 50).evaluations(ab) == 50  # DDIM-100 default
    assert S("ddpm").evaluations(ab) == 1000 and S("dpm++2m").evaluations(ab) == 20
    assert S("ddpm", 50).evaluations(ab) == 1000  # ddpm ignores --steps (and warns): all T steps
    assert S("dpm++2m").evaluations(ab, guided=True) == 40  # two networks (or a doubled batch) a step
    assert 5_000 * S("dpm++2m").evaluations(ab) < COMPILE_MIN_NFE <= 5_000 * S("dpm++2m").evaluations(ab, True)


def test_autoguidance_refuses_a_guide_whose_labels_mean_other_classes(trained_conditional_run, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from ddpm_cli.engine.checkpoint import read_header

    early = trained_conditional_run / "checkpoints" / "ckpt-00000010.safetensors"
    meta = dict(read_header(early).metadata)
    names = json.loads(meta["classes"])
    assert len(names) > 1
    out = ["-n", 2, "--out", tmp_path / "o", *FAST]

    def guide_with(classes: list[str], name: str):
        path = tmp_path / name
        save_file(load_file(str(early)), str(path), metadata={**meta, "classes": json.dumps(classes)})
        return cli("sample", trained_conditional_run, "--guidance", 2, "--guide-model", path, *out)

    msg = one_line_error(guide_with(names[::-1], "shuffled.safetensors"))  # same count, label i another class
    assert "differs from the checkpoint in its class names" in msg
    r = guide_with(names, "same.safetensors")
    assert r.exit_code == 0, r.output


def test_the_sampling_network_folds_each_upsampling_and_computes_the_same_function():
    import torch

    from ddpm_cli.engine.generate import inference_net
    from ddpm_cli.nn.unet import Upsample

    model = perturbed_unet()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999])
    with torch.no_grad():
        ref = model.eval()(x, t)
        net = inference_net(model)
        assert all(m.folded for m in model.modules() if isinstance(m, Upsample))
        assert torch.allclose(net(x, t, None), ref, atol=1e-5)


def test_programmatic_dependent_launch_only_for_compiled_cuda_code_on_hopper(monkeypatch):
    import torch
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip(f"torch {torch.__version__}'s inductor has no PDL option (the sampler then compiles without)")

    from ddpm_cli.engine.build import sampler_compile_options

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "triton.enable_pdl" not in sampler_compile_options("default", cpu)
    assert sampler_compile_options("reduce-overhead", cpu)["triton.cudagraphs"]  # the mode's own options stay
    for capability, expect in (((8, 0), False), ((9, 0), True)):  # A100: no PDL; H100: PDL
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert ("triton.enable_pdl" in sampler_compile_options("default", cuda)) is expect


def test_batches_are_evened_out_and_keep_their_count():
    from ddpm_cli.engine.generate import even_batch

    assert even_batch(10_000, 256) == 250 and even_batch(10_000, 1000) == 1000 and even_batch(1500, 1000) == 750
    for n in range(1, 300):
        for b in range(1, 40):
            e = even_batch(n, b)
            assert e <= b and -(-n // e) == -(-n // b)  # never larger, never more batches
            assert even_batch(n, e) == e  # a rank planning with the result meets generate's batches
            assert n - (-(-n // e) - 1) * e >= 1  # the last batch is not empty


def test_a_compiled_network_meets_one_batch_shape_and_the_images_stay_the_same(trained_conditional_run):
    """torch.compile specialises on the batch size: a short last batch is padded (and its extra images dropped),
    so the network is not compiled twice. Labels and DDIM images are those of the unpadded run."""
    import torch

    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine.checkpoint import load_model
    from ddpm_cli.engine.generate import generate

    model, diffusion, cfg, _ = load_model(trained_conditional_run)
    seen: list[int] = []

    def net(x, t, y):
        seen.append(x.shape[0])
        assert y is not None and y.shape[0] == x.shape[0]
        return model(x, t, y)

    labels = torch.arange(7) % cfg.model.num_classes
    draw = lambda fn, **kw: list(generate(fn, diffusion, 7, SamplerSpec(steps=2), image_shape=(3, 16, 16),  # noqa: E731
                                          labels=labels, batch_size=3, seed=4, **kw))
    plain = draw(model)
    net.compiled = True
    padded = draw(net)
    assert set(seen) == {3} and len(seen) == 3 * 2  # 7 images at most 3 a batch: 3 batches of 3, 2 steps each
    assert [s for s, _, _ in padded] == [s for s, _, _ in plain] == [0, 3, 6]
    assert [b.shape[0] for _, b, _ in padded] == [3, 3, 1]
    assert torch.equal(torch.cat([y for _, _, y in padded]), labels)
    got, want = torch.cat([b for _, b, _ in padded]).int(), torch.cat([b for _, b, _ in plain]).int()
    assert (got - want).abs().max() <= 1  # the same images (a batch of 3 may round differently from one of 1)


def test_png_writer_writes_in_threads_and_raises_a_failed_write(tmp_path):
    from ddpm_cli.engine.sampling import PngWriter

    images = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    with PngWriter(3) as w:
        w.submit(paths[:4], images[:4])
        w.submit(paths[4:], images[4:])
    for p, img in zip(paths, images):
        assert np.array_equal(np.asarray(Image.open(p)), img.transpose(1, 2, 0))
    with pytest.raises(DdpmError, match="cannot write"):
        with PngWriter(2) as w:
            w.submit([tmp_path / "missing-folder" / "x.png"], images[:1])
    w = PngWriter(2)  # a failed write is raised by the next submit, before more work is queued
    w.submit([tmp_path / "missing-folder" / "y.png"], images[:1])
    concurrent.futures.wait(w.pending)
    with pytest.raises(DdpmError, match="cannot write"):
        w.submit([tmp_path / "z.png"], images[:1])
    w.pool.shutdown(wait=True)
    assert not (tmp_path / "z.png").exists()


def test_the_default_sampling_batch_is_1000_on_a_gpu_at_32x32_and_scales_with_the_pixels():
    from ddpm_cli.engine.generate import default_batch

    assert default_batch(32, True) == 1000 and default_batch(16, True) == 1000  # smaller images: no larger batch
    assert default_batch(64, True) == 250 and default_batch(256, True) == 15 and default_batch(4096, True) == 1
    assert default_batch(32, False) == 256 and default_batch(128, False) == 16


def test_compiled_sampling_from_the_cli_pads_the_last_batch_and_says_so(trained_run, tmp_path):
    """--compile on (as on a GPU for large jobs): 5 images at most 2 a batch run as 3 batches of 2, the last
    padded, and give the eager run's images; the summary says the first batch included compiling."""
    ok("sample", trained_run, "-n", 5, "--batch-size", 2, "--format", "npz", "--out", tmp_path / "e.npz", *FAST)
    r = ok("sample", trained_run, "-n", 5, "--batch-size", 2, "--format", "npz", "--out", tmp_path / "c.npz",
           "--compile", "on", *FAST)
    first, total = (float(re.search(pattern, r.output).group(1))
                    for pattern in (r"first batch took ([\d.]+) s", r"5 images in ([\d.]+) s"))
    assert 0 < first <= total
    eager, compiled = npz(tmp_path / "e.npz")["arr_0"], npz(tmp_path / "c.npz")["arr_0"]
    assert compiled.shape == eager.shape == (5, 16, 16, 3)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2  # the same images, up to compiled rounding


def test_per_class_needs_the_same_count_for_every_class(trained_conditional_run, tmp_path):
    """-n 15 over 10 classes gave 2 images to classes 0-4 and 1 to 5-9, and -n 5 only classes 0-4, silently."""
    for n, nearest in ((15, "-n 10 or -n 20"), (5, "-n 10")):
        msg = one_line_error(cli("sample", trained_conditional_run, "--per-class", "-n", n, "--out",
                                 tmp_path / f"o{n}", *FAST), code=(2,))
        assert nearest in msg and "multiple of 10" in msg
        assert not (tmp_path / f"o{n}").exists()
    ok("sample", trained_conditional_run, "--per-class", "-n", 20, "--out", tmp_path / "o", *FAST)
    names = sorted(p.name.split("_")[0] for p in (tmp_path / "o").iterdir())
    assert names == sorted(f"class{k}" for k in range(10) for _ in range(2))


def test_the_header_names_the_steps_that_run(trained_run, tmp_path):
    """--steps above T ran T, after a warning that said so, while the header said the steps asked for; and one
    step read '1 steps'."""
    r = ok("sample", trained_run, "-n", 1, "--sampler", "ddim", "--steps", 150, "--out", tmp_path / "a")
    assert "more than the model's T = 100" in r.stderr and "|  ddim 100 steps  |" in r.stdout, r.output
    r = ok("sample", trained_run, "-n", 1, "--sampler", "ddim", "--steps", 1, "--out", tmp_path / "b")
    assert "|  ddim 1 step  |" in r.stdout, r.stdout
    # steps that round onto the same timestep run once: the header said the 90 asked for (found by a review)
    import numpy as np

    from ddpm_cli.diffusion.sampler_spec import timesteps
    from ddpm_cli.diffusion.schedules import make_betas

    taken = len(timesteps(np.cumprod(1 - make_betas("linear", 100)), 90, "logsnr"))
    assert taken < 90
    r = ok("sample", trained_run, "-n", 1, "--sampler", "dpm++2m", "--steps", 90, "--spacing", "logsnr", "--out",
           tmp_path / "c")
    assert f"|  dpm++2m {taken} steps  |" in r.stdout and f"fall on {taken} distinct timesteps" in r.stderr, r.output


def test_a_slow_rate_reads_as_a_rate():
    """The ddpm sampler on a CPU: '4 images in 102.4 s (0.0 images/s)'."""
    from ddpm_cli.cli.ui import fmt_rate

    assert [fmt_rate(x) for x in (0.039, 3.96, 1234.4)] == ["0.039", "4.0", "1,234"]


def test_an_out_named_npz_is_an_npz_file(trained_run, tmp_path):
    """`-o samples.npz` without --format npz wrote a folder of PNGs named samples.npz (np.load then failed). The
    name's suffix chooses npz; a --format png that says otherwise is refused before any sampling."""
    ok("sample", trained_run, "-n", 2, "--out", tmp_path / "a.npz", *FAST)
    assert (tmp_path / "a.npz").is_file() and np.load(tmp_path / "a.npz")["arr_0"].shape[0] == 2
    line = one_line_error(cli("sample", trained_run, "-n", 2, "--format", "png", "--out", tmp_path / "c.npz", *FAST),
                          code=(2,))
    assert "--format png" in line and not (tmp_path / "c.npz").exists()
    ok("sample", trained_run, "-n", 2, "--out", tmp_path / "pngs", *FAST)  # a folder of PNGs, as before
    assert sorted(p.suffix for p in (tmp_path / "pngs").iterdir()) == [".png", ".png"]


def test_format_npz_with_a_grid_and_no_out_writes_the_npz_too(trained_run, tmp_path, monkeypatch):
    """`--grid g.png` alone writes only the grid; `--format npz --grid g.png` wrote only the grid as well, dropping
    the npz the user asked for (every image but the grid's)."""
    monkeypatch.chdir(tmp_path)
    ok("sample", trained_run, "-n", 2, "--format", "npz", "--grid", "g.png", *FAST)
    assert (tmp_path / "g.png").is_file() and npz(tmp_path / "samples.npz")["arr_0"].shape[0] == 2
    ok("sample", trained_run, "-n", 2, "--grid", "h.png", *FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "h.png", "samples.npz"]


def test_a_grid_inside_the_out_folder_is_said_to_be_scored_with_the_images(trained_run, tmp_path):
    """`-o s --grid s/grid.png`: `ddpm eval s` then scored the grid as one more sample, with no word at sampling."""
    r = ok("sample", trained_run, "-n", 2, "--out", tmp_path / "s", "--grid", tmp_path / "s" / "grid.png", *FAST)
    assert "grid" in r.stderr and "ddpm eval" in r.stderr, r.stderr
    r = ok("sample", trained_run, "-n", 2, "--out", tmp_path / "t", "--grid", tmp_path / "grid.png", *FAST)
    assert "warning" not in r.stderr, r.stderr


def test_class_takes_a_name_that_inspect_lists(trained_conditional_run, tmp_path):
    """`--class circle` was "Input should be a valid integer", though `ddpm inspect` lists the classes by name."""
    from ddpm_cli.engine.checkpoint import class_names, read_header

    names = class_names(read_header(latest_checkpoint(trained_conditional_run)).metadata)
    assert len(names) == 10
    ok("sample", trained_conditional_run, "-n", 2, "--class", names[3], "--out", tmp_path / "by_name.npz", *FAST)
    ok("sample", trained_conditional_run, "-n", 2, "--class", 3, "--out", tmp_path / "by_index.npz", *FAST)
    a, b = npz(tmp_path / "by_name.npz"), npz(tmp_path / "by_index.npz")
    assert a["labels"].tolist() == [3, 3] and np.array_equal(a["arr_0"], b["arr_0"])
    msg = one_line_error(cli("sample", trained_conditional_run, "-n", 2, "--class", "unicorn", "--out", tmp_path),
                         code=(2,))
    assert "unicorn" in msg and names[0] in msg


def test_guidance_0_on_a_conditional_model_says_the_images_are_unconditional(trained_conditional_run, tmp_path):
    """`-w 0 --class 3` drew unconditional images and named them class3_*, with no word."""
    r = ok("sample", trained_conditional_run, "-n", 2, "-w", 0, "--class", 3, "--out", tmp_path / "a", *FAST)
    assert "unconditional" in r.stderr and "--guidance 0" in r.stderr, r.stderr
    r = ok("sample", trained_conditional_run, "-n", 2, "-w", 2, "--class", 3, "--out", tmp_path / "b", *FAST)
    assert "unconditional" not in r.stderr, r.stderr


def test_a_class_that_is_a_number_and_another_class_s_name_is_refused(trained_conditional_run, tmp_path):
    """Class folders named 1..10 sort as 1, 10, 2, ...: `--class 1` is index 1 (the class named "10") and the class
    named "1" (index 0). Either reading would be a guess: both are named, exit 2."""
    from safetensors.torch import load_file, save_file

    from ddpm_cli.engine.checkpoint import read_header

    src = latest_checkpoint(trained_conditional_run)
    meta = dict(read_header(src).metadata)
    meta["classes"] = json.dumps(sorted(str(k) for k in range(1, 11)))  # 1, 10, 2, 3, ...
    forged = tmp_path / "ckpt.safetensors"
    save_file(load_file(str(src)), str(forged), metadata=meta)
    msg = one_line_error(cli("sample", forged, "-n", 1, "--class", "1", "--out", tmp_path / "o", *FAST), code=(2,))
    assert "class 1 (10)" in msg and "named 1 (index 0)" in msg, msg
    for k in ("5", "0"):  # index 5 is named 5; no class is named 0: one reading each
        ok("sample", forged, "-n", 1, "--class", k, "--out", tmp_path / f"p{k}", *FAST)
    # ten classes have no index 10: `--class 10` is the class named 10 (index 1), where it was refused as both
    ok("sample", forged, "-n", 1, "--class", "10", "--out", tmp_path / "p10.npz", *FAST)
    assert npz(tmp_path / "p10.npz")["labels"].tolist() == [1]


def test_options_this_checkpoint_cannot_take_are_usage_errors(trained_run, trained_conditional_run, tmp_path):
    """Exit 2 for every option a checkpoint cannot take, as for `--class nope`: `--class 10` of ten classes,
    `--class`/`--per-class`/`--guidance` on an unconditional model and a guide at --guidance 1 exited 1 (a
    review)."""
    for run, extra in ((trained_conditional_run, ["--class", "10"]), (trained_run, ["--class", "1"]),
                       (trained_run, ["--per-class"]), (trained_run, ["--guidance", "2"]),
                       (trained_conditional_run, ["--guide-model", trained_conditional_run, "--guidance", "1"])):
        one_line_error(cli("sample", run, "-n", 10, "--out", tmp_path / "x", *FAST, *extra), code=(2,))
    assert not (tmp_path / "x").exists()


def test_two_seeds_never_start_an_image_from_the_same_noise():
    """Image i of seed s started from torch's generator seeded s * 1,000,003 + i: image 1,000,003 of seed 0 was
    image 0 of seed 1, so two draws of 2,000,000 images (within -n's limit) shared a million (a review)."""
    import torch

    from ddpm_cli.engine.generate import initial_noise

    shape = (3, 2, 2)
    for a, b in (((1_000_003, 0), (0, 1)), ((2_000_006, 0), (0, 2)), ((1, 7), (1_000_004, 6))):
        first, second = initial_noise(range(a[0], a[0] + 1), shape, a[1]), initial_noise(range(b[0], b[0] + 1),
                                                                                           shape, b[1])
        assert not torch.equal(first, second), (a, b)
    # still one image, one noise: the same whatever batch it falls in
    assert torch.equal(initial_noise(range(5, 8), shape, 3)[1], initial_noise(range(6, 7), shape, 3)[0])


def test_no_batch_draws_an_images_starting_noise_as_its_step_noise(monkeypatch):
    """A stochastic sampler's per-step noise comes from its own stream: on the CPU, where the initial noise's
    generator is the same kind, a batch's first step must not add another image's starting noise (image 0's
    first step once added image 1's, correlating the two)."""
    import torch

    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine import generate as gen

    first_draws = []

    def fake_sample(net, diffusion, x, y, spec, generator, on_step):  # the sampler's first draw, as it makes it
        first_draws.append(torch.randn(x.shape, generator=generator))
        return x.clamp(-1, 1)

    monkeypatch.setattr(gen, "sample", fake_sample)
    n, shape = 12, (3, 4, 4)
    for seed in (0, 1, 7):
        first_draws.clear()
        list(gen.generate(None, None, n, SamplerSpec(), image_shape=shape, batch_size=4, seed=seed))
        starts = gen.initial_noise(range(n), shape, seed)
        for drawn in first_draws:  # 3 batches of 4: no row of any equals any image's starting noise
            assert not any(torch.equal(row, start) for row in drawn for start in starts), seed
