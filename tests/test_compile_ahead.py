"""train.compile_ahead (engine/compile_ahead.py) on the CPU: the hand-over of the GPU for kernel timings between a
real helper process and the run, and the run's side (eager steps, the switch, a failed or unfinished helper) with
a stand-in helper. The real helper compiling a real step is tests/test_gpu_compile_cache.py's."""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config


def test_the_helper_times_kernels_only_while_the_run_holds(tmp_path):
    """Every timing of the helper falls inside a window where the run had synchronised and was waiting; timings
    that come in a run (less than 0.5 s apart) share one hold, and the run goes on once the helper lets go."""
    from ddpm_cli.engine.compile_ahead import CompileAhead

    helper = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from ddpm_cli.engine.compile_ahead import _Gate
folder = Path(sys.argv[1])
gate = _Gate(folder, lambda: True)
def timing(i):
    gate.acquire()
    start = time.time()
    time.sleep(0.1)
    (folder / f"timed{{i}}").write_text(f"{{start}} {{time.time()}}")
    gate.release_later()
time.sleep(0.3)
for i in range(3):  # three kernels in a row
    timing(i)
time.sleep(1.5)  # compiling the backward
timing(3)
time.sleep(1.0)
"""
    proc = subprocess.Popen([sys.executable, "-c", helper, str(tmp_path)])
    ahead = CompileAhead(proc, tmp_path, open(tmp_path / "log", "w"))
    holds, syncs, steps = [], [], []
    t_end = time.time() + 30
    while ahead.done() is None and time.time() < t_end:
        before = ahead.holds
        t = time.time()
        ahead.hold_if_asked(lambda: syncs.append(time.time()))
        if ahead.holds > before:
            holds.append((t, time.time()))
        steps.append(time.time())  # an eager step
        time.sleep(0.01)
    assert ahead.done() is True
    timed = [tuple(map(float, (tmp_path / f"timed{i}").read_text().split())) for i in range(4)]
    assert len(holds) == 2 == len(syncs), (holds, timed)
    for start, end in timed:
        assert any(a <= start and end <= b for a, b in holds), (start, end, holds)
    for a, b in holds:  # the run took no step while it held
        assert not [s for s in steps if a < s < b - 0.001]
    assert holds[0][1] - holds[0][0] >= 0.3 + 0.5 - 0.05  # three timings, then the 0.5 s release
    ahead.stop()
    assert not tmp_path.exists()


def test_a_release_followed_at_once_by_a_new_request_is_answered(tmp_path):
    """The helper lets go and asks again faster than the run looks (one kernel's timing right after the release
    timer): the run, still waiting, answers the new request at once instead of leaving the helper to give up on it
    (ACK_WAIT_S)."""
    from ddpm_cli.engine.compile_ahead import CompileAhead

    helper = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from ddpm_cli.engine import compile_ahead
compile_ahead.ACK_WAIT_S = 5.0
folder = Path(sys.argv[1])
gate = compile_ahead._Gate(folder, lambda: True)
time.sleep(0.3)
gate.acquire()
time.sleep(0.1)
gate.release()
t = time.monotonic()
gate.acquire()  # at once: the run cannot have seen the request before go
(folder / "waited").write_text(str(time.monotonic() - t))
gate.release()
"""
    proc = subprocess.Popen([sys.executable, "-c", helper, str(tmp_path)])
    ahead = CompileAhead(proc, tmp_path, open(tmp_path / "log", "w"))
    t_end = time.time() + 30
    while ahead.done() is None and time.time() < t_end:
        ahead.hold_if_asked(lambda: None)
        time.sleep(0.01)
    assert ahead.done() is True
    assert float((tmp_path / "waited").read_text()) < 1.0
    ahead.stop()


class _StandIn:
    """Replaces CompileAhead.start: a helper process that runs `code` (it compiles nothing), given the shared folder
    as sys.argv[1]."""

    def __init__(self, monkeypatch, code: str):
        from ddpm_cli.engine import compile_ahead

        self.started, self.made = [], []  # (what each start was given), the CompileAhead of each
        real = compile_ahead.CompileAhead

        def start(cfg_dict, device, inputs, classes):
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="stand-in-"))
            log = open(folder / compile_ahead.LOG, "w")
            proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=log, stderr=subprocess.STDOUT)
            self.started.append((cfg_dict, device, [None if t is None else tuple(t.shape) for t in inputs], folder,
                                 proc))
            self.made.append(real(proc, folder, log))
            return self.made[-1]

        monkeypatch.setattr(real, "start", staticmethod(start))


def _run(tmp_path, stop_after_switch: int | None, **extra):
    """A tiny run with train.compile on whose compiled step is counted (and not compiled: the eager step stands
    in for it), and its messages."""
    from ddpm_cli.engine.train import StopFlag, TrainCallbacks, Trainer

    stop, said, switch = StopFlag(), [], []

    class Callbacks(TrainCallbacks):
        def on_message(self, text):
            said.append(text)
            if "compiled steps from step" in text:
                switch.append(int(text.split("from step ")[1].split()[0]))

        def on_step(self, step):
            if stop_after_switch is not None and switch and step >= switch[0] + stop_after_switch:
                stop.request(15)

    cfg = tiny_config(tmp_path, **{"train__compile": "on", "train__compile_ahead": True, "logging__log_every": 1,
                                   "logging__checkpoint_every": 10**6, "logging__sample_every": 10**6, **extra})
    trainer = Trainer(cfg, callbacks=Callbacks(), stop=stop)
    compiled_calls = []

    def counted(*args):
        compiled_calls.append(trainer.step)
        return trainer._loss(*args)

    def make_compiled_step():  # made once, when the helper has ended (or at once without compile_ahead)
        assert trainer.loss_fn == trainer._loss
        trainer.loss_fn = counted

    assert trainer.loss_fn == trainer._loss  # not made yet: the set-up leaves the compiler alone
    trainer._make_compiled_step = make_compiled_step
    return trainer, said, switch, compiled_calls


def test_the_run_trains_eagerly_until_the_helper_is_done_then_takes_the_compiled_step(tmp_path, monkeypatch):
    from ddpm_cli.errors import TrainingAborted

    stand_in = _StandIn(monkeypatch, "import time; time.sleep(2)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=3, train__steps=10**6)
    with pytest.raises(TrainingAborted):
        trainer.run()
    (cfg_dict, device, shapes, folder, proc), = stand_in.started
    assert device == "cpu" and shapes[0] == (16, 3, 16, 16) and cfg_dict["train"]["compile_ahead"] is True
    assert any("helper process" in m for m in said), said
    k = switch[0]
    assert k > 2  # eager steps came first
    assert compiled == list(range(k - 1, trainer.step)), (k, compiled[:5])  # every step from k on, none before
    assert proc.poll() is not None and not folder.exists()


def test_a_helper_that_fails_is_one_warning_and_the_run_compiles_its_step_itself(tmp_path, monkeypatch):
    from ddpm_cli.engine.train import Trainer

    monkeypatch.setattr(Trainer, "SWITCH_MIN_LEFT_S", 0.0)  # (a short budget: the run compiles to its end)
    _StandIn(monkeypatch, f"import sys, time; time.sleep(0.5); print({TORCH_OOM!r}); sys.exit(1)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=10**6,
                                           train__max_time=4.0)
    trainer.run()
    warned = [m for m in said if "helper failed" in m]
    assert len(warned) == 1 and "ran out of GPU memory (tried to allocate 11.95 GiB)" in warned[0], said
    assert not switch and compiled and compiled == list(range(compiled[0], trainer.step))


# torch's out-of-memory message as the helper's traceback ends with it (one line, shortened in the middle)
TORCH_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 11.95 GiB. GPU 0 has a total capacity "
             "of 79.19 GiB of which 2.31 GiB is free. Including non-PyTorch memory, this process has 59.98 GiB "
             "memory in use. Of the allocated memory 45.1 GiB is allocated by PyTorch. If reserved but unallocated "
             "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


@pytest.mark.parametrize("line, brief", [
    (TORCH_OOM, "it ran out of GPU memory (tried to allocate 11.95 GiB)"),
    ("RuntimeError: CUDA error: out of memory", "it ran out of GPU memory"),
    ("ValueError: " + "x" * 400, "ValueError: " + "x" * 185 + "..."),
    ("KeyError: 'a'", "KeyError: 'a'"),
])
def test_a_helpers_failure_is_said_in_one_short_line(line, brief):
    from ddpm_cli.engine.compile_ahead import brief_failure

    assert brief_failure(line) == brief


def test_a_run_that_ends_before_its_helper_ends_the_helper(tmp_path, monkeypatch):
    stand_in = _StandIn(monkeypatch, "import time; time.sleep(120)")
    t = time.monotonic()
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=4)
    res = trainer.run()
    (_, _, _, folder, proc), = stand_in.started
    assert res.step == 4 and not compiled and not switch  # four eager steps
    assert proc.poll() is not None and not folder.exists() and time.monotonic() - t < 60
    # the run says why the next one trains eagerly again (it said nothing)
    assert any("ended at step 4, before its helper had compiled" in m for m in said), said


def test_no_helper_where_it_does_not_apply(tmp_path, monkeypatch):
    """With grad_accum the micro-batches' step takes other arguments: the run says so and compiles itself; with
    train.compile off there is nothing to compile ahead."""
    from ddpm_cli.engine.train import TrainCallbacks, Trainer

    stand_in, said = _StandIn(monkeypatch, "pass"), []

    class Callbacks(TrainCallbacks):
        def on_message(self, text):
            said.append(text)

    trainer = Trainer(tiny_config(tmp_path / "a", train__steps=2, train__grad_accum=2, train__compile="on",
                                  train__compile_ahead=True), callbacks=Callbacks())
    assert any("compile_ahead does not apply with train.grad_accum" in m for m in said), said
    assert trainer.step_cache is not None and trainer.loss_fn is trainer.step_cache  # compiled in the run
    said.clear()  # auto, the default, asked for nothing: it compiles in the run without a word
    trainer = Trainer(tiny_config(tmp_path / "c", train__steps=2, train__grad_accum=2, train__compile="on",
                                  train__compile_ahead="auto"), callbacks=Callbacks())
    assert not any("does not apply" in m for m in said) and trainer.loss_fn is trainer.step_cache, said
    trainer = Trainer(tiny_config(tmp_path / "b", train__steps=2, train__compile="off", train__compile_ahead=True))
    trainer.run()
    assert trainer.step_cache is None and not stand_in.started


def test_the_stand_in_config_keeps_what_makes_the_step_and_drops_the_rest(tmp_path):
    from ddpm_cli.config import config_to_dict, validate_config
    from ddpm_cli.engine.compile_ahead import stand_in_config

    cfg = tiny_config(tmp_path, train__compile_ahead=True, train__posthoc_ema=[0.1], train__guide_step=3,
                      train__ema_extra=[0.99], logging__fid_every=5, model__conditional=True,
                      train__early_stopping__enabled=True)
    helper = validate_config(stand_in_config(config_to_dict(cfg), str(tmp_path / "h"), "cuda:0"))
    assert helper.model == cfg.model and helper.diffusion == cfg.diffusion
    assert (helper.train.compile, helper.train.precision, helper.train.channels_last, helper.train.batch_size) == \
        (cfg.train.compile, cfg.train.precision, cfg.train.channels_last, cfg.train.batch_size)
    assert not helper.train.compile_ahead and not helper.train.ema and not helper.train.posthoc_ema
    assert helper.train.guide_step is None and not helper.logging.fid_every
    assert not helper.train.early_stopping.enabled and helper.train.device == "cuda:0"
    # the run searches cuDNN's algorithms itself (a search is kept per process): the helper's would only hold the GPU
    assert cfg.train.cudnn_benchmark and not helper.train.cudnn_benchmark


def test_a_helper_that_never_lets_go_is_waited_for_once_and_then_trained_beside(tmp_path, monkeypatch):
    """A helper hung inside a timing holds the GPU: the run waits HOLD_MAX_S once, says so, and trains its eager
    steps without waiting again."""
    from ddpm_cli.engine import compile_ahead

    monkeypatch.setattr(compile_ahead, "HOLD_MAX_S", 0.3)
    from ddpm_cli.errors import TrainingAborted

    stand_in = _StandIn(monkeypatch, "import sys, time; from pathlib import Path; "
                                     "Path(sys.argv[1], 'want').write_text('1'); time.sleep(4)")
    warned = []
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=2, train__steps=10**6)
    trainer.cb.on_warning = warned.append
    with pytest.raises(TrainingAborted):  # (stopped by the test's signal after the switch)
        trainer.run()
    held = [w for w in warned if "without letting go" in w]
    assert len(held) == 1, warned
    ahead, = stand_in.made
    assert ahead.holds == 1 and switch and switch[0] > 2  # one wait, then eager steps through the helper's 4 s


def test_a_helper_past_its_deadline_is_ended_and_the_run_compiles_its_step(tmp_path, monkeypatch):
    from ddpm_cli.engine import compile_ahead

    from ddpm_cli.engine.train import Trainer

    monkeypatch.setattr(compile_ahead, "DEADLINE_S", 1.5)
    monkeypatch.setattr(Trainer, "SWITCH_MIN_LEFT_S", 0.0)  # (a short budget: the run compiles to its end)
    stand_in = _StandIn(monkeypatch, "import time; time.sleep(120)")
    warned = []
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=10**6, train__max_time=8.0)
    trainer.cb.on_warning = warned.append
    trainer.run()
    (_, _, _, folder, proc), = stand_in.started
    assert any("not done after 2 s" in w or "not done after 1 s" in w for w in warned), warned
    assert proc.poll() is not None and not folder.exists()
    assert compiled and compiled == list(range(compiled[0], trainer.step)) and compiled[0] > 0


def _beside_a_busy_helper(tmp_path, monkeypatch):
    """(stand-in, trainer, its warnings, its compiled calls): a 6-step run whose helper compiles past its end."""
    stand_in = _StandIn(monkeypatch, "import time; time.sleep(120)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=6)
    warned = []
    trainer.cb.on_warning = warned.append
    return stand_in, trainer, warned, compiled


def test_an_eager_step_out_of_gpu_memory_is_taken_again_in_micro_batches_beside_the_helper(tmp_path, monkeypatch):
    """The eager step holds more activations than the compiled one, beside the helper's network (at 256 px a batch
    of 64 does not fit an H100 eagerly at all): out of memory, the run takes the step again in twice as many
    micro-batches, and keeps that split, while the helper compiles on."""
    import torch

    stand_in, trainer, warned, compiled = _beside_a_busy_helper(tmp_path, monkeypatch)
    real, calls = trainer._loss, []

    def loss(x, *args):
        calls.append((trainer.step, x.shape[0]))
        if trainer.step >= 2 and x.shape[0] > 4:  # from step 2 on, 4 images fit and 8 do not
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, *args)

    trainer._loss = trainer.loss_fn = loss  # (the eager step, until the compiled one is made)
    res = trainer.run()
    (_, _, _, folder, proc), = stand_in.started
    assert res.step == 6 and compiled == []  # every step eager: the helper was not ended for it
    assert [w for w in warned if "micro-batches" in w] == [
        "train.compile_ahead: the eager step ran out of GPU memory beside the helper; the eager steps run in "
        f"{k} micro-batches from step 3 on" for k in (2, 4)]
    assert calls[:4] == [(0, 16), (1, 16), (2, 16), (2, 8)]
    assert calls[4:] == [(s, 4) for s in range(2, 6) for _ in range(4)]
    assert all(math.isfinite(r["loss"]) for r in res.metrics if r.get("loss") is not None)
    assert any(r.get("loss") is not None for r in res.metrics)
    assert proc.poll() is not None and not folder.exists()


def test_an_eager_step_out_of_gpu_memory_one_image_at_a_time_ends_the_helper_and_takes_the_compiled_step(
        tmp_path, monkeypatch):
    """Where not even one image fits beside the helper, the run ends the helper and trains on compiled from that
    very step, losing no step."""
    import torch

    stand_in, trainer, warned, compiled = _beside_a_busy_helper(tmp_path, monkeypatch)
    real, sizes = trainer._loss, []

    def loss(x, *args):
        if trainer.ahead is not None and trainer.step >= 2:  # beside the helper, from step 2 on, nothing fits
            sizes.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, *args)

    trainer._loss = trainer.loss_fn = loss  # (the eager step, until the compiled one is made)
    res = trainer.run()
    (_, _, _, folder, proc), = stand_in.started
    assert res.step == 6
    assert sizes == [16, 8, 4, 2, 1]  # each split tried once, down to one image
    assert any("even one image at a time" in w for w in warned), warned
    assert compiled == [2, 3, 4, 5]  # the step that ran out, taken again compiled, and every one after
    assert trainer.eager_split is None
    assert proc.poll() is not None and not folder.exists()


def test_under_max_time_the_closing_work_is_budgeted_from_the_first_eager_step(tmp_path, monkeypatch):
    """While the helper compiles, the run trains eagerly: a budget that ends then must still leave time for the
    closing checkpoint and grid (costed after the run's first step, eager or compiled)."""
    from ddpm_cli.engine.train import Trainer

    _StandIn(monkeypatch, "import time; time.sleep(120)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=10**6, train__max_time=4.0)
    save, grid = trainer.save_checkpoint, trainer.sample_grid

    def slow_save():
        time.sleep(1.5)
        return save()

    def slow_grid(*args):
        time.sleep(0.5)
        return grid(*args)

    trainer.save_checkpoint, trainer.sample_grid = slow_save, slow_grid
    monkeypatch.setattr(Trainer, "_closing_cost", lambda self: (0.6, 1.6))
    res = trainer.run()
    assert not compiled and res.stop_reason == "time"
    assert res.elapsed_s < 4.0 + 1.2, res.elapsed_s  # (without the closing work budgeted: ~4 + 2)


def test_a_helper_done_too_close_to_the_budgets_end_leaves_the_run_eager(tmp_path, monkeypatch):
    """Loading the compiled step costs seconds (a minute at 256 px): with less than SWITCH_MIN_LEFT_S of the budget
    left, the run ends eagerly."""
    _StandIn(monkeypatch, "import time; time.sleep(0.5)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=10**6, train__max_time=3.0)
    res = trainer.run()
    assert res.step > 2 and not compiled and not switch


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_helper_whose_run_was_killed_takes_its_folder_away_and_ends(tmp_path):
    """kill -9 of the run leaves nobody to stop the helper or remove its folder: the helper does both."""
    import os
    import signal

    folder = tmp_path / "ddpm-compile-ahead-x"
    folder.mkdir()
    (folder / "helper.log").write_text("")
    run = f"""
import subprocess, sys, time
helper = '''
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from ddpm_cli.engine.compile_ahead import watch_parent
watch_parent(Path(sys.argv[1]), int(sys.argv[2]), poll_s=0.05)
time.sleep(60)
'''
import os
p = subprocess.Popen([sys.executable, "-c", helper, sys.argv[1], str(os.getpid())])
print(p.pid, flush=True)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", run, str(folder)], stdout=subprocess.PIPE, text=True)
    helper_pid = int(parent.stdout.readline())
    time.sleep(0.5)
    assert folder.exists()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    t_end = time.monotonic() + 10
    while folder.exists() and time.monotonic() < t_end:
        time.sleep(0.05)
    assert not folder.exists()
    while time.monotonic() < t_end:
        try:
            state = Path(f"/proc/{helper_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state in ("Z", "X"):  # ended (an orphan's parent may be slow to reap it)
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the helper outlived its run")


def test_an_eager_step_out_of_memory_in_its_backward_frees_that_steps_graph_before_the_compiled_step(tmp_path,
                                                                                                      monkeypatch):
    """Out of memory in the eager step's backward leaves the part of the graph not yet run (its saved activations)
    hanging from the step's loss: the step taken again (in micro-batches) must not run beside it."""
    import weakref

    import torch

    from conftest import with_failing_backward

    def out_of_memory(g):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _StandIn(monkeypatch, "import time; time.sleep(120)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=4)
    trainer.cb.on_warning = lambda text: None
    real, saved = trainer._loss, []

    def loss(*args):
        out = real(*args)
        if len(saved) == 0 and trainer.step == 1:
            activation = torch.ones(1024)  # saved by the product for its backward, which runs after the failing node
            saved.append(weakref.ref(activation))
            out = out + with_failing_backward(torch.ones(1, requires_grad=True) * activation, out_of_memory).sum() * 0
        return out

    alive = []

    def and_look_at_the_failed_step(*args):
        if saved and not alive:  # the step taken again (in micro-batches): the failed one's graph must be gone
            alive.append(saved[0]() is not None)
        return loss(*args)

    trainer._loss = trainer.loss_fn = and_look_at_the_failed_step
    assert trainer.run().step == 4
    assert alive == [False]


def test_a_helper_that_fails_near_the_budgets_end_leaves_the_run_eager(tmp_path, monkeypatch):
    """A cold compile in the run's last seconds would outlast the budget: a helper that failed (or ran out of time)
    there leaves the run eager to its end, with the failure said once."""
    _StandIn(monkeypatch, "import sys, time; time.sleep(0.5); print('the helper broke'); sys.exit(1)")
    warned = []
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=None, train__steps=10**6, train__max_time=3.0)
    trainer.cb.on_warning = warned.append
    res = trainer.run()
    assert res.step > 2 and not compiled and not switch
    failed = [w for w in warned if "the helper broke" in w]
    assert len(failed) == 1 and "eager" in failed[0], warned


def test_the_closing_work_is_costed_again_at_the_first_compiled_step(tmp_path, monkeypatch):
    """The first costing of the closing grid ran beside the helper's compile (every core busy): once the helper is
    done the run costs it again, or a timed run would stop early by the difference."""
    from ddpm_cli.engine.train import Trainer
    from ddpm_cli.errors import TrainingAborted

    _StandIn(monkeypatch, "import time; time.sleep(0.5)")
    costed = []

    def cost(self):
        costed.append(self.step)
        return 0.01, 0.01

    monkeypatch.setattr(Trainer, "_closing_cost", cost)
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=3, train__steps=10**6, train__max_time=300.0)
    with pytest.raises(TrainingAborted):
        trainer.run()
    assert switch and costed == [1, switch[0]], (costed, switch)


def test_a_run_that_stops_answering_tells_the_helper_which_then_times_without_waiting(tmp_path):
    """After a hold that ran out, the run answers no more requests; it says so (`ack` = off), so that the helper's
    later timings do not each wait ACK_WAIT_S for an answer that will not come."""
    from ddpm_cli.engine.compile_ahead import ACK, WANT, CompileAhead, _Gate

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ahead = CompileAhead(proc, tmp_path, open(tmp_path / "log", "w"))
        (tmp_path / WANT).write_text("1")
        import ddpm_cli.engine.compile_ahead as compile_ahead

        real, compile_ahead.HOLD_MAX_S = compile_ahead.HOLD_MAX_S, 0.2
        try:
            assert ahead.hold_if_asked(lambda: None)
        finally:
            compile_ahead.HOLD_MAX_S = real
        assert not ahead.answering
        (tmp_path / WANT).unlink()
        gate = _Gate(tmp_path, lambda: True)
        gate.asked = 1
        t = time.monotonic()
        gate.acquire()  # request 2: answered by nobody
        assert time.monotonic() - t < 2.0, (tmp_path / ACK).read_text()
    finally:
        proc.kill()
        proc.wait()


def test_a_release_timer_that_fired_late_leaves_a_hold_that_a_new_timing_took(tmp_path):
    """The helper's release timer can fire while the next timing is extending the hold; running after it, the late
    timer must not hand the GPU back in the middle of that timing."""
    from ddpm_cli.engine.compile_ahead import ACK, WANT, _Gate

    (tmp_path / ACK).write_text("1")
    gate = _Gate(tmp_path, lambda: True)
    gate.acquire()
    gate.release_later()
    late = gate.timer
    late.cancel()  # (its firing is played by hand below, after the next acquire)
    gate.acquire()  # the next timing: still held, no new request
    late.function(*late.args, **late.kwargs)
    assert gate.held and (tmp_path / WANT).read_text() == "1"
    gate.release()
    assert not gate.held and not (tmp_path / WANT).exists()


def test_the_helper_compiles_at_a_lower_priority_than_the_run(tmp_path):
    """The helper's compile workers take every core but one; at the run's priority they starved its eager steps
    (a cold first eager step took ~29 s beside them on an H100 host, ~6 s warm). The helper runs niced, and its
    workers inherit that."""
    import os

    import torch

    from ddpm_cli.config import config_to_dict
    from ddpm_cli.engine.compile_ahead import HELPER_NICE, CompileAhead

    cfg = tiny_config(tmp_path, train__compile="on")
    helper = CompileAhead.start(config_to_dict(cfg), "cpu", [torch.zeros(2, 3, 16, 16)], 0)
    try:
        assert os.getpriority(os.PRIO_PROCESS, helper.proc.pid) == os.getpriority(os.PRIO_PROCESS, 0) + HELPER_NICE
    finally:
        helper.stop()
    assert helper.proc.poll() is not None and not helper.folder.exists()


@pytest.mark.parametrize("search, deterministic", [(True, False), (False, False), (True, True)])
def test_eager_cudnn_turns_the_search_off_and_deterministic_on_for_the_step_then_puts_them_back(
        monkeypatch, search, deterministic):
    """cuDNN's algorithm search costs the first eager step seconds for steps that soon give way to the compiled
    one; deterministic, because torch keeps one pick per convolution under a key without `benchmark`, so the
    compiled step would reuse the eager steps' unsearched picks. Put back after the step, an error included, and
    nothing touched off CUDA (the flags are only flags: no GPU needed to see them)."""
    import torch

    from ddpm_cli.engine.compile_ahead import eager_cudnn

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", search)  # both restored after the test
    monkeypatch.setattr(cudnn, "deterministic", deterministic)
    with eager_cudnn(torch.device("cuda")):
        assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
    assert (cudnn.benchmark, cudnn.deterministic) == (search, deterministic)
    with pytest.raises(torch.cuda.OutOfMemoryError), eager_cudnn(torch.device("cuda", 0)):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert (cudnn.benchmark, cudnn.deterministic) == (search, deterministic)
    with eager_cudnn(torch.device("cpu")):
        assert (cudnn.benchmark, cudnn.deterministic) == (search, deterministic)


def test_only_compile_aheads_eager_steps_run_under_eager_cudnn(tmp_path, monkeypatch):
    """The eager steps' forward and backward run under eager_cudnn; the compiled steps after the switch do not."""
    from contextlib import contextmanager

    from ddpm_cli.engine import compile_ahead
    from ddpm_cli.errors import TrainingAborted

    inside, seen = [False], []

    @contextmanager
    def recorded(device):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(compile_ahead, "eager_cudnn", recorded)
    _StandIn(monkeypatch, "import time; time.sleep(2)")
    trainer, said, switch, compiled = _run(tmp_path, stop_after_switch=3, train__steps=10**6)
    real = trainer._loss

    def loss(*args):
        seen.append((trainer.loss_fn is loss, inside[0]))  # (the eager step calls _loss itself)
        return real(*args)

    trainer._loss = trainer.loss_fn = loss
    with pytest.raises(TrainingAborted):
        trainer.run()
    assert switch and set(seen) == {(True, True), (False, False)}, seen


@pytest.mark.parametrize("layout", ["on", "off"])
def test_an_eager_step_in_micro_batches_has_the_whole_batchs_gradient(tmp_path, monkeypatch, layout):
    """The split step is the same optimizer step (fp32 on the CPU, timesteps and noise drawn for the whole batch
    in the same order and layout: channels-last on CUDA): out of memory at the whole batch, the gradients the
    optimizer gets match an unsplit run's."""
    import torch

    def first_step_grads(name: str, fits: int):
        _StandIn(monkeypatch, "import time; time.sleep(120)")
        trainer, said, switch, compiled = _run(tmp_path / name, stop_after_switch=None, train__steps=1,
                                               train__channels_last=layout)
        assert trainer.channels_last is (layout == "on")
        trainer.cb.on_warning = lambda text: None
        real, step, grads = trainer._loss, trainer.opt.step, []

        def loss(x, *args):
            if x.shape[0] > fits:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(x, *args)

        def step_and_look(*args, **kwargs):
            grads.extend(p.grad.clone() for p in trainer.model.parameters() if p.grad is not None)
            return step(*args, **kwargs)

        trainer._loss = trainer.loss_fn = loss
        trainer.opt.step = step_and_look
        trainer.run()
        return trainer, grads

    whole, grads_whole = first_step_grads("whole", fits=16)
    split, grads_split = first_step_grads("split", fits=4)
    assert whole.eager_split is None and split.cfg.train.batch_size == 16
    assert len(grads_whole) == len(grads_split) == len(list(whole.model.parameters()))
    assert sum(g.abs().sum().item() for g in grads_whole) > 0
    for a, b in zip(grads_whole, grads_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
