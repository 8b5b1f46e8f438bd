"""Post-hoc EMA (train.posthoc_ema, `ddpm ema`): the power-function average, its snapshots, the least-squares
reconstruction of other lengths, and the command end to end on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, ok, one_line_error, tiny_config
from ddpm_cli.engine.checkpoint import load_checkpoint, read_header, read_tensors
from ddpm_cli.engine.posthoc_ema import (PosthocEMA, combination, exponent, list_snapshots, reconstruct,
                                         relative_length, snapshot_path)
from ddpm_cli.engine.train import train
from ddpm_cli.errors import CheckpointError


@pytest.mark.parametrize("length", [0.001, 0.01, 0.05, 0.1, 0.2, 0.28])
def test_the_exponent_gives_the_requested_relative_length(length):
    gamma = exponent(length)
    assert gamma >= 0 and relative_length(gamma) == pytest.approx(length, rel=1e-9)


@pytest.mark.parametrize("length", [0.02, 0.1, 0.25])
def test_the_length_is_the_spread_of_the_steps_the_average_weighs(length):
    """Independently of the formula: the standard deviation of the step numbers under the average's own
    discrete weights (see the next test), over a long run, is `length` times the run."""
    t, g = 100_000, exponent(length)
    s = torch.arange(1, t + 1, dtype=torch.float64)
    w = (s ** (g + 1) - (s - 1) ** (g + 1)) / t ** (g + 1)
    mean = (w * s).sum()
    assert float(((w * (s - mean) ** 2).sum()).sqrt() / t) == pytest.approx(length, rel=1e-3)


@pytest.mark.parametrize("length", [0.0, 0.0005, 0.29, 1.0])
def test_lengths_out_of_range_are_refused(length):
    with pytest.raises(ValueError, match="must be in"):
        exponent(length)


def test_the_update_keeps_the_power_function_average():
    """After t updates the average is sum_s w_s theta_s with w_s = (s^(g+1) - (s-1)^(g+1)) / t^(g+1): the
    discrete power-function profile, exactly (float64 parameters)."""
    model = torch.nn.Linear(1, 1, bias=False).double()
    tracker = PosthocEMA(model, (0.1, 0.2))
    values = torch.randn(50, dtype=torch.float64)
    for t in range(1, 51):
        with torch.no_grad():
            model.weight.fill_(values[t - 1])
        tracker.update(model, t)
        for avg, g in zip(tracker.averages, tracker.exponents):
            s = torch.arange(1, t + 1, dtype=torch.float64)
            w = (s ** (g + 1) - (s - 1) ** (g + 1)) / t ** (g + 1)
            assert avg[0].item() == pytest.approx(float((w * values[:t]).sum()), rel=1e-9, abs=1e-12)


def _random_walk_run(tmp_path, steps=400, every=20):
    """Snapshots of lengths 0.05 and 0.1 every `every` steps of a random walk in 64 parameters, and the true
    averages of 0.075 and 0.1 tracked beside them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8, bias=False)
    tracker, truth = PosthocEMA(model, (0.05, 0.1)), PosthocEMA(model, (0.075, 0.1))
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        tracker.update(model, t)
        truth.update(model, t)
        if t % every == 0:
            tracker.save(tmp_path, t, 16 * t)
    return tracker, truth


def test_a_reconstruction_matches_the_average_it_was_not_given(tmp_path):
    tracker, truth = _random_walk_run(tmp_path)
    rec, tracked_length = reconstruct(tmp_path, [0.075, 0.1])  # two lengths from one pass over the snapshots
    assert rec.step == 400 and rec.images_seen == 6400 and rec.averages == 40 and rec.fit_error < 0.01
    want = truth.averages[0][0]
    got = rec.weights["weight"]
    # the tracked neighbours differ from the truth by a lot; the reconstruction by a small fraction of that
    spread = min((tracker.averages[i][0] - want).norm() for i in range(2))
    assert (got - want).norm() < 0.05 * spread, ((got - want).norm(), spread)
    # a tracked length comes back as itself
    assert torch.allclose(tracked_length.weights["weight"], truth.averages[1][0], atol=1e-4)
    # each as it comes alone
    assert torch.equal(reconstruct(tmp_path, [0.075])[0].weights["weight"], rec.weights["weight"])


def test_a_reconstruction_at_an_earlier_step_uses_the_snapshots_up_to_it(tmp_path):
    tracker, _ = _random_walk_run(tmp_path, steps=200)
    [rec] = reconstruct(tmp_path, [0.05], step=100)
    assert rec.step == 100 and rec.averages == 10
    stored = read_tensors(snapshot_path(tmp_path, 100))["avg0.weight"]
    assert torch.allclose(rec.weights["weight"], stored, atol=1e-4)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshot at step 99"):
        reconstruct(tmp_path, [0.05], step=99)


def test_the_combination_of_one_exact_basis_is_that_basis():
    g = exponent(0.1)
    x, err = combination([(exponent(0.05), 100.0), (g, 100.0), (g, 50.0)], (g, 100.0))
    assert x == pytest.approx([0, 1, 0], abs=1e-9) and err < 1e-6


def _posthoc_run(tmp_path, **extra):
    opts = dict(train__posthoc_ema=[0.05, 0.1], train__posthoc_ema_every=5, logging__checkpoint_every=10,
                logging__sample_every=100)
    return train(tiny_config(tmp_path, **{**opts, **extra}))


def test_training_writes_snapshots_and_ddpm_ema_makes_a_checkpoint_that_samples(tmp_path, monkeypatch):
    res = _posthoc_run(tmp_path, train__steps=22)
    run = res.run_dir
    snaps = list_snapshots(run)
    assert [s.step for s in snaps] == [5, 10, 15, 20, 22]  # every 5 steps, with every checkpoint, at the end
    assert snaps[-1].lengths == [0.05, 0.1] and snaps[-1].images_seen == 22 * 16
    listed = ok("ema", run).stdout
    assert "5 snapshots of the lengths 0.05, 0.1, steps 5 to 22" in listed

    out = tmp_path / "picked.safetensors"
    r = ok("ema", run, "--length", "0.1", "--out", out)
    assert f"wrote {out}" in r.stdout and "length 0.1 at step 22, from 10 stored averages" in r.stdout
    ck = load_checkpoint(out)
    snapshot = read_tensors(snapshot_path(run, 22))
    for name, value in ck.model_state.items():  # a tracked length: the snapshot's average itself
        assert torch.allclose(value, snapshot[f"avg1.{name}"], atol=1e-5), name
    assert ck.ema_state is None and ck.step == 22 and ck.config == load_checkpoint(res.checkpoint).config
    meta = json.loads(read_header(out).metadata["posthoc_ema"])
    assert meta["length"] == 0.1 and meta["step"] == 22 and meta["fit_error"] < 1e-3

    grid = tmp_path / "g.png"
    ok("sample", out, "-n", "4", "--steps", "3", "--grid", grid)
    assert grid.exists()
    shown = ok("inspect", out).stdout
    assert "relative length 0.1 at step 22, from 10 stored averages" in shown and "post-hoc EMA weights" in shown
    listing = ok("inspect", run).stdout
    assert "post-hoc EMA: 5 snapshots of the lengths 0.05, 0.1 (steps 5 to 22)" in listing
    listed = json.loads(ok("inspect", run, "--json").stdout)["posthoc_ema_snapshots"]
    assert [x["step"] for x in listed] == [5, 10, 15, 20, 22]

    # several lengths at once (a repeated one made once), at an earlier step given by its checkpoint, named from
    # inside its folder, each to its default path
    monkeypatch.chdir(run / "checkpoints")
    r = ok("ema", "ckpt-00000010.safetensors", "-l", "0.07", "-l", "0.12", "-l", "0.07")
    assert r.stdout.count("wrote ") == 2
    for length in ("0.07", "0.12"):
        path = run / "ema" / f"ckpt-00000010-length{length}.safetensors"
        assert path.exists() and load_checkpoint(path).step == 10


def test_ema_refuses_bad_input_in_one_line(tmp_path):
    res = _posthoc_run(tmp_path, train__steps=10)
    run = res.run_dir
    assert "[0.001, 0.28]" in one_line_error(cli("ema", run, "--length", "0.5"), code=(2,))
    assert "no post-hoc EMA snapshot at step 7" in one_line_error(cli("ema", run, "-l", "0.1", "--step", "7"))
    assert "exactly one --length" in one_line_error(cli("ema", run, "-l", "0.1", "-l", "0.2", "-o", tmp_path / "x"))
    # -o avgs/ for a folder not made yet wrote a FILE named avgs (Path("avgs/") is Path("avgs"))
    msg = one_line_error(cli("ema", run, "-l", "0.1", "-o", f"{tmp_path / 'avgs'}/"), code=(2,))
    assert "names a folder" in msg and f"such as {tmp_path / 'avgs' / 'ema.safetensors'}" in msg, msg
    assert not (tmp_path / "avgs").exists()
    ok("ema", run, "-l", "0.1")
    assert "--overwrite" in one_line_error(cli("ema", run, "-l", "0.1"), code=(2,))
    ok("ema", run, "-l", "0.1", "--overwrite")
    # every output is checked before any is written: 0.07's file does not appear when 0.1's is in the way
    assert "--overwrite" in one_line_error(cli("ema", run, "-l", "0.07", "-l", "0.1"), code=(2,))
    assert not (run / "ema" / "ckpt-00000010-length0.07.safetensors").exists()
    # two lengths whose default files have one name: the second average would replace the first unasked
    msg = one_line_error(cli("ema", run, "-l", "0.06", "-l", "0.06000001"), code=(2,))
    assert "would both write" in msg and not (run / "ema" / "ckpt-00000010-length0.06.safetensors").exists()
    assert "neither a run directory" in one_line_error(cli("ema", tmp_path / "nothing"), code=(2,))
    ckpt = run / "checkpoints" / "ckpt-00000010.safetensors"  # a resume would go on from the average
    before = ckpt.read_bytes()
    state = ckpt.with_name("ckpt-00000010.state.safetensors")
    for target in (ckpt, state):
        msg = one_line_error(cli("ema", run, "-l", "0.1", "-o", target, "--overwrite"), code=(2,))
        assert "training checkpoint" in msg
    assert ckpt.read_bytes() == before
    # the run's own files, the command's input among them, are never an output, --overwrite or not
    for target in (snapshot_path(run, 10), run / "config.yaml", run / "metrics.jsonl"):
        before = target.read_bytes()
        msg = one_line_error(cli("ema", run, "-l", "0.1", "-o", target, "--overwrite"), code=(2,))
        assert "one of the run's own files" in msg and target.read_bytes() == before
    # nor a new file named as one: a snapshot or checkpoint name the run would then read (and refuse, or resume
    # from), or its pointer
    for target in (snapshot_path(run, 99), run / "checkpoints" / "ckpt-00000099.safetensors", run / "latest.json"):
        if target.exists():
            target.unlink()
        msg = one_line_error(cli("ema", run, "-l", "0.1", "-o", target), code=(2,))
        assert "one of the run's own files" in msg and not target.exists(), msg
    assert "snapshots of the lengths" in ok("ema", run / "checkpoints").stdout  # the folder stands for the run
    ok("ema", run, "-l", "0.1", "-o", tmp_path / "avg.pt")  # another name: written, and again with --overwrite
    ok("ema", run, "-l", "0.1", "-o", tmp_path / "avg.pt", "--overwrite")
    # a length the snapshots cannot resolve is written, with a warning that says so
    assert "resolve length 0.002 poorly" in ok("ema", run, "-l", "0.002").stderr
    plain = train(tiny_config(tmp_path / "plain", train__steps=2))
    assert "holds no post-hoc EMA snapshots" in one_line_error(cli("ema", plain.run_dir, "-l", "0.1"))
    assert "no post-hoc EMA snapshots" in ok("ema", plain.run_dir).stdout
    photos = tmp_path / "photos"  # a folder that is no run: refused, not listed as a run without snapshots
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    for extra in ([], ["-l", "0.1"]):
        assert "is no run directory" in one_line_error(cli("ema", photos, *extra), code=(1,))


def test_a_resume_from_an_earlier_checkpoint_drops_the_later_snapshots(tmp_path):
    """A resume from step 10 of a run that went on to 22 replaces steps 11-22: their snapshots must not be mixed
    into a reconstruction of the new continuation."""
    res = _posthoc_run(tmp_path, train__steps=22)
    again = train(tiny_config(tmp_path, train__steps=13, train__posthoc_ema=[0.05, 0.1], train__posthoc_ema_every=5,
                              logging__checkpoint_every=10),
                  resume=res.run_dir / "checkpoints" / "ckpt-00000010.safetensors")
    assert again.step == 13 and [s.step for s in list_snapshots(res.run_dir)] == [5, 10, 13]
    assert "at step 13," in ok("ema", res.run_dir, "-l", "0.08").stdout


def test_a_resume_needs_the_same_lengths_and_its_snapshot(tmp_path):
    from ddpm_cli.engine.runs import list_checkpoints

    res = _posthoc_run(tmp_path, train__steps=10)
    last = list_checkpoints(res.run_dir)[-1]
    with pytest.raises(CheckpointError, match=r"resume with --set train.posthoc_ema='\[0.05, 0.1\]'"):
        train(tiny_config(tmp_path, train__steps=12, train__posthoc_ema=[0.05, 0.2]), resume=last)
    snapshot_path(res.run_dir, 10).unlink()
    with pytest.raises(CheckpointError, match="snapshot-00000010.safetensors is missing"):
        train(tiny_config(tmp_path, train__steps=12, train__posthoc_ema=[0.05, 0.1]), resume=last)
    # the way out the message names: resume without tracking
    assert train(tiny_config(tmp_path, train__steps=12, train__posthoc_ema=[]), resume=last).step == 12


@pytest.mark.parametrize("value,problem", [("[0.5]", "must be in [0.001, 0.28]"),
                                           ("[0.1, 0.1]", "must not repeat a length")])
def test_the_config_refuses_bad_lengths(tmp_path, value, problem):
    from ddpm_cli.config import load_config
    from ddpm_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.posthoc_ema={value}"])
    assert any(problem in p for p in e.value.problems) or problem in str(e.value)


@pytest.mark.parametrize("target", ["snapshot", "folder"])
def test_a_snapshot_where_a_checkpoint_goes_says_how_to_make_one(tmp_path, target):
    """A snapshot (or the run's ema/ folder of them) given to sample, eval, export, a resume or --guide-model said it
    "has no readable stored config ... use another checkpoint" (the folder: "holds no checkpoints"): `ddpm ema`
    makes a checkpoint of them."""
    run = _posthoc_run(tmp_path, train__steps=10).run_dir
    given = snapshot_path(run, 10) if target == "snapshot" else run / "ema"
    out = tmp_path / "out"
    for args in (["sample", given, "-n", 1, "--out", out], ["eval", given, "--ref", given, "-n", 1],
                 ["export", given, "--out", out / "m.onnx"], ["train", "--resume", given],
                 ["sample", run, "--guide-model", given, "-n", 1, "--out", out]):
        msg = one_line_error(cli(*args), code=(1,))
        assert "post-hoc EMA snapshot" in msg and f"ddpm ema {run} --length L" in msg, (args, msg)
        assert "use another checkpoint" not in msg and "holds no checkpoints" not in msg, msg
    assert not out.exists()


def test_ema_takes_the_snapshot_folder_or_a_snapshot_for_its_run(tmp_path):
    """`ddpm ema RUN/ema` looked for RUN/ema/ema: it listed no snapshots, and with --length refused a run it took to
    have none."""
    run = _posthoc_run(tmp_path, train__steps=10).run_dir
    assert "2 snapshots of the lengths 0.05, 0.1" in ok("ema", run / "ema").stdout
    ok("ema", run / "ema", "-l", "0.08")
    assert (run / "ema" / "ckpt-00000010-length0.08.safetensors").is_file() and not (run / "ema" / "ema").exists()
    ok("ema", snapshot_path(run, 5), "-l", "0.08")  # a snapshot: its run, and its step as the default
    assert load_checkpoint(run / "ema" / "ckpt-00000005-length0.08.safetensors").step == 5
