"""torch.distributed on the CPU: two gloo processes train a tiny model; the ranks stay identical and resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_overrides, write_yaml
from ddpm_cli.engine.runs import list_checkpoints

SCRIPT = textwrap.dedent('''
    import os
    import sys
    from pathlib import Path
    from safetensors.torch import save_file
    from ddpm_cli.config import load_config
    from ddpm_cli.engine.train import Trainer

    cfg = load_config(sys.argv[1], sys.argv[3:])
    trainer = Trainer(cfg, resume=None if sys.argv[2] == "-" else Path(sys.argv[2]))
    result = trainer.run()
    out = Path(cfg.logging.run_dir) / f"rank{trainer.dist.rank}.safetensors"
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(out))
    trainer.close()
    left = [t for t in os.listdir("/proc/self/task") if open(f"/proc/self/task/{t}/comm").read().strip()
            == "pt_gloo_runloop"] if os.path.isdir("/proc/self/task") else []
    assert not left, f"{len(left)} gloo workers outlived close()"  # (test_close_joins_the_gloo_workers...)
''')

STOP_SCRIPT = textwrap.dedent('''
    import sys
    from ddpm_cli.config import load_config
    from ddpm_cli.engine.train import StopFlag, Trainer, TrainingAborted

    stop = StopFlag()
    trainer = Trainer(load_config(sys.argv[1], []), stop=stop)
    next_batch, calls = trainer.batcher.next, []

    def next_then_signal():
        calls.append(1)
        if trainer.dist.rank == 1 and len(calls) == 4:
            stop.request(15)  # what the CLI's SIGTERM handler does, here on rank 1 only, during step 4
        return next_batch()

    trainer.batcher.next = next_then_signal
    try:
        trainer.run()
    except TrainingAborted as e:
        print(f"RANK {trainer.dist.rank} code {e.exit_code} step {trainer.step}: {e}")
    trainer.dist.close()
''')

FAULT_SCRIPT = textwrap.dedent('''
    import os
    import sys
    from ddpm_cli.config import load_config
    from ddpm_cli.engine.train import StopFlag, Trainer
    from ddpm_cli.errors import DataError, DdpmError

    rank_at_fault, bad_batch = int(sys.argv[2]), int(sys.argv[3])
    signalled = [int(x) for x in os.environ.get("SIGNAL_AT", "").split(":") if x]  # rank, batch: a SIGTERM there
    stop = StopFlag()
    trainer = Trainer(load_config(sys.argv[1], sys.argv[4:]), stop=stop)
    make, calls = trainer.batcher._next, []
    if os.environ.get("SAVE_FAILS") and trainer.dist.rank == 0:
        def no_room():
            raise DdpmError("cannot write the checkpoint: the disk is full")
        trainer.save_checkpoint = no_room

    def next_batch():  # a streamed file of this rank's batch no longer decodes
        calls.append(1)
        if signalled and trainer.dist.rank == signalled[0] and len(calls) == signalled[1]:
            stop.request(15)  # what the CLI's SIGTERM handler does
        if trainer.dist.rank == rank_at_fault and len(calls) == bad_batch:
            raise DataError(f"FILE-{bad_batch} is not a readable image")
        return make()

    trainer.batcher._next = next_batch
    try:
        trainer.run()
        print(f"RANK {trainer.dist.rank} code 0 step {trainer.step}: finished")
    except DdpmError as e:
        print(f"RANK {trainer.dist.rank} code {e.exit_code} step {trainer.step}: {e}")
    trainer.dist.close()
''')


pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _torchrun(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_train_identically_and_resume(tmp_path):
    runs = tmp_path / "runs"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(runs, train__steps=6, logging__log_every=2,
                                                             logging__checkpoint_every=3, train__posthoc_ema=[0.1],
                                                             train__posthoc_ema_every=2))
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    r = _torchrun(str(script), str(cfg), "-")
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = load_file(runs / "rank0.safetensors"), load_file(runs / "rank1.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    run = runs / "tiny"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and metrics[-1]["images_seen"] == 6 * 16 * 2  # global batch = 16 x 2 ranks
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000003.safetensors", "ckpt-00000006.safetensors"]

    # Both ranks resume from the same checkpoint and keep identical weights.
    r = _torchrun(str(script), str(cfg), str(list_checkpoints(run)[-1]), "train.steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = load_file(runs / "rank0.safetensors"), load_file(runs / "rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert list_checkpoints(run)[-1].name == "ckpt-00000010.safetensors"
    # rank 0 alone tracks train.posthoc_ema: its snapshots every 2 steps and with every checkpoint, across the resume
    from ddpm_cli.engine.posthoc_ema import list_snapshots

    assert [s.step for s in list_snapshots(run)] == [2, 3, 4, 6, 8, 9, 10]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(runs, train__steps=40, logging__checkpoint_every=100))
    script = tmp_path / "stop_check.py"
    script.write_text(STOP_SCRIPT)
    r = _torchrun(str(script), str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    # The ranks compare flags every 10 steps, so both leave the loop after step 10 (not rank 1 alone at 4).
    # the ranks finish together, so their lines may interleave in the shared pipe: find each rank's report
    reports = dict(re.findall(r"(RANK \d code \d+ step \d+): (stopped by signal \d+ at step \d+)", r.stdout))
    assert sorted(reports) == ["RANK 0 code 143 step 10", "RANK 1 code 143 step 10"], r.stdout
    assert reports["RANK 0 code 143 step 10"] == "stopped by signal 15 at step 10"  # rank 0 names rank 1's signal
    assert [p.name for p in list_checkpoints(runs / "tiny")] == ["ckpt-00000010.safetensors"]


def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path):
    runs = tmp_path / "runs"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(
        runs, train__steps=40, train__early_stopping={"enabled": True, "holdout": 32, "eval_every": 2,
                                                      "patience": 1, "min_delta": 10.0}))
    script = tmp_path / "stop_check.py"
    script.write_text(STOP_SCRIPT.replace("len(calls) == 4", "False"))
    r = _torchrun(str(script), str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (runs / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]  # the second evaluation did not improve by 10
    assert list_checkpoints(runs / "tiny")[-1].name == "ckpt-00000004.safetensors"


def _reports(stdout: str) -> dict[int, tuple[int, int, str]]:
    """Each rank's report line: rank -> (exit code, step, message). The ranks finish together and their lines may
    run together in the shared pipe, so each report ends where the next one starts."""
    found = re.findall(r"RANK (\d) code (\d+) step (\d+): (.*?)(?=RANK \d code|\n|$)", stdout)
    return {int(r): (int(c), int(s), m) for r, c, s, m in found}


def _position_after(steps: int, n: int, per_step: int) -> dict:
    """The data position a run is at after `steps` steps (Batcher: each epoch drops its ragged end)."""
    epoch = pos = 0
    for _ in range(steps):
        if pos + per_step > n:
            epoch, pos = epoch + 1, 0
        pos += per_step
    return {"epoch": epoch, "pos": pos, "n": n}


@pytest.mark.parametrize("rank_at_fault,bad_batch,steps,stop", [(1, 4, 40, 10), (0, 4, 40, 10), (1, 11, 12, 12),
                                                                (1, 1, 40, 0)])
def test_a_batch_one_rank_cannot_make_stops_every_rank_with_a_checkpoint(tmp_path, rank_at_fault, bad_batch, steps,
                                                                         stop):
    """Under --gpus, a rank whose batch could not be made (a streamed file that no longer decodes) left alone: the
    other waited in the all-reduce, and the run ended without saving the steps since its last checkpoint. Now the
    rank trains its last good batch in that one's place until the ranks agree (every 10 steps; a run that ends
    first, at its end; a first batch at once), where every rank stops with exit 1 and rank 0 saves the run with the
    data position of its step: a resume goes on from there, past the failed batch (whose other images that rank
    did not train), not from the failure."""
    from ddpm_cli.engine.checkpoint.tensors import load_state

    runs = tmp_path / "runs"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(runs, train__steps=steps, logging__checkpoint_every=100,
                                                             logging__sample_every=100))
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    r = _torchrun(str(script), str(cfg), str(rank_at_fault), str(bad_batch))
    assert r.returncode == 0, r.stderr[-3000:]
    reports = _reports(r.stdout)
    assert sorted(reports) == [0, 1] and all(code == 1 and step == stop for code, step, _ in reports.values()), \
        r.stdout
    other = 1 - rank_at_fault
    assert f"FILE-{bad_batch} is not a readable image" in reports[rank_at_fault][2], reports
    assert "another process of the run could not make its batch (its own line says why)" in reports[other][2], \
        reports
    if stop == 0:  # nothing trained: nothing saved, and the run's folder is taken away again
        assert "nothing was trained" in reports[other][2] and not (runs / "tiny").exists(), reports
        return
    saved = list_checkpoints(runs / "tiny")
    assert [p.name for p in saved] == [f"ckpt-{stop:08d}.safetensors"]
    assert all(str(saved[0]) in message and "--resume" in message for _, _, message in reports.values()), reports
    _, state, _ = load_state(saved[0])
    assert state["step"] == stop and state["data"] == _position_after(stop, 256, 2 * 16), state


def test_a_data_failure_keeps_a_signal_s_exit_code_and_a_failed_save_loses_no_rank_s_line(tmp_path):
    """Under --gpus, a signal and a batch that could not be made before the ranks agreed ended every rank with
    exit 1 and the data's line alone (a scheduler that requeues a job on 143 never learnt of its signal); and where
    rank 0 then failed to save (a full disk), it left the barrier the others waited in, and torchrun ended them
    before the failing rank could say which file it was."""
    runs = tmp_path / "runs"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(runs, train__steps=40, logging__checkpoint_every=100,
                                                             logging__sample_every=100))
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    r = _torchrun(str(script), str(cfg), "1", "4", env_extra={"SIGNAL_AT": "0:6"})
    reports = _reports(r.stdout)
    assert sorted(reports) == [0, 1] and all(c == 143 and s == 10 for c, s, _ in reports.values()), r.stdout
    assert all("signal 15" in m for _, _, m in reports.values()) and "FILE-4" in reports[1][2], reports
    assert [p.name for p in list_checkpoints(runs / "tiny")] == ["ckpt-00000010.safetensors"]

    cfg = write_yaml(tmp_path / "again.yaml", tiny_overrides(runs, train__steps=40, logging__checkpoint_every=100,
                                                              logging__sample_every=100, logging__run_name="again"))
    r = _torchrun(str(script), str(cfg), "1", "4", env_extra={"SAVE_FAILS": "1"})
    reports = _reports(r.stdout)
    assert sorted(reports) == [0, 1] and all(c == 1 and s == 10 for c, s, _ in reports.values()), r.stdout
    assert "FILE-4 is not a readable image" in reports[1][2] and "disk is full" in reports[0][2], reports
    assert all("no checkpoint was written" in m for _, _, m in reports.values()), reports


def _two_rank_weights(tmp_path, name: str, **overrides) -> dict[str, torch.Tensor]:
    """4 steps of the tiny config on two ranks (SCRIPT); checks the ranks end identical and returns rank 0's
    weights."""
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    runs = tmp_path / name
    cfg = write_yaml(tmp_path / f"{name}.yaml", tiny_overrides(runs, train__steps=4, logging__log_every=2,
                                                               **overrides))
    r = _torchrun(str(script), str(cfg), "-")
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = load_file(runs / "rank0.safetensors"), load_file(runs / "rank1.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    return w0


def test_flat_gradient_sync_averages_like_ddp(tmp_path):
    """grad_sync=flat (one all-reduce after the backward, for CUDA-graph steps) keeps the ranks identical and
    lands where DDP's bucketed all-reduce does."""
    weights = {sync: _two_rank_weights(tmp_path, sync, train__grad_sync=sync) for sync in ("ddp", "flat")}
    moved = [k for k in weights["ddp"] if not torch.equal(weights["ddp"][k], weights["flat"][k])]
    assert all(torch.allclose(weights["ddp"][k], weights["flat"][k], atol=1e-5) for k in weights["ddp"]), moved


def test_grad_accum_on_two_ranks_syncs_once_and_lands_where_one_batch_does(tmp_path):
    """train.grad_accum under torchrun: each rank sums its micro-batches, then one flat all-reduce (auto resolves
    to flat); the ranks stay identical and land where whole batches synced by DDP do (fp32, 1e-5)."""
    weights = {k: _two_rank_weights(tmp_path, f"k{k}", train__grad_accum=k) for k in (1, 2)}
    for name in weights[1]:
        torch.testing.assert_close(weights[2][name], weights[1][name], rtol=0, atol=1e-5, msg=name)


GRAD_SCRIPT = textwrap.dedent('''
    import torch
    from ddpm_cli.engine.distributed import DistInfo

    d = DistInfo.from_env()
    a = torch.nn.Parameter(torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    b, c = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.full_like(a, d.rank + 1.0)
    b.grad = torch.arange(5.0) * (d.rank + 1)
    d.all_reduce_grads([a, b, c])
    assert torch.allclose(a.grad, torch.full_like(a, 1.5)) and a.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(b.grad, torch.arange(5.0) * 1.5) and torch.equal(c.grad, torch.zeros(1))
    d.close()
''')


def _run_on_two_ranks(tmp_path, source: str) -> None:
    """Run a script's asserts on 2 gloo ranks; both must pass."""
    script = tmp_path / "check.py"
    script.write_text(source)
    r = _torchrun(str(script))
    assert r.returncode == 0, r.stderr[-3000:]


def test_all_reduce_grads_averages_over_ranks(tmp_path):
    _run_on_two_ranks(tmp_path, GRAD_SCRIPT)


GATHER_SCRIPT = textwrap.dedent('''
    import torch
    from ddpm_cli.engine.distributed import DistInfo

    d = DistInfo.from_env()
    n, bs = 11, 3  # 4 batches: ranks 0 and 1 make batches 0, 2 and 1, 3 (the last one short)
    kept = [(b * bs, torch.arange(b * bs, min(n, b * bs + bs), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 1, 1))
            for b in range(d.rank, 4, d.world)]
    out = d.gather_batches(kept, n, bs, (2, 1, 1))
    if d.rank == 0:
        assert out.shape == (n, 2, 1, 1) and torch.equal(out[:, 0, 0, 0], torch.arange(n, dtype=torch.uint8)), out
    else:
        assert out is None
    kept = [(0, torch.full((2, 2, 1, 1), 7, dtype=torch.uint8))] if d.rank == 0 else []  # rank 1 makes nothing
    out = d.gather_batches(kept, 2, bs, (2, 1, 1))
    assert out is None if d.rank else torch.equal(out, torch.full((2, 2, 1, 1), 7, dtype=torch.uint8))
    d.close()
''')


def test_gather_batches_puts_every_rank_s_images_in_order(tmp_path):
    _run_on_two_ranks(tmp_path, GATHER_SCRIPT)


CLOSE_SCRIPT = textwrap.dedent('''
    import os
    from ddpm_cli.engine.distributed import DistInfo

    def gloo_workers():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sum(name == "pt_gloo_runloop" for name in names)

    d = DistInfo.from_env("cpu")
    for step in range(3):
        assert d.agree(d.rank, step, every=1) == 1
    assert gloo_workers() > 0
    import torch._dynamo  # as the optimizer's construction imports it, after the groups are made
    d.close()
    assert gloo_workers() == 0, gloo_workers()
''')


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_close_joins_the_gloo_workers_before_the_interpreter_exits(tmp_path):
    """A rank that left right after the ranks' last agreement (the --gpus run whose first batch could not be made)
    aborted at exit now and then (SIGABRT, "terminate called without an active exception"; lab notes, "Several
    GPUs"): the flags' gloo group outlived close(), and one of its worker threads released the
    last agreement's tensor, a Python object, while the interpreter was being torn down (the core's stack). The
    groups are freed in close() now, which joins their threads; also the default group, which torch's compiler,
    imported after it was made, held in torch.distributed.nn's default arguments."""
    _run_on_two_ranks(tmp_path, CLOSE_SCRIPT)


def test_gpus_flag_launches_torchrun(tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs", train__steps=4,
                                                             logging__log_every=2))
    r = run_cli("train", "--config", str(cfg), "--gpus", "2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2" in r.stdout and "global batch 32" in r.stdout and "grad sync ddp" in r.stdout  # eager: DDP
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "ckpt-00000004.safetensors").exists()
    assert "warning: no CUDA GPU here: --gpus 2 runs 2 processes on the CPU" in r.stderr
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # (torch 2.14's FutureWarning at broadcast_buffers, per rank)


def test_bad_input_under_gpus_is_one_line_not_one_per_rank(tmp_path):
    """A data error under `--gpus 2` came once per rank, with torchrun's own log lines (W... Sending process ...
    SIGTERM, E... failed (exitcode: 1)) around them."""
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs", train__steps=4))
    r = run_cli("train", "--config", str(cfg), "--gpus", "2", "--set", "data.dataset=folder", "--set",
                f"data.root={tmp_path / 'nosuch'}", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("warning: no CUDA GPU here")]
    assert len(lines) == 1 and lines[0].startswith("error: data.root"), r.stderr[-3000:]


def test_an_error_only_rank_0_checks_is_one_line_under_gpus(tmp_path):
    """Rank 0 alone makes the run's folder: starting over a run with checkpoints is its error, and the other
    rank, waiting in a collective, printed gloo's traceback ("Connection closed by peer") after rank 0's line."""
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs", train__steps=2))
    assert run_cli("train", "--config", str(cfg), env={"OMP_NUM_THREADS": "1"}).returncode == 0
    r = run_cli("train", "--config", str(cfg), "--gpus", "2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("warning: no CUDA GPU here")]
    assert len(lines) == 1 and "already holds checkpoints" in lines[0], r.stderr[-3000:]


def test_train_device_is_honoured_under_gpus(tmp_path):
    """train.device under --gpus was ignored: cuda on a machine without one trained on the CPU (and cpu on a GPU
    machine on the GPUs). It is checked on every rank, so it is one line."""
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs", train__steps=2))
    r = run_cli("train", "--config", str(cfg), "--gpus", "2", "--set", "train.device=cuda",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("warning: no CUDA GPU here")]
    assert len(lines) == 1 and "train.device cuda requested but CUDA is not available" in lines[0], r.stderr[-3000:]
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))


RECORD_TORCHRUN = r"""
import json, sys
import torch.distributed.run as run
real, record = run.main, sys.argv[1]
def recorded(args=None):
    with open(record, "a") as f:
        f.write(json.dumps(args) + "\n")
    return real(args)
run.main = recorded
sys.argv = [sys.argv[0]] + sys.argv[2:]
from ddpm_cli.cli.app import main
main()
"""


def test_gpus_1_goes_through_the_launcher_too(tmp_path):
    """`--gpus 1` asks for the launcher (one process per GPU), as the GPU suite runs it; `--gpus 0` (the default)
    trains in this process."""
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs", train__steps=4,
                                                             logging__log_every=2))
    calls = tmp_path / "torchrun.jsonl"
    r = subprocess.run([sys.executable, "-c", RECORD_TORCHRUN, str(calls), "train", "--config", str(cfg), "--gpus",
                        "1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    launched = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(launched) == 1 and "--nproc_per_node=1" in launched[0], launched
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "ckpt-00000004.safetensors").exists()


def test_sigterm_to_the_gpus_launcher_stops_the_ranks_with_a_checkpoint_and_no_traceback(tmp_path):
    runs = tmp_path / "runs"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(runs, train__steps=100_000, logging__log_every=2,
                                                             logging__checkpoint_every=100_000))
    p = subprocess.Popen([sys.executable, "-m", "ddpm_cli", "train", "--config", str(cfg), "--gpus", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    metrics = runs / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and p.poll() is None:
        assert time.monotonic() < deadline, "the ranks never started training"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by signal 15" in err + out
    assert list_checkpoints(runs / "tiny"), "the ranks should checkpoint before they stop"


def test_a_signal_that_torchruns_agent_fails_to_handle_still_reaches_the_ranks(tmp_path, monkeypatch):
    """torch's elastic agent times each poll of its workers in a try whose finally reads the start time: a SIGTERM
    that lands before that time is taken raises UnboundLocalError from the finally, in place of the
    SignalException that makes the agent pass the signal on. The launcher then exited 1 with torch's traceback
    and left the ranks running (seen once in a full CPU run). Here torchrun is a stand-in that starts a "rank"
    and fails that way."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from ddpm_cli.cli import launch

    ready, done = tmp_path / "rank-ready", tmp_path / "rank-stopped"
    rank_code = (f"import signal, sys, time, pathlib\n"
                 f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(done)!r}).write_text('15'), "
                 f"sys.exit(0)))\n"
                 f"pathlib.Path({str(ready)!r}).touch()\n"
                 f"time.sleep(60)\n")

    def torchrun(argv):
        # (held, as torchrun holds its ranks, and started with the environment torchrun gives them)
        rank = subprocess.Popen([sys.executable, "-c", rank_code],  # noqa: F841
                                env={**os.environ, "TORCHELASTIC_RUN_ID": "test", "LOCAL_RANK": "0"})
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:  # (its handler set)
            time.sleep(0.05)
        try:
            raise SignalException("Process got signal: 15", sigval=signal.SIGTERM)
        finally:
            start  # noqa: F821, B018 - torch's own slip: a name the try had not assigned yet

    import torch.distributed.run

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    monkeypatch.setattr(sys, "argv", ["ddpm", "train", "--gpus", "2"])
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    # children of this process that are no ranks: one that a SIGTERM ends (as a multiprocessing forkserver an
    # earlier test started in this pytest worker: the launcher signalled and reaped it, and later tests' worker
    # pools failed with "No child processes"), and one that ignores it (as the resource tracker: the launcher
    # waited the whole timeout for it)
    bystanders = [subprocess.Popen([sys.executable, "-c", f"import signal, time; signal.signal(signal.SIGTERM, "
                                    f"signal.{disposition}); time.sleep(300)"])
                  for disposition in ("SIG_DFL", "SIG_IGN")]
    t = time.monotonic()
    try:
        with pytest.raises(SystemExit) as e:
            launch.relaunch_with_torchrun(2)
        assert [b.poll() for b in bystanders] == [None, None], "the launcher signalled a child that is no rank"
    finally:
        for b in bystanders:
            b.kill()
            b.wait()
    assert e.value.code == 143 and time.monotonic() - t < 60, time.monotonic() - t
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done.exists(), "the rank never got the signal"


def test_sampling_on_two_ranks_gives_the_images_of_one(trained_run, tmp_path):
    one = run_cli("sample", str(trained_run), "-n", "7", "--batch-size", "3", "--format", "npz",
                  "--out", str(tmp_path / "one.npz"), "--sampler", "ddim", "--steps", "3", "--eta", "1",
                  env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = run_cli("sample", str(trained_run), "-n", "7", "--batch-size", "3", "--format", "npz",
                  "--out", str(tmp_path / "two.npz"), "--sampler", "ddim", "--steps", "3", "--eta", "1",
                  "--gpus", "2", env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    import numpy as np

    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].shape == (7, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])
    assert not list(tmp_path.glob(".*part*"))  # the ranks' part files are gone
    assert two.stdout.count("images in") == 1  # one summary line: rank 0's


def test_gpus_beyond_the_machine_are_refused_and_cpu_processes_are_said(tmp_path):
    """On a machine without a GPU, --gpus 9 started 9 processes on 2 cores and printed each one's error; --gpus 2
    ran two CPU processes without a word about GPUs (a helper's second sweep)."""
    from conftest import cli, one_line_error

    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs"))
    msg = one_line_error(cli("train", "--config", cfg, "--gpus", str((os.cpu_count() or 1) + 1)), code=(2,))
    assert "without a CUDA GPU" in msg and not (tmp_path / "runs").exists()


def test_a_rank_says_an_error_rank_0_did_not(tmp_path, monkeypatch):
    """Under --gpus only rank 0 says an error every rank met; a rank whose error differs from rank 0's says its
    own, so a failure of one rank is never silent."""
    from ddpm_cli.cli import ui

    monkeypatch.setenv(ui.LAUNCH_DIR, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    assert not ui._said_by_rank_0("data.root x does not exist")  # rank 0 always says its own
    ui._leave_for_the_ranks("data.root x does not exist")
    monkeypatch.setenv("RANK", "1")
    assert ui._said_by_rank_0("data.root x does not exist")
    assert not ui._said_by_rank_0("a decoding worker process died")
    monkeypatch.delenv(ui.LAUNCH_DIR)
    assert not ui._said_by_rank_0("data.root x does not exist")  # not launched by --gpus: say it


def test_a_rank_whose_peer_said_an_error_ends_quietly_on_the_collectives_error(tmp_path, monkeypatch):
    """Rank 0 waiting in an all-reduce for a rank that failed (a streamed file it could not decode) printed gloo's
    traceback after that rank's line; any rank's said error now ends the others' collective errors quietly."""
    from ddpm_cli.cli import ui

    monkeypatch.setenv(ui.LAUNCH_DIR, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    assert not ui._a_peer_said_an_error(wait_s=0.1)
    ui._leave_for_the_ranks("rank 0's own error")
    assert not ui._a_peer_said_an_error(wait_s=0.1)  # its own file is not a peer's

    @ui.friendly
    def collective():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setenv("RANK", "1")
    ui._leave_for_the_ranks("a decoding worker process died")  # rank 1 said its error
    monkeypatch.setenv("RANK", "0")
    exits = []
    monkeypatch.setattr(ui.os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit):
        collective()
    assert exits == [1]  # at once, not through the interpreter's teardown of the broken process group
    monkeypatch.delenv(ui.LAUNCH_DIR)  # not under --gpus: the error is not hidden
    with pytest.raises(RuntimeError):
        collective()


def test_a_rank_killed_by_a_signal_is_said(tmp_path, monkeypatch, capsys):
    """torchrun's "failed (exitcode: -9)" line is kept quiet, and the launcher kept only positive exit codes: a rank
    killed by the kernel (out of host memory) ended the command with 1 and no word."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from ddpm_cli.cli import launch

    def killed(args):
        raise ChildFailedError("ddpm_cli", {1: ProcessFailure(local_rank=1, pid=1, exitcode=-9, error_file="")})

    monkeypatch.setattr(torchrun, "main", killed)
    monkeypatch.setattr(launch.sys, "argv", ["ddpm", "train", "--gpus", "2"])
    import typer

    with pytest.raises(typer.Exit) as e:  # (what ui.fail raises; the entry point exits with its code)
        launch.relaunch_with_torchrun(2)
    assert e.value.exit_code == 128 + 9
    err = capsys.readouterr().err
    assert "rank 1" in err and "SIGKILL" in err, err
