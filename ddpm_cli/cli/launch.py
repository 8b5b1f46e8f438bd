"""`--gpus N`: re-run the same command under torch.distributed.run (torchrun) with N processes, one per GPU."""
from __future__ import annotations

import os
import sys


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def relaunch_with_torchrun(gpus: int) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    argv = list(sys.argv[1:])
    if "--gpus" in argv:
        i = argv.index("--gpus")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--gpus=")]
    # On a signal torchrun passes it on and kills the ranks after this many seconds (its default is 30): enough
    # for them to finish a cold compiled first step, minutes for a large network (BENCHMARKS.md, first step), and
    # write their checkpoint.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    try:
        torchrun_main(["--standalone", f"--nproc_per_node={gpus}", "-m", "ddpm_cli", *argv])
    except ChildFailedError as e:  # the ranks have said why on stderr; no launcher traceback on top
        codes = [f.exitcode for f in e.failures.values()]
        raise SystemExit(next((c for c in codes if c > 0), 1)) from None
    except SignalException as e:  # torchrun passed the signal on to the ranks, which checkpointed and said so
        raise SystemExit(128 + int(e.sigval)) from None
