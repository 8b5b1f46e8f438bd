"""Training that survives (issue 4): exact resume, SIGTERM/SIGINT, kill -9 at any moment, keep_last, non-finite
steps, a full disk. CPU only, tiny models; the signal tests run `python -m ddpm_cli train` in subprocesses."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, tiny_config, tiny_overrides, write_yaml
from ddpm_cli.engine.checkpoint import load_checkpoint, load_state, read_header, read_tensors
from ddpm_cli.engine.posthoc_ema import snapshot_path
from ddpm_cli.engine.runs import latest_checkpoint, list_checkpoints, state_path
from ddpm_cli.engine.train import Trainer, train
from ddpm_cli.errors import DdpmError, TrainingAborted

SUBPROCESS_TIMEOUT = 120


# ----------------------------------------------------------------------------------------------------------
# helpers


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            out.append(rec)
    return out


def _losses(run_dir: Path) -> dict[int, float | None]:
    return {r["step"]: r["loss"] for r in _metrics(run_dir)}


def _assert_loadable(weights: Path) -> tuple:
    """read_header + load_checkpoint + load_state all succeed, tensors finite; returns (ckpt, state json)."""
    header = read_header(weights)
    ck = load_checkpoint(weights)
    tensors, state, _ = load_state(weights)
    assert int(header.metadata["step"]) == ck.step == int(state["step"])
    for name, t in {**ck.model_state, **(ck.ema_state or {})}.items():
        assert torch.isfinite(t).all(), f"{weights}: {name} is not finite"
    return ck, state


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: tensor {k} differs"


def _no_tmp_is_a_checkpoint(run_dir: Path) -> None:
    for p in list_checkpoints(run_dir):
        assert re.fullmatch(r"ckpt-\d{8}\.safetensors", p.name), p
        assert "tmp" not in p.name
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        assert "tmp" not in latest.name and not latest.name.startswith(".")


class TrainProcess:
    """`python -m ddpm_cli train` (or a patched driver) in a subprocess, output to files (no pipe can fill)."""

    def __init__(self, tmp_path: Path, cfg: dict | None, *extra: str, driver: str | None = None,
                 driver_args: tuple[str, ...] = (), run_dir: Path | None = None, tag: str = ""):
        self.tmp = tmp_path
        if cfg is not None:
            self.run_dir = Path(cfg["logging"]["run_dir"]) / cfg["logging"]["run_name"]
            config = write_yaml(tmp_path / "cfg.yaml", cfg)
            args = ["train", "--config", str(config), *extra]
        else:  # e.g. ("--resume", RUN_DIR, "--set", ...)
            self.run_dir = run_dir
            args = ["train", *extra]
        if driver is None:
            cmd = [sys.executable, "-m", "ddpm_cli", *args]
        else:
            cmd = [sys.executable, "-c", driver, *driver_args, *args]
        self.out_path, self.err_path = tmp_path / f"stdout{tag}.txt", tmp_path / f"stderr{tag}.txt"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._out, stderr=self._err, env=env)

    def output(self) -> str:
        self._out.flush(), self._err.flush()
        return self.out_path.read_text() + "\n" + self.err_path.read_text()

    def wait_for(self, predicate, what: str, timeout: float = SUBPROCESS_TIMEOUT) -> None:
        t0 = time.monotonic()
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"training exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = SUBPROCESS_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"training did not exit within {timeout} s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._out.close(), self._err.close()


@pytest.fixture
def procs():
    started: list[TrainProcess] = []
    yield started
    for p in started:
        p.close()


def _sub_cfg(tmp_path: Path, **extra) -> dict:
    base = dict(train__steps=5000, logging__log_every=1, logging__checkpoint_every=100000,
                logging__sample_every=100000)
    base.update(extra)
    return tiny_overrides(tmp_path / "runs", **base)


def _cli_resume(target: str | Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "ddpm_cli", "train", "--resume", str(target)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


# ----------------------------------------------------------------------------------------------------------
# 1. exact resume


EXACT = dict(train__steps=12, logging__log_every=1, logging__checkpoint_every=100, logging__sample_every=3,
             data__shapes_count=64, model__dropout=0.1)


@pytest.mark.parametrize("variant", ["unconditional", "conditional-adamw-emawarmup", "grad-accum",
                                     "checkpointing", "max-time"])
def test_exact_resume_gives_identical_losses_and_weights(tmp_path, variant):
    extra = dict(EXACT)
    if variant == "grad-accum":  # 4 micro-batches a step, each drawing its own dropout
        extra.update(train__grad_accum=4)
    elif variant == "max-time":  # the closing grid's cost is timed after each process's first step: on its noise
        extra.update(train__max_time=1000.0)
    elif variant == "checkpointing":  # the recompute replays dropout's RNG, which must not shift the stream
        extra.update(model__checkpointing=True, train__grad_accum=2)
    elif variant != "unconditional":
        extra.update(model__conditional=True, train__label_dropout=0.3, train__ema_warmup=True,
                     train__optimizer="adamw", train__weight_decay=0.01, train__ema_extra=[0.5],
                     train__posthoc_ema=[0.05, 0.2])
    full = train(tiny_config(tmp_path / "a", **extra))
    # 64 images / batch 16: 4 steps an epoch, so step 6 stops mid-epoch and the resumed part crosses epochs
    first = train(tiny_config(tmp_path / "b", **{**extra, "train__steps": 6}))
    assert first.step == 6
    resumed = train(tiny_config(tmp_path / "b", **extra), resume=list_checkpoints(first.run_dir)[-1])
    assert resumed.step == 12 and resumed.run_dir == first.run_dir

    want, got = _losses(full.run_dir), _losses(resumed.run_dir)
    assert sorted(want) == list(range(1, 13))
    for step in range(7, 13):
        assert got[step] == want[step], f"step {step}: resumed loss {got[step]} != uninterrupted {want[step]}"

    a = load_checkpoint(full.run_dir / "checkpoints" / "ckpt-00000012.safetensors")
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "ckpt-00000012.safetensors")
    _assert_same_tensors(a.model_state, b.model_state, "model weights")
    assert a.ema_state is not None and b.ema_state is not None
    _assert_same_tensors(a.ema_state, b.ema_state, "EMA weights")
    if variant.startswith("conditional"):  # train.ema_extra's averages resume exactly too
        assert list(a.extra_ema) == list(b.extra_ema) == [0.5]
        _assert_same_tensors(a.extra_ema[0.5], b.extra_ema[0.5], "extra EMA weights")
        # and the post-hoc averages, whose snapshot at the resumed step they were read back from
        _assert_same_tensors(read_tensors(snapshot_path(full.run_dir, 12)),
                             read_tensors(snapshot_path(resumed.run_dir, 12)), "post-hoc EMA averages")
    # the training state too: optimizer moments, step counts and the RNG stream
    ta, sa, ga = load_state(a.path)
    tb, sb, gb = load_state(b.path)
    _assert_same_tensors(ta, tb, "training state")
    assert sa == sb and ga == gb


def test_a_resume_logs_the_same_mean_loss_as_the_uninterrupted_run_between_log_lines(tmp_path):
    """A checkpoint between two log lines did not keep the steps counted since the last one: the resumed run's next
    line averaged only its own steps (and a non-finite step before the checkpoint went uncounted)."""
    from ddpm_cli.engine.train import StopFlag, TrainCallbacks

    extra = {**EXACT, "logging__log_every": 4, "train__steps": 8}
    full = train(tiny_config(tmp_path / "a", **extra))
    stop, cb = StopFlag(), TrainCallbacks()
    cb.on_step = lambda step: stop.request(15) if step == 6 else None  # SIGTERM after step 6: no log line there
    first = Trainer(tiny_config(tmp_path / "b", **extra), stop=stop, callbacks=cb)
    with pytest.raises(TrainingAborted):
        try:
            first.run()
        finally:
            first.close()
    assert sorted(_losses(first.run_dir)) == [4]
    resumed = train(tiny_config(tmp_path / "b", **extra), resume=list_checkpoints(first.run_dir)[-1])
    want, got = _losses(full.run_dir), _losses(resumed.run_dir)
    assert sorted(want) == sorted(got) == [4, 8] and got[8] == want[8], (got, want)


def _assert_moments_follow_their_parameters(opt: torch.optim.Optimizer) -> int:
    """Every restored optimizer tensor shaped like its parameter has that parameter's dtype, device and strides
    (CUDA's fused Adam refuses anything else); returns how many were checked."""
    checked = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for name, v in opt.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    assert (v.dtype, v.device, v.stride()) == (p.dtype, p.device, p.stride()), \
                        f"{name} of a {tuple(p.shape)} parameter: {v.dtype} {v.stride()} vs {p.dtype} {p.stride()}"
                    checked += 1
    return checked


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_resume_restores_optimizer_state_in_each_parameters_layout(tmp_path, optimizer):
    """The CUDA default is channels-last: a resume must hand the fused optimizer moments laid out like their
    (channels-last) parameters. The CPU's fused Adam tolerates a mismatch, so check the layouts themselves."""
    extra = dict(EXACT, train__channels_last="on", train__optimizer=optimizer, train__ema_extra=[0.5],
                 train__guide_step=3)
    first = train(tiny_config(tmp_path, **{**extra, "train__steps": 6}))
    trainer = Trainer(tiny_config(tmp_path, **extra), resume=list_checkpoints(first.run_dir)[-1])
    assert trainer.channels_last and trainer.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert _assert_moments_follow_their_parameters(trainer.opt) == 2 * len(list(trainer.model.parameters()))
    res = trainer.run()
    assert res.step == 12 and _assert_moments_follow_their_parameters(trainer.opt)


def test_resume_matches_ema_averages_by_decay_when_their_roles_swap(tmp_path):
    extra = dict(EXACT, train__ema_decay=0.9, train__ema_extra=[0.3])
    full = train(tiny_config(tmp_path / "a", **extra))
    first = train(tiny_config(tmp_path / "b", **{**extra, "train__steps": 6}))
    swapped = dict(extra, train__ema_decay=0.3, train__ema_extra=[0.9])  # 0.3 is now the main average
    resumed = train(tiny_config(tmp_path / "b", **swapped), resume=list_checkpoints(first.run_dir)[-1])
    a = load_checkpoint(full.run_dir / "checkpoints" / "ckpt-00000012.safetensors")
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "ckpt-00000012.safetensors")
    _assert_same_tensors(a.extra_ema[0.3], b.ema_state, "the 0.3 average")
    _assert_same_tensors(a.ema_state, b.extra_ema[0.9], "the 0.9 average")


def test_a_resume_that_cannot_start_keeps_the_later_snapshots_and_metrics(tmp_path, monkeypatch):
    """A resume from an earlier checkpoint drops the post-hoc EMA snapshots and metrics records after its step (the
    continuation it replaces), and did so while it was being set up: one that then failed to start (wandb without a
    login, say) had removed them for nothing, and the run no longer resumed from its latest checkpoint."""
    from ddpm_cli.engine import train as train_module
    from ddpm_cli.engine.posthoc_ema import list_snapshots

    extra = dict(EXACT, train__posthoc_ema=[0.1], logging__checkpoint_every=6)
    run = train(tiny_config(tmp_path, **extra)).run_dir
    records = (run / "metrics.jsonl").read_text()

    def no_login(*args, **kwargs):
        raise DdpmError("wandb: No API key configured; run `wandb login`, or set logging.wandb=off")

    monkeypatch.setattr(train_module, "WandbSink", no_login)
    with pytest.raises(DdpmError, match="wandb"):
        Trainer(tiny_config(tmp_path, **extra, logging__wandb="offline"),
                resume=run / "checkpoints" / "ckpt-00000006.safetensors")
    assert [s.step for s in list_snapshots(run)] == [6, 12] and (run / "metrics.jsonl").read_text() == records
    monkeypatch.undo()
    assert train(tiny_config(tmp_path, **{**extra, "train__steps": 14}), resume=list_checkpoints(run)[-1]).step == 14


def test_pruning_keeps_the_checkpoint_just_written_beside_a_later_weights_file_without_state(tmp_path):
    """A save that failed at its training state (a full disk) left later weights without a state; a resume from
    an earlier checkpoint then pruned by step and removed the checkpoint it had just written and reported, and the
    next resume failed. Pruning weighs only complete checkpoints up to the run's step, never the one just written;
    and a save that fails at its state takes its weights away."""
    import shutil

    from ddpm_cli.engine import train_state

    cfg = dict(train__steps=5, logging__keep_last=1, logging__checkpoint_every=5, logging__sample_every=1000)
    run = train(tiny_config(tmp_path, **cfg)).run_dir
    shutil.copy(run / "checkpoints" / "ckpt-00000005.safetensors", run / "checkpoints" / "ckpt-00000010.safetensors")
    res = train(tiny_config(tmp_path, **{**cfg, "train__steps": 7}), resume=latest_checkpoint(run))
    assert res.step == 7 and latest_checkpoint(run).name == "ckpt-00000007.safetensors"
    assert state_path(latest_checkpoint(run)).exists()
    assert train(tiny_config(tmp_path, **{**cfg, "train__steps": 8}), resume=latest_checkpoint(run)).step == 8

    trainer = Trainer(tiny_config(tmp_path / "full", **cfg))
    trainer.run()
    real = train_state.ckpt_io.save_state

    def disk_full(*args, **kwargs):
        raise DdpmError("cannot write the training state: the disk is full")

    train_state.ckpt_io.save_state = disk_full
    try:
        trainer.step = 9
        with pytest.raises(DdpmError, match="disk is full"):
            trainer.save_checkpoint()
    finally:
        train_state.ckpt_io.save_state = real
        trainer.close()
    assert not (trainer.run_dir / "checkpoints" / "ckpt-00000009.safetensors").exists()


def test_a_resume_takes_the_optimizer_settings_it_is_given(tmp_path):
    """The optimizer's state was loaded with its saved settings, which replaced the config's: a resume with --set
    train.weight_decay (or adam_betas, or adamw) trained with the old ones while its checkpoints said the new."""
    extra = dict(EXACT)
    first = train(tiny_config(tmp_path, **{**extra, "train__steps": 6}))
    cfg = tiny_config(tmp_path, **{**extra, "train__optimizer": "adamw", "train__weight_decay": 0.05,
                                   "train__adam_betas": [0.5, 0.9]})
    trainer = Trainer(cfg, resume=list_checkpoints(first.run_dir)[-1])
    try:
        group = trainer.opt.param_groups[0]
        assert group["weight_decay"] == 0.05 and tuple(group["betas"]) == (0.5, 0.9)
        assert trainer.opt.state  # the moments themselves were kept
    finally:
        trainer.close()


def test_a_resume_on_a_training_set_of_another_size_says_the_order_changed(tmp_path):
    """The data position is (epoch, position) in an order drawn for the set's size: a resume on a folder that gained
    or lost images went on silently in another order (and epoch), no longer the run it resumed."""
    from ddpm_cli.engine.train import TrainCallbacks

    first = train(tiny_config(tmp_path, train__steps=4, logging__checkpoint_every=4))
    ckpt = list_checkpoints(first.run_dir)[-1]
    for count, changed in ((256, False), (200, True)):
        warned = []
        cb = TrainCallbacks()
        cb.on_warning = warned.append
        trainer = Trainer(tiny_config(tmp_path, data__shapes_count=count), resume=ckpt, callbacks=cb)
        trainer.close()
        said = [w for w in warned if "images" in w and "order" in w]
        assert bool(said) == changed, warned
    assert "200 images" in said[0] and "256" in said[0], said


def test_exact_resume_after_a_real_sigterm(tmp_path, procs):
    cfg = _sub_cfg(tmp_path, train__steps=30)  # checkpoint_every is huge: the only checkpoint is the signal's
    p = TrainProcess(tmp_path, cfg)
    procs.append(p)
    p.wait_for(lambda: len(_metrics(p.run_dir)) >= 2, "the second metrics line")
    p.signal(signal.SIGTERM)
    assert p.wait() == 143, p.output()
    ckpts = list_checkpoints(p.run_dir)
    assert len(ckpts) == 1, ckpts
    k = load_checkpoint(ckpts[0]).step
    assert 2 <= k < 30, "the run should have stopped early on SIGTERM"

    r = _cli_resume(p.run_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: step 30" in r.stdout

    base = train(tiny_config(tmp_path / "baseline", **{"train__steps": 30, "logging__log_every": 1,
                                                       "logging__checkpoint_every": 100000,
                                                       "logging__sample_every": 100000}))
    want, got = _losses(base.run_dir), _losses(p.run_dir)
    assert sorted(got) == list(range(1, 31)), "each step logged exactly once across the stop and the resume"
    for step in range(k + 1, 31):
        assert got[step] == want[step], f"step {step}: resumed loss {got[step]} != uninterrupted {want[step]}"
    a = load_checkpoint(base.run_dir / "checkpoints" / "ckpt-00000030.safetensors")
    b = load_checkpoint(p.run_dir / "checkpoints" / "ckpt-00000030.safetensors")
    _assert_same_tensors(a.model_state, b.model_state, "model weights")
    _assert_same_tensors(a.ema_state, b.ema_state, "EMA weights")


# ----------------------------------------------------------------------------------------------------------
# 2. SIGTERM / SIGINT


# 128 + the signal's number, the shell's convention for a process a signal stopped
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_finishes_the_step_checkpoints_and_exits(tmp_path, procs, signum, code):
    p = TrainProcess(tmp_path, _sub_cfg(tmp_path))
    procs.append(p)
    p.wait_for(lambda: len(_metrics(p.run_dir)) >= 1, "the first metrics line")
    p.signal(signum)
    rc = p.wait()
    out = p.output()
    assert rc == code, out
    assert "Traceback" not in out
    pointer = json.loads((p.run_dir / "latest.json").read_text())
    k = pointer["step"]
    # the message says why it stopped, at which step, and how to continue
    assert re.search(rf"signal {int(signum)}\b.*step {k}\b", out), out
    assert f"--resume {p.run_dir}" in out, out
    # the step in flight was finished: every logged step is in the checkpoint
    assert max(r["step"] for r in _metrics(p.run_dir)) == k
    weights = p.run_dir / pointer["weights"]
    assert weights.name == f"ckpt-{k:08d}.safetensors"
    _assert_loadable(weights)
    _no_tmp_is_a_checkpoint(p.run_dir)


def test_a_signal_while_the_run_closes_ends_its_last_grid_and_exits_with_the_signal(tmp_path, procs):
    """After its last checkpoint a run draws a sample grid; a SIGTERM then was ignored: the grid went on (minutes
    with many sampler steps) and the run exited 0, so a scheduler waited out its grace period and never learnt it
    was stopped. Now the grid stops at the sampler's next step and the run exits 143, its checkpoint whole."""
    p = TrainProcess(tmp_path, _sub_cfg(tmp_path, train__steps=2, diffusion__num_timesteps=4000,
                                        logging__sample_steps=3999, logging__sample_count=4))  # a long grid
    procs.append(p)
    p.wait_for(lambda: (p.run_dir / "latest.json").exists(), "the closing checkpoint")
    signalled = time.monotonic()
    p.signal(signal.SIGTERM)
    rc = p.wait()
    out = p.output()
    assert rc == 143 and time.monotonic() - signalled < 60, (rc, out)
    assert "Traceback" not in out and re.search(r"signal 15 while closing the run at step 2\b", out), out
    pointer = json.loads((p.run_dir / "latest.json").read_text())
    assert pointer["step"] == 2
    _assert_loadable(p.run_dir / pointer["weights"])
    assert not (p.run_dir / "samples" / "step_00000002.png").exists()  # the grid was left out, not half-written


NOHUP = """
import signal, sys
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
from ddpm_cli.cli.app import main
main()
"""


def test_a_run_started_under_nohup_goes_on_through_sighup(tmp_path, procs):
    p = TrainProcess(tmp_path, _sub_cfg(tmp_path), driver=NOHUP)
    procs.append(p)
    p.wait_for(lambda: len(_metrics(p.run_dir)) >= 1, "the first metrics line")
    p.signal(signal.SIGHUP)
    seen = len(_metrics(p.run_dir))
    p.wait_for(lambda: len(_metrics(p.run_dir)) >= seen + 20, "steps after SIGHUP")
    p.signal(signal.SIGTERM)
    assert p.wait() == 143, p.output()


def test_a_run_whose_stdout_reader_goes_away_trains_to_its_end(tmp_path):
    """`ddpm train ... | head -1`: the output has nowhere to go, but the run finishes and saves its checkpoint."""
    config = write_yaml(tmp_path / "cfg.yaml", _sub_cfg(tmp_path, train__steps=40))
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_cli", "train", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline()  # the first line, then the reader is gone
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    run = tmp_path / "runs" / "tiny"
    assert latest_checkpoint(run).name == "ckpt-00000040.safetensors"


# The driver makes writing the signal's checkpoint slow (as on a slow network disk), so the second Ctrl-C
# deterministically arrives while that checkpoint is being written.
SLOW_SIGNAL_CHECKPOINT = r"""
import os, re, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
sys.argv = [sys.argv[0]] + sys.argv[2:]
from ddpm_cli.engine import train as train_mod
signalled = []
real_request = train_mod.StopFlag.request
def request(self, signum):
    signalled.append(signum)
    return real_request(self, signum)
train_mod.StopFlag.request = request
real_replace = os.replace
def slow_replace(src, dst, *a, **k):
    if signalled and re.search(r"ckpt-\d+\.safetensors$", os.fspath(dst)):
        marker.write_text(os.fspath(dst))
        time.sleep(60)
    return real_replace(src, dst, *a, **k)
os.replace = slow_replace
from ddpm_cli.cli.app import main
main()
"""


def test_second_ctrl_c_exits_at_once_and_keeps_the_last_good_checkpoint(tmp_path, procs):
    marker = tmp_path / "writing-signal-checkpoint"
    p = TrainProcess(tmp_path, _sub_cfg(tmp_path, logging__checkpoint_every=5), driver=SLOW_SIGNAL_CHECKPOINT,
                     driver_args=(str(marker),))
    procs.append(p)
    p.wait_for(lambda: (p.run_dir / "latest.json").exists() and len(_metrics(p.run_dir)) >= 6,
               "the first checkpoint and a step after it")
    complete = {c: _sha(c) for c in list_checkpoints(p.run_dir)}
    p.signal(signal.SIGINT)
    p.wait_for(marker.exists, "the signal checkpoint to start")
    t0 = time.monotonic()
    p.signal(signal.SIGINT)
    rc = p.wait(timeout=30)
    assert rc == 130, p.output()
    assert time.monotonic() - t0 < 10, "the second Ctrl-C must not wait for the checkpoint"
    assert "Traceback" not in p.output()
    interrupted = Path(marker.read_text())
    if interrupted in complete:  # the stop fell on a step that already had its checkpoint: it is untouched
        assert _sha(interrupted) == complete[interrupted]
    else:
        assert not interrupted.exists(), "the checkpoint being written when aborted must not appear complete"
    for c, digest in complete.items():
        if c.exists():
            assert _sha(c) == digest
    last = latest_checkpoint(p.run_dir)
    assert last is not None and last in complete
    _assert_loadable(last)
    _no_tmp_is_a_checkpoint(p.run_dir)


# ----------------------------------------------------------------------------------------------------------
# 3. kill -9


def _latest_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_at_several_points_then_resume(tmp_path, procs):
    """kill -9 at three moments (the first one in a fresh run, the others in resumed runs); after each the
    latest checkpoint loads, and a final `--resume` reaches the target step."""
    cfg = _sub_cfg(tmp_path, logging__checkpoint_every=1, logging__keep_last=2)
    p = TrainProcess(tmp_path, cfg)
    procs.append(p)
    run = p.run_dir
    k = 0
    for i, delay in enumerate((0.0, 0.45, 1.3)):
        if i:  # resume the killed run, with no end in sight
            p = TrainProcess(tmp_path, None, "--resume", str(run), run_dir=run, tag=str(i))
            procs.append(p)
        p.wait_for(lambda: _latest_step(run) > k, "a new checkpoint")
        time.sleep(delay)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(timeout=30)
        _no_tmp_is_a_checkpoint(run)
        last = latest_checkpoint(run)
        ck, _ = _assert_loadable(last)
        assert ck.step > k
        k = ck.step
    r = _cli_resume(run, f"train.steps={k + 3}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {last}" in r.stdout and f"done: step {k + 3}" in r.stdout, r.stdout
    ck2, _ = _assert_loadable(latest_checkpoint(run))
    assert ck2.step == k + 3


def test_a_second_train_into_a_running_run_is_refused_naming_its_pid(tmp_path, procs):
    """Two processes in one run folder mixed their checkpoints: a second `ddpm train` with the run's name, or a
    --resume of the run (--overwrite too) while it trains, is refused before it touches the folder, naming the first
    process; once that one is gone, even by kill -9, the run resumes (the lock dies with its process)."""
    from conftest import cli, ok, one_line_error

    cfg = _sub_cfg(tmp_path, logging__checkpoint_every=5, logging__keep_last=10**6)
    p = TrainProcess(tmp_path, cfg)
    procs.append(p)
    run = p.run_dir
    p.wait_for(lambda: _latest_step(run) >= 5, "the first checkpoint")
    first = run / "checkpoints" / "ckpt-00000005.safetensors"
    # (train.max_time: a second run that is let in ends soon, and the test fails instead of waiting for it)
    for args in (("--config", tmp_path / "cfg.yaml", "--set", "train.max_time=1"),
                 ("--resume", run, "--set", "train.max_time=1"),
                 ("--resume", first, "--overwrite", "--set", "train.max_time=1")):
        before = set(list_checkpoints(run))
        error = one_line_error(cli("train", *args))
        assert f"pid {p.proc.pid}" in error and str(run) in error, error
        # the fix: another name for a new run; a resume continues this run or none
        assert ("logging.run_name" in error) == (args[0] == "--config"), error
        assert before <= set(list_checkpoints(run)), "a refused --overwrite removed the running run's checkpoints"
    assert sorted(x.name for x in run.parent.iterdir()) == ["tiny"], "the second run went to a folder of its own"
    assert p.proc.poll() is None, p.output()
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(timeout=30)
    k = _latest_step(run)
    r = ok("train", "--resume", run, "--set", f"train.steps={k + 2}")
    assert f"done: step {k + 2}" in r.stdout


def test_the_api_holds_the_runs_lock_as_ddpm_train_does(tmp_path):
    """train() and Trainer lock the run as the command does: while another process holds the lock (here another open
    file of it, as that process has), a resume and a new run of the run's name are refused, naming its pid, and write
    nothing; close() releases it."""
    fcntl = pytest.importorskip("fcntl")
    from ddpm_cli.engine.runs import RUN_LOCK

    run = train(tiny_config(tmp_path, train__steps=2)).run_dir

    def files():
        return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != RUN_LOCK}

    with open(run / RUN_LOCK, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (raises if train() had kept it)
        other.truncate(0)
        other.write("4242\n")
        other.flush()
        before = files()
        with pytest.raises(DdpmError, match=rf"pid 4242\) is training in {re.escape(str(run))}; wait for it"):
            train(tiny_config(tmp_path, train__steps=4), resume=latest_checkpoint(run))
        with pytest.raises(DdpmError, match=r"pid 4242\).*another logging.run_name"):
            train(tiny_config(tmp_path, train__steps=4))
        assert files() == before and sorted(x.name for x in tmp_path.iterdir()) == ["tiny"]
    assert train(tiny_config(tmp_path, train__steps=4), resume=latest_checkpoint(run)).step == 4



def test_a_start_the_lock_refuses_leaves_the_folder_another_start_made_at_the_same_moment(tmp_path, monkeypatch):
    """Two starts into one new named folder within milliseconds: both see it missing and count it as theirs; the one
    the lock refuses must not take away the folder of the run that holds the lock."""
    from ddpm_cli.engine import runs, train as train_module

    fcntl = pytest.importorskip("fcntl")
    real, held = runs.make_run_dir, []

    def and_the_other_start_locks_it(cfg, name_hint, created=None):
        run_dir = real(cfg, name_hint, created)  # this start made it (it is in `created`)...
        other = open(run_dir / runs.RUN_LOCK, "a+")  # ...and the other start took the lock first
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (run_dir / "checkpoints" / "the-other-runs-file").write_text("x")
        held.append(other)
        return run_dir

    monkeypatch.setattr(train_module, "make_run_dir", and_the_other_start_locks_it)
    cfg = tiny_config(tmp_path, train__steps=2, logging__run_name="both")
    with pytest.raises(DdpmError, match="is training in"):
        train(cfg)
    assert (tmp_path / "both" / "checkpoints" / "the-other-runs-file").is_file()
    held[0].close()


# Pause at the N-th rename of one kind of file and leave a marker, so kill -9 lands exactly there.
PAUSE_AT_RENAME = r"""
import os, re, sys, time
from pathlib import Path
marker, pattern, nth = Path(sys.argv[1]), re.compile(sys.argv[2]), int(sys.argv[3])
sys.argv = [sys.argv[0]] + sys.argv[4:]
seen = [0]
real_replace = os.replace
def paused_replace(src, dst, *a, **k):
    if pattern.search(os.path.basename(os.fspath(dst))):
        seen[0] += 1
        if seen[0] == nth:
            marker.write_text(os.fspath(src))
            time.sleep(120)
    return real_replace(src, dst, *a, **k)
os.replace = paused_replace
from ddpm_cli.cli.app import main
main()
"""


@pytest.mark.parametrize("what,pattern", [("weights", r"^ckpt-\d+\.safetensors$"),
                                          ("state", r"^ckpt-\d+\.state\.safetensors$"),
                                          ("pointer", r"^latest\.json$")])
def test_kill_9_in_the_middle_of_a_checkpoint_write(tmp_path, procs, what, pattern):
    marker = tmp_path / "paused"
    cfg = _sub_cfg(tmp_path, logging__checkpoint_every=1, logging__keep_last=5)
    p = TrainProcess(tmp_path, cfg, driver=PAUSE_AT_RENAME, driver_args=(str(marker), pattern, "3"))
    procs.append(p)
    p.wait_for(marker.exists, f"the third {what} write")
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(timeout=30)
    tmp_file = Path(marker.read_text())
    assert tmp_file.exists(), "the scenario: a complete temporary file that was never renamed into place"
    _no_tmp_is_a_checkpoint(p.run_dir)
    last = latest_checkpoint(p.run_dir)
    ck, _ = _assert_loadable(last)
    assert ck.step == 2, "latest.json is written last, so it still names step 2"
    cfg5 = ck.config.model_copy(deep=True)
    cfg5.train.steps = 5
    res = train(cfg5, resume=last)
    assert res.step == 5 and res.run_dir == p.run_dir
    ck5, _ = _assert_loadable(latest_checkpoint(p.run_dir))
    assert ck5.step == 5


def test_temporary_files_are_never_taken_for_checkpoints(tmp_path, trained_run):
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    real = list_checkpoints(trained_run)[-1]
    (ckdir / "ckpt-00000002.safetensors").write_bytes(real.read_bytes())
    state_path(ckdir / "ckpt-00000002.safetensors").write_bytes(state_path(real).read_bytes())
    for junk in (".ckpt-00000009.safetensors.tmp-1234", "ckpt-00000009.safetensors.tmp",
                 "ckpt-00000010.safetensors.tmp-99", ".ckpt-00000011.state.safetensors.tmp-5",
                 ".latest.json.tmp-77", "ckpt-00000012.safetensors.partial"):
        (ckdir / junk).write_bytes(b"\0" * 10)
    (tmp_path / "run" / ".latest.json.tmp-77").write_text('{"weights": "checkpoints/ckpt-00000009.safetensors"}')
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt-00000002.safetensors"]
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-00000002.safetensors"


# ----------------------------------------------------------------------------------------------------------
# 4. keep_last


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_last_keeps_exactly_k_and_never_the_resumed_one(tmp_path, keep):
    cfg = tiny_config(tmp_path, train__steps=8, logging__checkpoint_every=1, logging__keep_last=keep,
                      logging__sample_every=1000, logging__log_every=4)
    res = train(cfg)
    names = [p.name for p in list_checkpoints(res.run_dir)]
    assert names == [f"ckpt-{s:08d}.safetensors" for s in range(9 - keep, 9)]
    states = sorted(p.name for p in (res.run_dir / "checkpoints").glob("*.state.safetensors"))
    assert states == [n.replace(".safetensors", ".state.safetensors") for n in names], "a state per checkpoint"
    assert not [p for p in (res.run_dir / "checkpoints").iterdir() if p.name.startswith(".")]

    resumed_from = list_checkpoints(res.run_dir)[0]  # the oldest kept one
    cfg2 = tiny_config(tmp_path, train__steps=14, logging__checkpoint_every=1, logging__keep_last=keep,
                       logging__sample_every=1000, logging__log_every=4)
    train(cfg2, resume=resumed_from)
    after = list_checkpoints(res.run_dir)
    assert resumed_from in after, "the checkpoint a run resumed from must never be deleted"
    _assert_loadable(resumed_from)
    others = [p.name for p in after if p != resumed_from]
    assert others == [f"ckpt-{s:08d}.safetensors" for s in range(15 - keep, 15)]


def _cli_train(*args):
    from ddpm_cli.cli.app import app

    return CliRunner().invoke(app, ["train", *[str(a) for a in args]])


def _files(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): _sha(p) for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_resume_from_an_earlier_checkpoint_is_refused_without_overwrite_and_touches_nothing(tmp_path):
    """Resuming from a checkpoint that is not the run's latest replaces what the run trained after it (later
    checkpoints, metrics, post-hoc EMA snapshots): one line that says so, exit 1, every file as it was; a
    resume that would train nothing (train.steps at the checkpoint's step) too."""
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__steps=12,
                                                         train__posthoc_ema=[0.1], train__posthoc_ema_every=3,
                                                         logging__checkpoint_every=6, logging__sample_every=1000))
    assert _cli_train("--config", cfg).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    before = _files(run)
    for steps in (12, 6):
        r = _cli_train("--resume", run / "checkpoints" / "ckpt-00000006.safetensors", "--set", f"train.steps={steps}")
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 1 and len(lines) == 1, (r.exit_code, r.output)
        assert "not the run's latest" in lines[0] and "ckpt-00000012" in lines[0] and "--overwrite" in lines[0]
        assert _files(run) == before


def test_a_resume_of_the_run_goes_on_past_a_save_that_kill_9_interrupted(tmp_path):
    """kill -9 between a checkpoint's weights and latest.json leaves a file past the run's latest: the run's own
    resume redoes that save (CI's kill -9 test landed there once and was refused as replacing later work)."""
    import shutil

    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__steps=6,
                                                         logging__checkpoint_every=6, logging__sample_every=1000))
    assert _cli_train("--config", cfg).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    shutil.copy(run / "checkpoints" / "ckpt-00000006.safetensors", run / "checkpoints" / "ckpt-00000007.safetensors")
    r = _cli_train("--resume", run, "--set", "train.steps=8")
    assert r.exit_code == 0, r.output
    assert "ckpt-00000006.safetensors" in r.stdout and latest_checkpoint(run).name == "ckpt-00000008.safetensors"
    assert load_checkpoint(latest_checkpoint(run)).step == 8


def test_a_resume_drops_a_metrics_line_that_is_not_utf8(tmp_path):
    """A line of metrics.jsonl that is not UTF-8 (a disk error, an editor's encoding) made every resume fail with a
    UnicodeDecodeError traceback; it is dropped, as a line cut by a crash is."""
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__steps=10,
                                                         logging__sample_every=1000))
    assert _cli_train("--config", cfg).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n")
    r = _cli_train("--resume", run, "--set", "train.steps=12")
    assert r.exit_code == 0, r.output
    text = (run / "metrics.jsonl").read_bytes().decode("utf-8")  # valid again
    assert "garbage" not in text and json.loads(text.splitlines()[-1])["step"] == 12


def test_a_resume_with_overwrite_replaces_the_later_checkpoints_and_keeps_the_one_it_writes(tmp_path):
    """With --overwrite the later checkpoints go first: keep_last then keeps the new branch's newest, which the
    closing line names and latest.json points at (it used to prune the checkpoint it had just written, as a
    stale later one ranked above it), and the next resume continues the new branch."""
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__steps=40, logging__keep_last=2,
                                                         logging__checkpoint_every=10, logging__sample_every=1000))
    assert _cli_train("--config", cfg).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    r = _cli_train("--resume", run / "checkpoints" / "ckpt-00000030.safetensors", "--set", "train.steps=35",
                   "--set", "logging.keep_last=1", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "removed the 1 checkpoint after ckpt-00000030.safetensors" in r.stderr
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000030.safetensors", "ckpt-00000035.safetensors"]
    assert "checkpoint " + str(run / "checkpoints" / "ckpt-00000035.safetensors") in r.stdout
    assert latest_checkpoint(run).name == "ckpt-00000035.safetensors"
    r = _cli_train("--resume", run, "--set", "train.steps=37")
    assert r.exit_code == 0 and latest_checkpoint(run).name == "ckpt-00000037.safetensors", r.output
    assert load_checkpoint(latest_checkpoint(run)).step == 37


def test_a_resume_with_overwrite_that_cannot_start_keeps_the_later_checkpoints(tmp_path, monkeypatch):
    """--overwrite removed the later checkpoints (and latest.json) before the trainer was built: a start that then
    failed (no such device, unreadable data) had trained nothing and lost them. They go only once it can train."""
    from ddpm_cli.engine import train as train_module

    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__steps=30,
                                                         logging__checkpoint_every=10, logging__sample_every=1000))
    assert _cli_train("--config", cfg).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    before = [p.name for p in list_checkpoints(run)]

    def cannot_start(self, cfg, **kwargs):
        raise DdpmError("train.device cuda requested but CUDA is not available here; set train.device=cpu")

    monkeypatch.setattr(train_module.Trainer, "_setup", cannot_start)
    r = _cli_train("--resume", run / "checkpoints" / "ckpt-00000010.safetensors", "--overwrite")
    assert r.exit_code == 1 and "CUDA is not available" in r.stderr and "removed" not in r.stderr, r.output
    assert [p.name for p in list_checkpoints(run)] == before and latest_checkpoint(run).name == before[-1]


def test_a_resume_refuses_a_logging_section_that_moves_the_run(tmp_path):
    """`--set logging.run_dir=...` at a resume is refused (the run goes on in its own folder), but `--set
    "logging={run_dir: ...}"` got past it, and the run's config.yaml and checkpoints then named another folder."""
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__steps=4,
                                                         logging__sample_every=1000))
    assert _cli_train("--config", cfg).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    for section in (f"logging={{run_dir: {tmp_path / 'elsewhere'}}}", "logging={run_name: other}"):
        r = _cli_train("--resume", run, "--set", "train.steps=6", "--set", section)
        assert r.exit_code == 2 and "its own folder" in r.stderr, r.output
    r = _cli_train("--resume", run, "--set", "train.steps=6", "--set", "logging={log_every: 2}")
    assert r.exit_code == 0, r.output  # a logging section that leaves the folder alone is taken


# ----------------------------------------------------------------------------------------------------------
# 5. non-finite loss or gradient


def _poison(trainer: Trainer, bad_steps, kind: str, snapshots: dict) -> None:
    """Make trainer.loss_fn non-finite (in the loss or only in the gradient) on the given 1-based steps."""
    real = trainer.loss_fn
    params = list(trainer.model.parameters())

    def loss_fn(x, y):
        step = trainer.step + 1
        snapshots[trainer.step] = [p.detach().clone() for p in params]
        loss = real(x, y)
        if step in bad_steps:
            if kind == "loss":
                return loss * float("nan")
            # finite loss, NaN gradient: d sqrt(u)/du at u = 0 is inf, times 0 is NaN
            return loss + 0.0 * torch.sqrt(params[0].abs().min() * 0.0)
        return loss

    trainer.loss_fn = loss_fn


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, kind):
    bad = {3, 7, 8}
    cfg = tiny_config(tmp_path, train__steps=12, train__max_nonfinite=3, logging__log_every=1,
                      logging__checkpoint_every=6, logging__sample_every=1000)
    trainer = Trainer(cfg)
    snaps: dict = {}
    _poison(trainer, bad, kind, snaps)
    res = trainer.run()
    assert res.step == 12 and res.stop_reason == "steps"
    recs = {r["step"]: r for r in res.metrics if "loss" in r}
    assert recs[12]["nonfinite"] == len(bad)
    for s in bad:
        assert recs[s]["loss"] is None, f"step {s} was non-finite; its loss must not be averaged in"
    assert all(recs[s]["loss"] is not None and math.isfinite(recs[s]["loss"]) for s in recs if s not in bad)
    # a skipped step leaves the weights exactly as they were
    for s in bad:
        before, after = snaps[s - 1], snaps[s]
        for a, b in zip(before, after):
            assert torch.equal(a, b), f"step {s} was non-finite but changed the weights"
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    for st in trainer.opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                assert torch.isfinite(v).all(), "optimizer moments were polluted by a skipped step"
    ck, state = _assert_loadable(res.checkpoint)
    assert state["nonfinite_total"] == len(bad)


@pytest.mark.parametrize("log_every", [1, 4])
def test_too_many_nonfinite_steps_in_a_row_abort_and_keep_the_last_good_checkpoint(tmp_path, log_every):
    cfg = tiny_config(tmp_path, train__steps=40, train__max_nonfinite=4, logging__log_every=log_every,
                      logging__checkpoint_every=5, logging__sample_every=1000)
    trainer = Trainer(cfg)
    _poison(trainer, set(range(8, 41)), "loss", {})
    with pytest.raises(TrainingAborted) as ei:
        trainer.run()
    msg = str(ei.value)
    steps = [int(s) for s in re.findall(r"step (\d+)", msg)]
    assert steps and any(11 <= s <= 12 for s in steps), f"the message must name the step: {msg}"
    assert "checkpoint" in msg
    assert ei.value.exit_code == 1
    run = trainer.run_dir
    last = latest_checkpoint(run)
    assert last is not None and str(last) in msg
    ck, _ = _assert_loadable(last)
    assert ck.step <= 12
    assert max(load_checkpoint(p).step for p in list_checkpoints(run)) <= 12, "no checkpoint after the abort"


def test_nonfinite_abort_through_the_cli_is_one_line_and_exit_1(tmp_path, monkeypatch):
    from ddpm_cli.cli.app import app

    real = Trainer._loss

    def nan_loss(self, x, y):
        return real(self, x, y) * float("nan")

    monkeypatch.setattr(Trainer, "_loss", nan_loss)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cfg = write_yaml(tmp_path / "c.yaml", tiny_overrides(tmp_path / "runs", train__max_nonfinite=3,
                                                         logging__log_every=1))
    r = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    # The command puts the caller's signal handlers back, also when it fails.
    assert {s: signal.getsignal(s) for s in before} == before
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1, (r.exception, r.output)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "step 3" in lines[0], r.stderr


# ----------------------------------------------------------------------------------------------------------
# 6. full disk, unwritable run directory


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("victim", ["weights", "state", "pointer"])
def test_full_disk_during_a_checkpoint_is_a_clear_error_and_the_previous_one_survives(tmp_path, monkeypatch,
                                                                                     victim):
    prefix = {"weights": ".ckpt-00000010.safetensors.tmp", "state": ".ckpt-00000010.state.safetensors.tmp",
              "pointer": ".latest.json.tmp"}[victim]
    real_fsync = os.fsync
    before: dict = {}

    def fsync(fd):
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = ""
        ckdir = tmp_path / "tiny" / "checkpoints"
        if name.startswith(prefix) and (victim != "pointer" or (ckdir / "ckpt-00000010.state.safetensors").exists()):
            if not before:
                before.update({p.name: _sha(p) for p in ckdir.glob("ckpt-00000005*")})
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    cfg = tiny_config(tmp_path, train__steps=10, logging__checkpoint_every=5, logging__sample_every=1000)
    with pytest.raises(DdpmError) as ei:
        train(cfg)
    monkeypatch.undo()
    msg = str(ei.value)
    assert "disk" in msg.lower(), msg
    run = tmp_path / "tiny"
    assert before, "the failure was injected"
    # the previous checkpoint: byte for byte as before, still the one latest.json names, loadable
    assert len(before) == 2, before
    for name, digest in before.items():
        assert _sha(run / "checkpoints" / name) == digest
    assert json.loads((run / "latest.json").read_text())["step"] == 5
    assert latest_checkpoint(run).name == "ckpt-00000005.safetensors"
    _assert_loadable(latest_checkpoint(run))
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name], "temporary files left behind"
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_run_dir_under_a_regular_file_is_one_clear_line(tmp_path):
    from ddpm_cli.cli.app import app

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    data = tiny_overrides(blocker / "runs")
    cfg = write_yaml(tmp_path / "c.yaml", data)
    r = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1, (r.exception, r.output)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "run directory" in lines[0] and str(blocker) in lines[0] and "logging.run_dir" in lines[0]


# ----------------------------------------------------------------------------------------------------------
# documentation


def test_readme_documents_reliability_and_exit_codes():
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    text = readme.read_text()
    m = re.search(r"^#+\s*Reliability\b(.*?)(?=^#+\s|\Z)", text, re.M | re.S)
    assert m, "README needs a 'Reliability' section (issue 4)"
    section = m.group(1)
    assert "143" in section and "130" in section, "document the exit codes of SIGTERM and Ctrl-C"
    assert "--resume" in section


def test_every_test_the_readme_names_for_a_promise_exists():
    """README's Reliability table maps each promise to tests; a renamed or deleted test must not leave it stale."""
    section = re.search(r"^## Reliability\n(.*?)(?=^## )", (ROOT / "README.md").read_text(), re.M | re.S).group(1)
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))
    assert len(named) >= 15 and named <= defined, sorted(named - defined)


def test_a_start_whose_run_lock_cannot_be_opened_takes_its_new_folder_away(tmp_path, monkeypatch):
    """Only a lock held by another start leaves the new folder in place (it is that start's run); a lock file that
    cannot be opened at all is this start's failure, and the folder it made goes with it."""
    from ddpm_cli.engine import runs, train as train_module

    pytest.importorskip("fcntl")
    real = runs.make_run_dir

    def with_a_lock_that_cannot_be_opened(cfg, name_hint, created=None):
        run_dir = real(cfg, name_hint, created)
        (run_dir / runs.RUN_LOCK).mkdir()  # open(".lock", "a+") fails: it is a directory
        return run_dir

    monkeypatch.setattr(train_module, "make_run_dir", with_a_lock_that_cannot_be_opened)
    with pytest.raises(DdpmError, match="cannot write to run directory"):
        train(tiny_config(tmp_path, train__steps=2, logging__run_name="mine"))
    assert not (tmp_path / "mine").exists()
