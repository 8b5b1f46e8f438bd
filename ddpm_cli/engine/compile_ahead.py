"""`train.compile_ahead`: the run trains eagerly from its first step while a helper process compiles its step.

The helper builds the run's own Trainer (its config, a stand-in dataset of the first batch's shape), calls the
compiled step once on random inputs of the first batch's shapes, strides and dtypes, and saves the compile cache
entry (engine/compile_cache.py); torch's on-disk caches fill with it. When the helper exits, the run's next step
calls its own compiled step, which finds that entry: a warm start, inside the run, with the cold compile spent
training. Inductor times each kernel's candidate configurations at their first launch and keeps the fastest; timed
beside the run's eager steps the picks would be noisy, and kept. So the helper asks for the GPU around each timing
(a file `want` in a folder both see, holding a request number), the run finishes its queued work, answers `ack`
with that number and waits until `want` is gone (0.5 s after the helper's last timing: they come in runs, one
kernel after another). The numbers make a release followed at once by a new request (faster than the run looks)
one the run answers, not one it sleeps through."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

WANT, ACK, LOG, SPEC = "want", "ack", "helper.log", "spec.json"
OFF = "off"  # in `ack`: the run answers no more requests (a hold ran out)
RELEASE_S = 0.5  # the GPU goes back to the run this long after the helper's last timing
HOLD_MAX_S = 120.0  # a helper that asked and never let go (hung): the run stops answering and trains on
BRIEF_CHARS = 200  # a helper's failure is told in at most this many characters (the rest is in its log)


def brief_failure(line: str) -> str:
    """The last line of a failed helper's log as the run's warning says it: an out-of-memory error in ddpm's words
    (torch's own runs to several hundred characters of allocator advice), anything else cut to BRIEF_CHARS."""
    if "out of memory" in line.lower():
        size = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", line)
        return "it ran out of GPU memory" + (f" (tried to allocate {size.group(1)})" if size else "")
    return line if len(line) <= BRIEF_CHARS else line[:BRIEF_CHARS - 3] + "..."
ACK_WAIT_S = 30.0  # a run busy with other work (a checkpoint) for longer: the helper times without it
DEADLINE_S = 1200.0  # a helper not done by then is ended, and the run compiles its step itself
HELPER_NICE = 10  # the helper's niceness above the run's: its compile workers yield the cores the eager steps need


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def _write(path: Path, text: str) -> None:
    """Whole or not at all: the other process reads it at any moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def stand_in_config(cfg_dict: dict, run_dir: str, device: str) -> dict:
    """The run's config for the helper: the same network, diffusion, precision, layout and compile settings (they
    make the compiled step) on the run's device, nothing the step does not need (EMAs, evaluations, logging,
    early stopping), and no cuDNN algorithm search: torch keeps a search's picks in the process that made it, so
    the run searches again at its first compiled step, and the helper's search (seconds of GPU time on every
    convolution shape, beside the run's eager steps) would be thrown away. The search is not in the compile
    cache's key."""
    d = json.loads(json.dumps(cfg_dict))
    d["train"].update(device=device, steps=1, max_time=None, ema=False, ema_extra=[], posthoc_ema=[], posthoc_ema_every=0,
                      guide_step=None, compile_ahead=False, cudnn_benchmark=False)
    d["train"]["early_stopping"] = {**d["train"].get("early_stopping", {}), "enabled": False}
    d["data"].update(on_device="off", streaming="off")
    d["logging"].update(run_dir=run_dir, run_name="helper", fid_every=0, wandb="off", checkpoint_every=10**9,
                        sample_every=10**9, log_every=10**9)
    return d


@contextmanager
def eager_cudnn(device) -> Iterator[None]:
    """cuDNN's settings for an eager step while the helper compiles, put back after it (CUDA only). No algorithm
    search: it times each convolution's shapes at their first call, seconds the first step would wait for, to pick
    for steps that soon give way to the compiled one. Deterministic: torch keeps one pick per convolution, searched
    or not, under a key that holds `deterministic` but not `benchmark`, so the compiled step's convolutions (the
    same shapes) would otherwise reuse these unsearched picks and never search."""
    import torch

    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    kept = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = kept


class CompileAhead:
    """The run's side: starts the helper, answers its requests for the GPU, and tells when its entry is ready."""

    def __init__(self, proc: subprocess.Popen, folder: Path, log):
        self.proc, self.folder, self._log = proc, folder, log
        self.held_s = 0.0  # seconds the run waited while the helper timed kernels
        self.holds = 0
        self.answering = True  # False after a hold ran out (HOLD_MAX_S): the helper times beside the run from then
        self.started = time.monotonic()
        self.overdue = False  # ended by done() at DEADLINE_S
        self.failure_said = False  # the run has warned that the helper failed

    @classmethod
    def start(cls, cfg_dict: dict, device: str, inputs: list, classes: int) -> CompileAhead:
        """`inputs`: the compiled step's arguments at the first step (tensors or None), as the run calls it."""
        folder = Path(tempfile.mkdtemp(prefix="ddpm-compile-ahead-"))
        spec = {"config": stand_in_config(cfg_dict, str(folder / "runs"), device), "parent": os.getpid(),
                "classes": classes,
                "inputs": [None if t is None else {"shape": list(t.shape), "stride": list(t.stride()),
                                                   "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs]}
        (folder / SPEC).write_text(json.dumps(spec))
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding ddpm_cli
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # The compiler's worker pool: all cores but one, which the run's eager steps keep launching on
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
        log = open(folder / LOG, "w")
        proc = subprocess.Popen([sys.executable, "-m", "ddpm_cli.engine.compile_ahead", str(folder)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # Ctrl-C is the run's: it ends the helper (stop)
        try:  # before the helper starts its compile workers (seconds later, after importing torch): they inherit it
            os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + HELPER_NICE)
        except (AttributeError, OSError):  # no such call here, or refused: the helper keeps the run's priority
            pass
        return cls(proc, folder, log)

    def done(self) -> bool | None:
        """None while the helper runs; True once it has saved the compiled step, False if it failed or ran past
        DEADLINE_S (then it is ended here)."""
        code = self.proc.poll()
        if code is None and time.monotonic() - self.started > DEADLINE_S:
            self.overdue = True
            self.stop()
            return False
        return None if code is None else code == 0

    def last_line(self) -> str:
        if self.overdue:
            return f"not done after {DEADLINE_S:.0f} s"
        try:
            lines = [x for x in (self.folder / LOG).read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            lines = []
        return brief_failure(lines[-1].strip()) if lines else f"exit {self.proc.returncode}"

    def hold_if_asked(self, sync: Callable[[], None], stopping: Callable[[], bool] = lambda: False) -> bool:
        """Before an eager step: if the helper wants the GPU, finish the queued work, answer each request it makes
        meanwhile, and wait until it lets go (or ends, or the run is stopping). A hold that lasts HOLD_MAX_S means a
        hung helper: the run stops answering for good. Returns whether it held."""
        want = self.folder / WANT
        if not self.answering or not want.exists():
            return False
        sync()
        t, answered = time.monotonic(), None
        while self.proc.poll() is None and not stopping():
            asked = _read(want)
            if asked is None:
                break
            if time.monotonic() - t >= HOLD_MAX_S:
                self.answering = False
                _write(self.folder / ACK, OFF)  # the helper's later requests wait for no answer
                break
            if asked != answered:
                _write(self.folder / ACK, asked)
                answered = asked
            time.sleep(0.002)
        self.held_s += time.monotonic() - t
        self.holds += 1
        return True

    def stop(self) -> None:
        """End the helper (the run has finished, or stops) and take its folder away."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- the helper's side ----------------------------------------------------------------------------------------


class _Gate:
    """The helper's side of the GPU hand-over: `acquire` before a timing, `release_later` after it."""

    def __init__(self, folder: Path, parent_alive: Callable[[], bool]):
        self.folder, self.parent_alive = folder, parent_alive
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.asked = 0  # the last request's number
        self.held = False

    def acquire(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.held:  # still held from the timing before
                return
            self.asked += 1
            asked = str(self.asked)
            _write(self.folder / WANT, asked)
            self.held = True
        t = time.monotonic()
        while (_read(self.folder / ACK) not in (asked, OFF) and self.parent_alive()
               and time.monotonic() - t < ACK_WAIT_S):
            time.sleep(0.002)

    def release_later(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = threading.Timer(RELEASE_S, self.release)
            self.timer.args = (self.timer,)
            self.timer.daemon = True
            self.timer.start()

    def release(self, timer: threading.Timer | None = None) -> None:
        """Hand the GPU back; from `timer`, only if it is still the current one (a timer that fired while
        `acquire` extended the hold waits for the lock, and must then leave that hold alone)."""
        with self.lock:
            if timer is not None and timer is not self.timer:
                return
            (self.folder / WANT).unlink(missing_ok=True)
            self.held = False
            self.timer = None


def _gate_inductor_timings(gate: _Gate) -> bool:
    """Wrap inductor's runtime autotuner (a private name) so that each kernel's timing asks for the GPU first.
    False where this torch has no such method: the helper then times beside the run."""
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return False
    name = next((n for n in ("autotune_to_one_config", "benchmark_all_configs") if hasattr(CachingAutotuner, n)),
                None)
    if name is None:
        return False
    original = getattr(CachingAutotuner, name)

    def gated(self, *args, **kwargs):
        gate.acquire()
        try:
            return original(self, *args, **kwargs)
        finally:
            gate.release_later()

    setattr(CachingAutotuner, name, gated)
    return True


def _inputs(spec: dict, device):
    import torch

    out = []
    for s in spec["inputs"]:
        if s is None:
            out.append(None)
            continue
        dtype = getattr(torch, s["dtype"])
        t = torch.empty_strided(s["shape"], s["stride"], dtype=dtype, device=device)
        if dtype.is_floating_point:
            t.normal_().clamp_(-1, 1)
        else:
            t.random_(0, max(1, spec["classes"]))
        out.append(t)
    return out


def watch_parent(folder: Path, parent: int, poll_s: float = 1.0) -> Callable[[], bool]:
    """A run killed with -9 cannot end its helper or take its folder away: the helper does both itself once its
    parent is gone. Returns the test of the parent's life."""
    def parent_alive() -> bool:
        return os.getppid() == parent

    def watch() -> None:
        while parent_alive():
            time.sleep(poll_s)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
    return parent_alive


def main(folder: Path) -> int:
    spec = json.loads((folder / SPEC).read_text())
    parent_alive = watch_parent(folder, spec["parent"])
    gate = _Gate(folder, parent_alive)
    if not _gate_inductor_timings(gate):
        print("compile_ahead: this torch has no CachingAutotuner to gate; kernels are timed beside the run")

    import torch

    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.data import ImageSet
    from ddpm_cli.engine.train import Trainer

    cfg = validate_config(spec["config"])
    x_spec = spec["inputs"][0]
    n = max(2, x_spec["shape"][0])
    c, h, w = x_spec["shape"][1:]
    classes = [f"class{i}" for i in range(spec["classes"])] if cfg.model.conditional else []
    ds = ImageSet(torch.zeros(n, c, h, w, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64), classes)
    trainer = Trainer(cfg, dataset=ds)
    try:
        if not trainer.compiled:
            print("compile_ahead: the stand-in run does not compile; nothing to do")
            return 1
        args = _inputs(spec, trainer.device)
        loss = trainer.loss_fn(*args)
        loss.backward()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        trainer.step_cache.save()
        print(f"compile_ahead: compiled; compile cache {trainer.step_cache.state}")
    finally:
        gate.release()
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
