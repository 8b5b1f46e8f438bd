"""`--gpus N`: re-run the same command under torch.distributed.run (torchrun) with N processes, one per GPU."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def relaunch_with_torchrun(gpus: int) -> None:
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from ddpm_cli.cli.ui import LAUNCH_DIR, fail, warn

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have and gpus > have:
        fail(f"--gpus {gpus}, but this machine has {have} CUDA GPU(s); pass --gpus {have} or fewer", code=2)
    if not have:
        cores = os.cpu_count() or 1
        if gpus > cores:
            fail(f"--gpus {gpus} on a machine without a CUDA GPU would start {gpus} CPU processes on {cores} cores; "
                 f"run without --gpus", code=2)
        warn(f"no CUDA GPU here: --gpus {gpus} runs {gpus} processes on the CPU (gloo), as the tests do; run "
             f"without --gpus for one")
    argv = list(sys.argv[1:])
    if "--gpus" in argv:
        i = argv.index("--gpus")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--gpus=")]
    # On a signal torchrun passes it on and kills the ranks after this many seconds (its default is 30): enough
    # for them to finish a cold compiled first step, minutes for a large network (BENCHMARKS.md, first step), and
    # write their checkpoint.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    _quiet_torchrun_logs()
    os.environ[LAUNCH_DIR] = tempfile.mkdtemp(prefix="ddpm-launch-")  # where the ranks leave their errors (cli/ui.py)
    try:
        torchrun_main(["--standalone", f"--nproc_per_node={gpus}", "-m", "ddpm_cli", *argv])
    except ChildFailedError as e:  # a rank that failed has said why on stderr; no launcher traceback on top
        codes = [f.exitcode for f in e.failures.values()]
        if any(c > 0 for c in codes):  # (torchrun then ended the others with a signal)
            raise SystemExit(next(c for c in codes if c > 0)) from None
        # every failed rank was killed by a signal, and said nothing (the kernel's out-of-memory killer, a crash)
        rank, signum = min((rank, -f.exitcode) for rank, f in e.failures.items())
        fail(f"rank {rank} was killed by {_signal_name(signum)} (out of host memory, or a crash); run again with "
             f"fewer --gpus or a smaller batch, or without --gpus to see its error", code=128 + signum)
    except SignalException as e:  # torchrun passed the signal on to the ranks, which checkpointed and said so
        raise SystemExit(128 + int(e.sigval)) from None
    except Exception as e:
        signum = _signal_behind(e, SignalException)
        if signum is None:
            raise
        # torchrun's agent failed while the signal was being raised in it (torch's own slip: its poll's timer
        # reads a start time the signal came before; tests/test_distributed.py), so it passed nothing on: the
        # ranks get the signal from here, and checkpoint and stop as they would have
        _signal_children(signum, float(os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]))
        raise SystemExit(128 + signum) from None
    finally:
        shutil.rmtree(os.environ.pop(LAUNCH_DIR), ignore_errors=True)


def _signal_behind(e: BaseException | None, signal_exception: type) -> int | None:
    """The signal of a torchrun SignalException that `e` was raised while handling, if any."""
    while e is not None:
        if isinstance(e, signal_exception):
            return int(e.sigval)
        e = e.__context__
    return None


def _signal_children(signum: int, timeout: float) -> None:
    """Send `signum` to torchrun's ranks among this process's children and wait up to `timeout` seconds for them
    to end (Linux: read from /proc). Other children are left alone: a multiprocessing forkserver or resource
    tracker this process started is no rank, and signalling or reaping it breaks what later uses it."""
    import time
    from pathlib import Path

    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid() and _is_rank(int(stat.parent.name)):
                pids.append(int(stat.parent.name))  # (stat's 4th field: the parent)
        except (OSError, ValueError, IndexError):
            continue
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = [pid for pid in pids if _running(pid)]


def _is_rank(pid: int) -> bool:
    """Whether process `pid` was started by torchrun as a rank: torchrun gives each the run's id in its
    environment (/proc/PID/environ holds the environment it was started with)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        return any(entry.startswith(b"TORCHELASTIC_RUN_ID=") for entry in f.read().split(b"\0"))


def _running(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)  # (reaps it once it has ended)
    except ChildProcessError:  # reaped already
        return False


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _quiet_torchrun_logs() -> None:
    """torchrun logs its own lines around the ranks' (a warning on OMP_NUM_THREADS at each launch; on a failure
    "Sending process ... SIGTERM" and "failed (exitcode: 1)" after the rank's own error line): its loggers, each
    given its level when created, keep only what is critical. A failure still ends the launcher with the rank's
    exit code (ChildFailedError, above), and what went wrong is the ranks' to say."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
