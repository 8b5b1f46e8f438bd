"""Terminal output: the rich consoles, error rendering (one line per problem, then exit), and the training
progress display (a live bar on a terminal, plain lines in logs)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from typing import Any, Callable

import typer
from rich.console import Console
from rich.text import Text


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The output's reader has gone (`ddpm train ... | head`, a closed terminal): send the rest nowhere and go
        on, so that the work reaches its end and its files (rich's own answer is to exit at once)."""
        os.dup2(os.open(os.devnull, os.O_WRONLY), (sys.stderr if self.stderr else sys.stdout).fileno())


console = _Console(highlight=False, emoji=False)  # paths like runs/a:100:b print as they are
err_console = _Console(stderr=True, highlight=False, emoji=False)


def labelled(label: str, style: str, message: str) -> Text:
    """`label` in `style`, then `message` exactly as written: rich markup is never read in a message, so paths
    like runs[1]/model[v2].safetensors and install hints like 'ddpm-cli[export]' keep their brackets."""
    return Text.assemble((label, style), " ", message)


def fail(message: str, problems: list[str] | None = None, code: int = 1) -> None:
    err_console.print(labelled("error:", "bold red", message), soft_wrap=True)
    for line in problems or []:
        err_console.print(f"  {line}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def close_option(option: str, params) -> str | None:
    """The long option of `params` (a click command's) that `option` most likely misspells, or None. Compared by
    name: the shared "--" would make --bogus near --gpus."""
    import difflib

    names = [o.lstrip("-") for p in params for o in p.opts if o.startswith("--")]
    near = difflib.get_close_matches(option.lstrip("-"), names, n=1, cutoff=0.75)
    return f"--{near[0]}" if near else None


def warn(message: str) -> None:
    """One `warning: ...` line on stderr, the message as written. (Under a live progress bar rich's Live has
    sys.stderr redirected, and err_console writes to whatever sys.stderr is, so the line lands above the bar.)"""
    err_console.print(labelled("warning:", "yellow", message), soft_wrap=True)


@contextlib.contextmanager
def _warnings_as_lines():
    """The engine's DdpmWarnings (raised where it has no callback) as `warning: ...` lines like every other warning,
    each time it happens; other Python warnings as Python shows them."""
    from ddpm_cli.errors import DdpmWarning

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("always", DdpmWarning)
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, DdpmWarning):
                warn(str(message))
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


_quick_exit = False


def exit_quickly_when_done() -> None:
    """Ask the console entry point (`app.main`) to end the process as soon as this command returns, its output
    flushed, without Python's teardown: with a CUDA context and torch.compile's modules loaded that teardown takes
    seconds, and a command whose files are all written and closed (sample, eval) leaves it nothing to do. Commands
    run in-process (tests, notebooks) never reach `main`, so nothing ends them; nor are torchrun's ranks, which
    leave with their process group."""
    from ddpm_cli.cli.launch import under_torchrun

    global _quick_exit
    _quick_exit = not under_torchrun()


def quick_exit_requested() -> bool:
    return _quick_exit


def end_process(code: object) -> None:
    """End the process now with a SystemExit's code (None: 0; a message: printed, then 1), output flushed."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to save
            pass
    os._exit(code or 0)


LAUNCH_DIR = "DDPM_LAUNCH_DIR"  # set by `--gpus N`'s launcher (cli/launch.py): a folder its ranks share


def _leave_for_the_ranks(message: str) -> None:
    """A rank's error, left in the launcher's folder for the other ranks (rank 0's: _said_by_rank_0; any:
    _a_peer_said_an_error); nothing without --gpus."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder:
        return
    said = os.path.join(folder, f"rank{int(os.environ.get('RANK', '0'))}-error")
    try:
        with open(f"{said}.tmp", "w") as f:
            f.write(message)
        os.replace(f"{said}.tmp", said)  # whole or absent to a rank that reads it
    except OSError:
        pass


def _said_by_rank_0(message: str) -> bool:
    """Under `--gpus N` every rank meets the same bad input (a missing data.root, say), and N copies of its line
    would follow: rank 0 says it, a rank past 0 that met the same error says nothing, and one that met an error of
    its own (waiting up to 2 s for rank 0's) says that. Not under --gpus: False."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder or int(os.environ.get("RANK", "0")) == 0:
        return False
    said = os.path.join(folder, "rank0-error")
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            with open(said) as f:
                return f.read() == message
        except OSError:
            time.sleep(0.05)
    return False


def _a_peer_said_an_error(wait_s: float = 2.0) -> bool:
    """Under `--gpus N`: whether another rank has said an error (or does within `wait_s`). A rank waiting for it in
    a collective then fails with the collective's own error (gloo's "Connection closed by peer", NCCL's), which
    says nothing the other rank's line has not: it ends quietly. Not under --gpus: False."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder:
        return False
    own = f"rank{int(os.environ.get('RANK', '0'))}-error"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if any(n.endswith("-error") and n.startswith("rank") and n != own for n in os.listdir(folder)):
                return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def friendly(fn: Callable) -> Callable:
    """Run a command body; turn the project's errors into one clear line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ddpm_cli.errors import ConfigError, DdpmError

        try:
            with _warnings_as_lines():
                return fn(*args, **kwargs)
        except DdpmError as e:  # (a ConfigError too)
            if _said_by_rank_0(str(e)):
                raise SystemExit(e.exit_code) from None
            try:
                fail(str(e), e.problems if isinstance(e, ConfigError) else None, e.exit_code)
            finally:  # once said: a rank that reads it ends, and torchrun may then end this one
                _leave_for_the_ranks(str(e))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except MemoryError:
            fail("out of memory; lower the batch size")
        except OSError as e:
            if e.__class__.__module__ == "builtins":
                fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
            raise
        except RuntimeError as e:
            text = str(e).lower()
            if "out of memory" in text or "can't allocate memory" in text:  # CUDA's words; the CPU allocator's
                fail("the device ran out of memory; lower the batch size (train.batch_size or --batch-size), or "
                     "train it in micro-batches (train.grad_accum) with activation checkpointing (model.checkpointing)")
            if text.startswith("symlink loop"):  # Path.resolve() of links that point at each other (Python < 3.13)
                fail(f"{e}: the links point at each other; give the file itself")
            if _a_peer_said_an_error():  # torch.distributed's errors are RuntimeErrors
                # at once: the broken process group's threads are still running, and its teardown at the
                # interpreter's exit can abort the process ("terminate called without an active exception")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            raise

    return wrapper


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"  # 0.039, not 0.0


class TrainDisplay:
    """TrainCallbacks for the terminal. Built lazily so that `ddpm --help` never imports the engine."""

    def __init__(self, total: int, live: bool | None = None):
        self.total = total
        self.live = sys.stdout.isatty() if live is None else live
        self.progress = None
        self.task = None
        self.t_start = time.monotonic()

    def on_start(self, info: dict) -> None:
        self.total = info["total_steps"]
        flags = ", ".join(k for k in ("bf16", "compile", "channels_last", "checkpointing") if info.get(k)) or "fp32"
        if info["world"] > 1:
            flags += f", grad sync {info['grad_sync']}"
        if info.get("lr_scaling", "none") != "none":
            flags += f", peak lr {info['peak_lr']:.3g} ({info['lr_scaling']}-scaled)"
        batch = f"global batch {info['global_batch']}"
        k = info.get("grad_accum", 1)
        if k > 1:  # the memory a step needs is that of one micro-batch
            batch += f" ({k} micro-batches of {info['global_batch'] // (info['world'] * k)} per device)"
        console.print(f"run {info['run_dir']}  |  {info['device']} x{info['world']}  |  {info['params']:,} params  |  "
                      f"{info['images']:,} images  |  {batch}  |  {flags}",
                      markup=False, soft_wrap=True)
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=console, refresh_per_second=4)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=info["start_step"],
                                               stats="")

    def on_step(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def on_log(self, rec: dict) -> None:
        if "val_loss" in rec or "fid" in rec:  # records of their own, beside the metrics lines
            line = (f"step {rec['step']}: held-out loss {rec['val_loss']:.5f} (best {rec['best_val_loss']:.5f})"
                    if "val_loss" in rec else f"step {rec['step']}: FID {rec['fid']:.2f}")
            (self.progress.console if self.progress else console).print(line, markup=False)
            return
        loss = f"{rec['loss']:.4f}" if rec.get("loss") is not None else "nan"
        stats = f"loss {loss}  lr {rec['lr']:.2e}  {fmt_rate(rec['img_per_s'])} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=rec["step"], stats=stats)
        else:
            done = rec["step"] / max(self.total, 1)
            console.print(f"step {rec['step']}/{self.total} ({done:.0%})  {stats}  "
                          f"grad-norm {rec['grad_norm'] or float('nan'):.3f}", markup=False, soft_wrap=True)

    def on_message(self, text: str) -> None:
        """Notes (resumed from ..., compiling) go to stdout; warnings (on_warning) to stderr, as every command's."""
        (self.progress.console if self.progress else console).print(text, markup=False, soft_wrap=True)

    def on_warning(self, text: str) -> None:
        warn(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def fmt_duration(seconds: float) -> str:
    """`45 s`, `12 min`, `2.3 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class PlainProgress:
    """Progress as plain lines, for logs and pipes where a live bar cannot draw: a line when a stage starts, an
    estimate of its time after its second batch, a line every `every_s` seconds, and one when it ends.

    Rates and estimates leave the first batch out: on a GPU it carries the stage's one-off start (compiling the
    sampler, loading Inception), so a rate that counted it would overstate the time left many times over."""

    def __init__(self, console: Console, every_s: float = 30.0, unit: str = "images"):
        self.console, self.every_s, self.unit = console, every_s, unit
        self.name: str | None = None
        self.total = self.done = 0
        self.t0 = self.last = 0.0
        self.first: tuple[float, int] | None = None  # when the first batch ended, and its size

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True, highlight=False)

    def start(self, name: str, total: int) -> None:
        self.finish()
        self.name, self.total, self.done, self.first = name, total, 0, None
        self.t0 = self.last = time.monotonic()
        self._print(f"{name}: {total:,} {self.unit}")

    def advance(self, done: int) -> None:
        if self.name is None:
            return
        now, second, self.done = time.monotonic(), self.first is not None and self.done == self.first[1], done
        if self.first is None:
            self.first = (now, done)
            self.last = now
            return
        t1, d1 = self.first
        rate = (done - d1) / max(now - t1, 1e-9)  # after the first batch
        left = max(self.total - done, 0) / max(rate, 1e-9)
        if done >= self.total:
            return
        if second:
            self._print(f"{self.name}: about {fmt_duration(left + now - self.t0)} for {self.total:,} {self.unit} "
                        f"at {fmt_rate(rate)} {self.unit}/s (the first batch took {t1 - self.t0:.1f} s)")
            self.last = now
        elif now - self.last >= self.every_s:
            self._print(f"{self.name}: {done:,}/{self.total:,} {self.unit} ({done / max(self.total, 1):.0%}), "
                        f"{fmt_rate(rate)} {self.unit}/s, about {fmt_duration(left)} left")
            self.last = now

    def finish(self) -> None:
        if self.name is not None:
            dt = time.monotonic() - self.t0
            self._print(f"{self.name}: {self.done:,} {self.unit} in {dt:.1f} s ({fmt_rate(self.done / max(dt, 1e-9))}"
                        f" {self.unit}/s)")
        self.name = None
