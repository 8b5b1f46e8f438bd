"""The GPU acceptance suite: every promise of README's Reliability section and every command, on CUDA with the
shipped defaults (bf16, channels-last graph, torch.compile with CUDA graphs, fused Adam), through the CLI as a
user runs it. Tiny models and short runs; `pytest -m gpu` runs it (skipped without a GPU).

`DDPM_GPU_SUITE_ON_CPU=1 pytest -m gpu tests/test_gpu_acceptance.py` runs the same flows on the CPU (the CUDA-only
assertions are skipped), to debug the suite itself without a GPU."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_overrides, write_yaml

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA and not os.environ.get("DDPM_GPU_SUITE_ON_CPU"),
                                                  reason="needs a CUDA GPU")]
TIMEOUT = 420  # one subprocess: torch's import, a cold compile of the tiny model's step, and its run


# ----------------------------------------------------------------------------------------------------------
# helpers


def gpu_config(tmp: Path, name: str, **extra) -> Path:
    """A tiny class-conditional config with the CUDA defaults (device, precision, compile, channels-last all
    `auto`; train.compile_ahead off, as tiny_overrides says why), written as YAML. Every run of the suite shares
    this network and batch, so after the first cold compile the others load the step from torch's compile cache."""
    base = dict(model__conditional=True, train__label_dropout=0.2, train__device="auto", train__steps=60,
                train__ema_decay=0.9, train__ema_extra=[0.99], train__guide_step=30, data__shapes_count=512,
                logging__run_name=name, logging__log_every=10, logging__checkpoint_every=30,
                logging__sample_every=10**6, logging__keep_last=2)
    return write_yaml(tmp / f"{name}.yaml", tiny_overrides(tmp, **{**base, **extra}))


def ddpm(*args, timeout: float = TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ddpm_cli", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert r.returncode == 0, f"ddpm {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-2000:]}\n" \
                                  f"{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    return r


def popen(tmp: Path, tag: str, *args) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{tag}.log"
    f = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "ddpm_cli", *map(str, args)], cwd=ROOT, stdout=f,
                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return p, log


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            out[rec["step"]] = rec["loss"]
    return out


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []
    return max(steps, default=0)


def wait_until(pred, proc: subprocess.Popen, log: Path, what: str, timeout: float = TIMEOUT) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (run / "checkpoints").glob("ckpt-*.safetensors")
                  if ".state." not in p.name)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# ----------------------------------------------------------------------------------------------------------
# training, stopping and resuming


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> Path:
    """`ddpm train` with the CUDA defaults: class-conditional with label dropout, an extra EMA, a stored guide.
    Trained once per session, also when pytest-xdist spreads the suite over workers (benchmarks/gpu_suite.sh):
    the first worker to take the lock trains it, the others wait and read it. Tests only read it."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    tmp, run = shared / "gpu-shared", shared / "gpu-shared" / "main"
    tmp.mkdir(exist_ok=True)
    with open(shared / "gpu-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tmp / "trained").exists():
            r = ddpm("train", "--config", gpu_config(tmp, "main"))
            if CUDA:
                assert "bf16" in r.stdout and "compil" in r.stdout, r.stdout[-2000:]
            assert "done: step 60" in r.stdout, r.stdout[-2000:]
            assert checkpoints(run) == [30, 60]
            (tmp / "trained").touch()
    return run


def test_training_with_the_cuda_defaults_learns_and_keeps_its_extras(cuda_run):
    from ddpm_cli.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(cuda_run / "checkpoints" / "ckpt-00000060.safetensors")
    assert ck.config.model.conditional and ck.guide_step == 30 and list(ck.extra_ema) == [0.99]
    for name, t in {**ck.model_state, **ck.ema_state, **ck.extra_ema[0.99], **ck.guide_state}.items():
        assert torch.isfinite(t).all(), name
    got = losses(cuda_run)
    assert got[60] < 0.8 * got[10], got
    assert (cuda_run / "samples" / "step_00000060.png").exists() and (cuda_run / "loss.png").exists()


@pytest.mark.slow
def test_resume_with_the_cuda_defaults_continues_the_loss_of_an_uninterrupted_run(cuda_run, tmp_path):
    """The crash of issue 19 (fused Adam refused the restored moments of channels-last weights). The resumed run
    draws the same data, noise and timesteps as one never stopped; CUDA kernels and bf16 are not bit-exact, so
    each logged loss (a mean over 10 steps) must agree within 10%."""
    import shutil

    run = shutil.copytree(cuda_run, tmp_path / "main")  # other tests read the shared run meanwhile
    ddpm("train", "--resume", run, "--set", "train.steps=90")
    whole = tmp_path / "whole"
    ddpm("train", "--config", gpu_config(tmp_path, "whole", train__steps=90))
    want, got = losses(whole), losses(run)
    for step in (70, 80, 90):
        assert abs(got[step] - want[step]) <= 0.1 * want[step], (step, got[step], want[step])
    # keep_last 2, and the checkpoint it resumed from is never deleted
    assert checkpoints(run) == [60, 90], checkpoints(run)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143_then_kill_9_then_resume(tmp_path):
    cfg = gpu_config(tmp_path, "stop", train__steps=10**6, logging__checkpoint_every=20, logging__log_every=5)
    run = tmp_path / "stop"
    p, log = popen(tmp_path, "first", "train", "--config", cfg)
    wait_until(lambda: last_step(run) >= 10, p, log, "training past its compiled first steps")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143, log.read_text()[-3000:]
    stopped = checkpoints(run)[-1]
    assert stopped >= 10 and "--resume" in log.read_text()

    p, log = popen(tmp_path, "second", "train", "--resume", run)
    wait_until(lambda: checkpoints(run)[-1] > stopped, p, log, "a checkpoint after the resume")
    p.kill()  # kill -9
    p.wait(timeout=60)
    killed_at = checkpoints(run)[-1]
    assert killed_at > stopped

    r = ddpm("train", "--resume", run, "--set", f"train.steps={killed_at + 10}")
    assert f"done: step {killed_at + 10}" in r.stdout, r.stdout[-2000:]
    assert len(checkpoints(run)) <= 3  # keep_last 2, plus the one it resumed from


@pytest.mark.slow
def test_compile_ahead_by_default_trains_eagerly_on_a_cold_cache_and_compiles_in_the_run_on_a_warm_one(tmp_path):
    """train.compile_ahead as shipped (auto). Cold caches: the first steps are eager, a helper process compiles the
    step (the run holding while it times kernels), and the run goes on with the compiled step loaded from the
    helper's entry. A second run of the same network and batch then finds that entry: no helper, every step
    compiled, from the cache."""
    import yaml

    def config(name: str, **extra) -> Path:  # the tests' config less its compile_ahead: the default
        path = gpu_config(tmp_path, name, logging__log_every=5, logging__checkpoint_every=10**6,
                          train__compile="auto" if CUDA else "on", **extra)
        raw = yaml.safe_load(path.read_text())
        del raw["train"]["compile_ahead"]
        return write_yaml(path, raw)

    run, log = tmp_path / "ahead", tmp_path / "ahead.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DDPM_COMPILE_CACHE_DIR": str(tmp_path / "cc"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    env.pop("DDPM_COMPILE_CACHE", None)
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "ddpm_cli", "train", "--config",
                              str(config("ahead", train__steps=10**6))], cwd=ROOT, stdout=f,
                             stderr=subprocess.STDOUT, env=env)
    wait_until(lambda: last_step(run) >= 5, p, log, "eager steps")
    said = "compiled steps from step "
    wait_until(lambda: said in log.read_text(), p, log, "the helper's compiled step")
    text = log.read_text()
    switch = int(text.split(said)[1].split()[0])
    wait_until(lambda: last_step(run) >= switch + 20, p, log, "compiled steps")
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "helper process" in text and switch > 5, text[-3000:]
    assert "helper failed" not in text and "Traceback" not in text, text[-3000:]
    assert "compile cache: loaded" in text, text[-3000:]  # the helper's entry, not a compile of its own
    held = float(text.split(" s held for its kernel timings")[0].rsplit("; ", 1)[1])
    if CUDA:
        assert held > 0, text[-3000:]  # inductor timed its kernels with the run waiting
    after = {s: v for s, v in losses(run).items() if s > switch}
    assert len(after) >= 4 and all(math.isfinite(v) for v in after.values()), after

    warm = subprocess.run([sys.executable, "-m", "ddpm_cli", "train", "--config",
                           str(config("warm", train__steps=12, train__guide_step=None))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    text = warm.stdout + warm.stderr
    assert warm.returncode == 0 and "done: step 12" in text, text[-3000:]
    assert "helper process" not in text and "the compile cache holds it" in text, text[-3000:]
    assert "compile cache: loaded" in text, text[-3000:]


def test_train_gpus_1_runs_through_the_launcher(tmp_path):
    cfg = gpu_config(tmp_path, "launched", train__steps=20, train__guide_step=None)
    r = ddpm("train", "--config", cfg, "--gpus", "1")
    assert "done: step 20" in r.stdout, r.stdout[-2000:]
    assert checkpoints(tmp_path / "launched")[-1] == 20


def _trainer(tmp: Path, name: str, **extra):
    from conftest import tiny_config
    from ddpm_cli.engine.train import Trainer

    opts = dict(model__conditional=True, train__label_dropout=0.2, train__ema_decay=0.9, logging__run_name=name,
                logging__log_every=1, logging__checkpoint_every=10**6, logging__sample_every=10**6,
                data__shapes_count=512, train__device="auto")
    trainer = Trainer(tiny_config(tmp, **{**opts, **extra}))
    if CUDA:
        assert trainer.bf16 and trainer.compiled and trainer.channels_last and trainer.fused
    return trainer


TIB64 = 1 << 46  # bytes no card holds: a real CUDA out-of-memory error


def _run_closed(trainer, eager):
    """The trainer's run with `eager` as its step's loss (until a compiled step is made of it), then closed."""
    trainer._loss = trainer.loss_fn = eager
    try:
        return trainer.run()
    finally:
        trainer.close()


@pytest.mark.skipif(not CUDA, reason="cuDNN")
def test_compile_aheads_eager_convolutions_leave_cudnns_search_to_the_compiled_steps(monkeypatch):
    """torch keeps one cuDNN pick per convolution, searched or not, under a key without `benchmark`: the eager
    steps' unsearched picks (compile_ahead.eager_cudnn) must not stand in for the compiled step's search. A search
    launches many kernels, a kept pick one or a few."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ddpm_cli.engine.compile_ahead import eager_cudnn

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # the compiled step's (train.cudnn_benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    cl, dev = torch.channels_last, torch.device("cuda")  # a shape no other test runs
    x = torch.randn(3, 40, 23, 23, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl).requires_grad_()
    w = torch.randn(40, 40, 3, 3, device=dev, dtype=torch.bfloat16).contiguous(memory_format=cl).requires_grad_()

    def kernels() -> int:  # forward and backward: three convolutions
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)

    with eager_cudnn(dev):  # as an eager step runs them
        eager = kernels()
    searched, kept = kernels(), kernels()  # as the compiled step runs them, first and then again
    assert searched > 3 * max(kept, eager), (eager, searched, kept)


@pytest.mark.skipif(not CUDA, reason="CUDA's out-of-memory error")
def test_compile_ahead_out_of_memory_in_an_eager_step_takes_it_again_in_micro_batches(tmp_path):
    """The eager step runs out of GPU memory beside the helper (here a real allocation the card cannot hold, for
    more than 4 images from the second step on): the run takes the step again in 2, then 4 micro-batches, keeps
    that split, and trains on beside its helper."""
    trainer = _trainer(tmp_path, "oom", train__steps=6, train__compile_ahead=True)
    warned, real, calls = [], trainer._loss, []
    trainer.cb.on_warning = warned.append

    def eager(x, *rest):
        calls.append((trainer.step, x.shape[0]))
        if trainer.step >= 1 and x.shape[0] > 4 and trainer.ahead is not None:  # (not in a compiled step)
            torch.empty(TIB64, dtype=torch.uint8, device=trainer.device)
        return real(x, *rest)

    res = _run_closed(trainer, eager)
    n = trainer.cfg.train.batch_size
    assert res.step == 6 and sum("micro-batches" in w for w in warned) == 2, warned
    assert calls[:3] == [(0, n), (1, n), (1, n // 2)] and n == 16
    assert calls[3:] == [(s, 4) for s in range(1, 6) for _ in range(4)]
    assert trainer.step_cache is None and math.isfinite(res.last_loss)  # eager throughout: the helper was left on


@pytest.mark.skipif(not CUDA, reason="CUDA's out-of-memory error")
def test_compile_ahead_out_of_memory_one_image_at_a_time_ends_the_helper_and_trains_compiled(tmp_path):
    """Where not even one image fits beside the helper, the run ends its helper, frees the cache, and takes that
    step and the rest compiled."""
    trainer = _trainer(tmp_path, "oom1", train__steps=6, train__compile_ahead=True)
    warned, real, sizes = [], trainer._loss, []
    trainer.cb.on_warning = warned.append

    def eager(x, *rest):
        if trainer.step >= 1:
            sizes.append(x.shape[0])
            if x.shape[0] == 1:
                trainer._loss = real  # what the run then compiles
            torch.empty(TIB64, dtype=torch.uint8, device=trainer.device)
        return real(x, *rest)

    res = _run_closed(trainer, eager)
    assert res.step == 6 and any("even one image at a time" in w for w in warned), warned
    assert sizes == [16, 8, 4, 2, 1]
    assert trainer.ahead is None and trainer.step_cache is not None  # compiled in the run
    assert math.isfinite(res.last_loss)


@pytest.mark.skipif(not CUDA, reason="CUDA's out-of-memory error")
def test_compile_ahead_out_of_memory_in_an_eager_backward_frees_that_step_before_taking_it_again(tmp_path):
    """The same, with the allocation the card cannot hold in the backward of the second eager step: the part of the
    graph not yet run (here a 256 MiB activation saved for it) is freed before the step is taken again."""
    import weakref

    from conftest import with_failing_backward

    trainer = _trainer(tmp_path, "oom-backward", train__steps=6, train__compile_ahead=True)
    warned, real, calls, saved, alive = [], trainer._loss, [], [], []
    trainer.cb.on_warning = warned.append

    def eager(x, *rest):
        calls.append(trainer.step)
        if len(calls) == 3:  # the step taken again, in micro-batches
            alive.append(saved[0]() is not None)
        loss = real(x, *rest)
        if len(calls) == 2:
            activation = torch.ones(1 << 26, device=trainer.device)  # 256 MiB, kept for the product's backward
            saved.append(weakref.ref(activation))
            one = torch.ones(1, device=trainer.device, requires_grad=True)
            loss = loss + with_failing_backward(one * activation, lambda g: torch.empty(
                TIB64, dtype=torch.uint8, device=g.device)).sum() * 0
        return loss

    res = _run_closed(trainer, eager)
    assert res.step == 6 and any("micro-batches" in w for w in warned), warned
    assert alive == [False] and calls[:4] == [0, 1, 1, 1] and math.isfinite(res.last_loss)


@pytest.mark.skipif(not CUDA, reason="CUDA's caching allocator")
def test_compile_ahead_a_hold_hands_the_memory_the_eager_steps_cached_to_the_helper(tmp_path):
    """The helper's first call (which its holds cover) needs the compiled step's activations: at 256 px on an
    H200 the run's eager step alone caches ~118 GiB, so the run empties its allocator's cache when it holds."""
    from ddpm_cli.engine.time_budget import TimeBudget

    trainer = _trainer(tmp_path, "hold", train__steps=1, train__compile_ahead=True)
    seen = []

    class AskingHelper:  # stands in for the helper: asks for the GPU at once
        answering = True

        def done(self):
            return None

        def hold_if_asked(self, sync, stopping):
            sync()
            seen.append(torch.cuda.memory_reserved(trainer.device))
            return True

    try:
        x = torch.empty(1 << 28, dtype=torch.uint8, device=trainer.device)
        del x  # freed, and kept in the allocator's cache
        cached = torch.cuda.memory_reserved(trainer.device)
        trainer.ahead = AskingHelper()
        assert trainer._eager_while_compiling(TimeBudget(time.monotonic(), None, trainer.device)) is True
    finally:
        trainer.ahead = None
        trainer.close()
    assert seen and seen[0] <= cached - (1 << 28), (cached, seen)


def test_a_nonfinite_step_is_skipped_and_counted_under_cuda_graphs(tmp_path):
    trainer = _trainer(tmp_path, "nan", train__steps=16)
    compiled, params = trainer.loss_fn, list(trainer.model.parameters())
    before: dict[int, list[torch.Tensor]] = {}

    def poisoned(x, y):
        step = trainer.step + 1
        before[step] = [p.detach().clone() for p in params]
        loss = compiled(x, y)
        return loss * float("nan") if step == 8 else loss

    trainer.loss_fn = poisoned
    res = trainer.run()
    recs = {r["step"]: r for r in res.metrics if "loss" in r}
    assert res.step == 16 and recs[16]["nonfinite"] == 1 and recs[8]["loss"] is None
    assert all(math.isfinite(recs[s]["loss"]) for s in recs if s != 8)
    for a, b in zip(before[8], before[9]):
        assert torch.equal(a, b), "the non-finite step changed the weights"
    assert not all(torch.equal(a, b) for a, b in zip(before[9], before[10]))  # the next step did update them


def test_early_stopping_on_cuda(tmp_path):
    trainer = _trainer(tmp_path, "early", train__steps=1000, train__lr=1e-9, train__warmup_steps=0,
                       train__early_stopping={"enabled": True, "holdout": 64, "eval_every": 2, "patience": 2,
                                              "min_delta": 0.5})
    res = trainer.run()
    assert res.stop_reason == "early_stopping" and res.step == 6


# ----------------------------------------------------------------------------------------------------------
# every command on a checkpoint trained with the CUDA defaults


@pytest.mark.parametrize("args", [
    ["--sampler", "ddpm", "--per-class", "-n", "10"],
    ["--sampler", "ddim", "--steps", "10", "--eta", "1", "--per-class", "-n", "20", "--guidance", "2",
     "--guide-model", "none", "--ema-decay", "0.99"],
    ["-n", "12", "--class", "3"],  # the stored guide's autoguidance with DPM-Solver++(2M), the default here
    ["--sampler", "dpm++2m", "--steps", "8", "--spacing", "logsnr", "-n", "24", "--compile", "on", "--no-ema"],
    ["--sampler", "dpm++3m", "--steps", "12", "-n", "10"],  # third order, autoguided by the stored guide
    ["--sampler", "unipc", "--steps", "8", "-n", "10", "--compile", "on"],  # predictor-corrector, compiled
], ids=["ddpm-per-class", "ddim-cfg-ema-decay", "stored-guide-class", "dpm-compiled-raw", "dpm3m-guided",
        "unipc-compiled-guided"])
def test_sample(cuda_run, tmp_path, args):
    out = tmp_path / "out"
    r = ddpm("sample", cuda_run, *args, "--out", out, "--grid", tmp_path / "grid.png", "--seed", "1")
    n = int(args[args.index("-n") + 1])
    files = pngs(out)
    assert len(files) == n and (tmp_path / "grid.png").exists(), r.stdout
    if "--per-class" in args:
        assert {f.name.split("_")[0] for f in files} == {f"class{c}" for c in range(10)}
    from PIL import Image

    import numpy as np
    arrays = np.stack([np.asarray(Image.open(f)) for f in files])
    assert arrays.std() > 5, "blank images"


def test_sample_npz_is_reproducible_by_seed(cuda_run, tmp_path):
    """Two processes with the same seed draw the same noise; cuDNN's autotuner may pick other kernels in each,
    so bf16 pixels can differ by a level or so (README says so): the same seed is far closer than another seed."""
    import numpy as np

    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        ddpm("sample", cuda_run, "-n", "16", "--sampler", "ddim", "--steps", "10", "--format", "npz",
             "--out", tmp_path / f"{name}.npz", "--seed", seed)
    a, b, c = (np.load(tmp_path / f"{x}.npz")["arr_0"].astype(np.int16) for x in "abc")
    assert a.shape == (16, 16, 16, 3)
    same, other = np.abs(a - b).mean(), np.abs(a - c).mean()
    assert same <= 1.0 and same < 0.05 * other, (same, other)


def test_eval_scores_a_checkpoint(cuda_run, tmp_path):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from test_eval import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth")
    ref = tmp_path / "ref.npz"
    ddpm("sample", cuda_run, "-n", "40", "--sampler", "ddim", "--steps", "5", "--format", "npz", "--out", ref,
         "--seed", "9")
    r = ddpm("eval", cuda_run, "-n", "40", "--ref", ref, "--inception-weights", weights, "--cache-dir",
             tmp_path / "cache")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(result["fid"]) and result["fid"] >= 0 and result["n"] == 40, result
    if CUDA:
        assert result["precision"] == "bf16", result
    assert fe  # torch-fidelity is what scores


def test_in_training_fid_between_compiled_steps(tmp_path):
    """logging.fid_every under the CUDA defaults: the score is drawn with the EMA network between the compiled,
    CUDA-graphed training steps, and the run trains on after it. Under a time budget, so the run first estimates
    the FID's cost on the GPU (InTrainingFid.seconds: the EMA network in bf16, Inception) and, with room, runs it."""
    pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from test_eval import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth")
    out = ddpm("train", "--config", gpu_config(tmp_path, "fid", train__steps=40, train__max_time=900,
                                               logging__fid_every=20, logging__fid_samples=16, logging__fid_steps=4,
                                               logging__fid_inception_weights=str(weights)))
    run = tmp_path / "fid"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in recs if "fid" in r]
    assert [r["step"] for r in fids] == [20, 40] and all(math.isfinite(r["fid"]) for r in fids), fids
    assert "no in-training FID" not in out.stdout + out.stderr
    assert {30, 40} <= set(losses(run)) and all(math.isfinite(v) for v in losses(run).values())
    assert checkpoints(run) == [30, 40]


def test_inspect(cuda_run):
    r = ddpm("inspect", cuda_run / "checkpoints" / "ckpt-00000060.safetensors", "--json")
    info = json.loads(r.stdout)
    text = json.dumps(info)
    assert "0.99" in text and '"step": 60' in text.replace("'", '"'), text[:2000]
    r = ddpm("inspect", cuda_run)
    assert "ckpt-00000060" in r.stdout


@pytest.mark.parametrize("fmt,extra,suffix", [("onnx", [], ".onnx"), ("pt2", [], ".pt2"),
                                              ("safetensors", ["--dtype", "fp16"], ".safetensors")])
def test_export(cuda_run, tmp_path, fmt, extra, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model{suffix}"
    ddpm("export", cuda_run / "checkpoints" / "ckpt-00000060.safetensors", "--format", fmt, *extra, "--out", out)
    assert out.exists() and out.stat().st_size > 10_000
    if fmt == "safetensors":  # the slim export samples as its source does, stored guide included
        r = ddpm("sample", out, "-n", "10", "--per-class", "--out", tmp_path / "s")
        assert len(pngs(tmp_path / "s")) == 10 and "autoguided" in r.stdout + r.stderr, r.stdout
    if fmt == "pt2":
        program = torch.export.load(str(out))
        dev = "cuda" if CUDA else "cpu"
        x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 50]), torch.tensor([1, 2])
        eps = program.module()(x, t, y)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        assert dev  # the program runs where it was loaded


# ----------------------------------------------------------------------------------------------------------
# larger images: 64x64 (streamed from a folder) and 256x256 (tiny widths), train, resume and sample; max_time
# with a compiling step


SIZES = {
    64: dict(model__image_size=64, model__channel_mults=[1, 2, 2], model__attention_resolutions=[16],
             train__batch_size=16),
    256: dict(model__image_size=256, model__channel_mults=[1, 1, 2, 2, 4], model__attention_resolutions=[16],
              train__batch_size=8, data__shapes_count=64),
}


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 64])
def test_larger_images_train_resume_and_sample(tmp_path, size):
    """At 64 px the images come from a folder of PNGs, streamed (data.streaming: on) rather than decoded whole."""
    data = {}
    if size == 64:
        from PIL import Image

        from ddpm_cli.engine.data import SHAPE_CLASSES, make_shapes

        shapes = make_shapes(40, 64)
        for i, (image, label) in enumerate(zip(shapes.images, shapes.labels)):
            path = tmp_path / "imgs" / SHAPE_CLASSES[label] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        data = dict(data__dataset="folder", data__root=str(tmp_path / "imgs"), data__streaming="on")
    cfg = gpu_config(tmp_path, f"px{size}", train__steps=8, logging__checkpoint_every=4, train__guide_step=None,
                     train__ema_extra=[], **SIZES[size], **data)
    run = tmp_path / f"px{size}"
    ddpm("train", "--config", cfg)
    ddpm("train", "--resume", run, "--set", "train.steps=12")
    assert checkpoints(run)[-1] == 12
    out = tmp_path / "s"
    ddpm("sample", run, "-n", "4", "--steps", "5", "--out", out)
    from PIL import Image

    images = pngs(out)
    assert len(images) == 4 and Image.open(images[0]).size == (size, size)


def test_max_time_ends_the_run_within_a_step_of_its_budget_compiling_included(tmp_path):
    """At 64x64 with a 30 s budget: the compiled first step and the closing grid count; the run ends within about
    one step of the budget (or, when the compiling step alone overran it, right after that step)."""
    budget = 30.0
    trainer = _trainer(tmp_path, "budget", train__steps=10**6, train__max_time=budget, logging__log_every=5,
                       logging__sample_count=16, logging__sample_steps=50,
                       **{k: v for k, v in SIZES[64].items()})
    res = trainer.run()
    assert res.stop_reason == "time"
    if res.compile_s >= budget:
        assert res.step == 1
        return
    rates = [r["img_per_s"] for r in res.metrics if "img_per_s" in r][1:]
    step_s = 16 / min(rates) if rates else res.compile_s
    assert res.elapsed_s <= budget + 2 * step_s + 1.0, (res.elapsed_s, step_s, res.step)
