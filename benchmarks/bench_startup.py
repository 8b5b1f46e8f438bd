"""Start-up: where a fresh `ddpm train` (to its first step) and `ddpm sample` process spends its time, with the
compile cache (engine/compile_cache.py) cold, warm, carried to a new machine, and off.

    PYTHONPATH=. python benchmarks/bench_startup.py                       # examples/cifar10-fast.yaml's network, GPU
    PYTHONPATH=. python benchmarks/bench_startup.py --tiny --compile off  # a tiny model on the CPU: checks the script

Each run is the real command (the CLI's main() in a fresh Python process, timed by wrapping a few engine functions)
under one scenario:
  cold           an empty compile cache, an empty inductor/Triton cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR
                 in a new folder) and an empty data cache (the decoded or drawn training set: DDPM_DATA_CACHE_DIR)
  warm           all three as the cold run left them
  portable       the compile cache as the cold run left it, an empty inductor cache and data cache (another machine
                 or container)
  inductor-only  DDPM_COMPILE_CACHE=off with inductor's cache warm (start-up as it was before the compile cache)
Phases (seconds): import (torch and the CLI), checkpoint (sample: reading it), network set-up (train: config, data,
network, optimizer; sample: the network and its guide prepared), compile (loading the cache entry and the first
network call, plus the first backward when training: host time, which compiling dominates), first batch (the rest
of the first step or sampling batch), rest (to the command's end); wall_s is start to exit as a user sees it;
compiled_step_ms is the median step of a training run's compiled steps from the tenth on (give --train-steps and
--set train.max_time=S for a run long enough to have them).
The training runs train `--train-steps` steps (data: the built-in shapes unless --set says otherwise), keep an
autoguidance guide, and the sample runs draw from the cold training run's checkpoint. One BENCH JSON line per run,
then a ROW line that says it briefly."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("cold", "warm", "portable", "inductor-only")
TINY = ["model.base_channels=16", "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[]", "model.image_size=16", "train.batch_size=8", "data.shapes_count=64"]

# Runs in the fresh process: the real CLI, with timestamps taken where the engine's phases end.
DRIVER = r"""
import json, os, sys, time
T = time.perf_counter
marks = {"start": T()}
import torch
import ddpm_cli.cli.app as cli_app
from ddpm_cli.cli import ui
from ddpm_cli.engine import checkpoint, compile_cache, generate, train
marks["import"] = T()
caches, backward, batches, steps = [], [], [], []

_init = compile_cache.CompileCache.__init__
def cache_init(self, *a, **k):
    _init(self, *a, **k)
    caches.append(self)
compile_cache.CompileCache.__init__ = cache_init

def mark_after(owner, name, mark, first):
    fn = getattr(owner, name)
    def wrapped(*a, **k):
        out = fn(*a, **k)
        if not (first and mark in marks):
            marks[mark] = T()
        return out
    setattr(owner, name, wrapped)

# the training set-up's parts (seconds; an outer part holds what it calls: a part inside another is not counted)
set_up_parts, depth = {}, [0]
def time_part(owner, name, label):
    fn = getattr(owner, name)
    def wrapped(*a, **k):
        t = T()
        depth[0] += 1
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0 and "network set-up" not in marks:
                set_up_parts[label] = set_up_parts.get(label, 0.0) + T() - t
    setattr(owner, name, wrapped)
for owner, name, label in [(train, "load_dataset", "data"), (train, "training_batches", "batches"),
                           (train, "build_unet", "network"), (torch.nn.Module, "to", "to device (CUDA's start)"),
                           (train, "EMA", "EMA copies"), (train.monitor, "InTrainingFid", "FID monitor"),
                           (train, "build_optimizer", "optimizer (imports torch's compiler)"),
                           (train.Trainer, "_make_compiled_step", "compiled step's set-up")]:
    time_part(owner, name, label)
helper_start = []
_start_ahead = train.Trainer._start_compile_ahead
def start_ahead(self, *a, **k):  # train.compile_ahead: starting its helper, in the first step
    t = T()
    out = _start_ahead(self, *a, **k)
    if out is not None:  # (under train.compile_ahead auto, None: the compile cache held the step, compiled here)
        helper_start.append(T() - t)
    return out
train.Trainer._start_compile_ahead = start_ahead
_setup = train.Trainer._setup
def setup(self, *a, **k):  # where the trainer's set-up starts: before it, the CLI (options, config, checks)
    marks.setdefault("trainer", T())
    return _setup(self, *a, **k)
train.Trainer._setup = setup

mark_after(checkpoint, "load_model", "checkpoint", first=True)  # draw.py imports these at call time: patched
mark_after(generate, "sampling_net", "network set-up", first=False)  # the last: a guide's comes after the model's
mark_after(train.Trainer, "__init__", "network set-up", first=True)

_generate = generate.generate
def timed_generate(*a, **k):
    for item in _generate(*a, **k):  # each batch comes back on the CPU: the time is the batch's end
        batches.append(T())
        yield item
generate.generate = timed_generate

_on_step = ui.TrainDisplay.on_step
def on_step(self, step):  # after the first step the trainer has synchronised the GPU
    steps.append(T())
    return _on_step(self, step)
ui.TrainDisplay.on_step = on_step

ahead = {}
_end_ahead = train.Trainer._end_compile_ahead
def end_ahead(self, ok):  # train.compile_ahead: the step from which the run's steps are compiled
    ahead.update(ok=ok, step=self.step + 1, held_s=round(self.ahead.held_s, 2), holds=self.ahead.holds)
    return _end_ahead(self, ok)
train.Trainer._end_compile_ahead = end_ahead

_backward = torch.Tensor.backward
def timed_backward(self, *a, **k):
    t = T()
    out = _backward(self, *a, **k)
    backward.append(T() - t)
    return out
torch.Tensor.backward = timed_backward

_end_process = ui.end_process
quick_exit = []
def end_after_the_report(code):  # sample and eval end their process at once: after this report, here
    quick_exit.append(code)
    raise SystemExit(code)
ui.end_process = end_after_the_report

code = 0
sys.argv = ["ddpm", *json.loads(sys.argv[1])]
try:
    cli_app.main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
marks["end"] = T()
ends = steps or batches
used = [c for c in caches if c.called]
loaded_s = sum(c.load_s + c.first_call_s for c in used)  # the compiled network's load and first call
compile_s = loaded_s + (backward[0] if steps and used else 0.0)
sys.path.insert(0, os.environ["BENCH_STARTUP_DIR"])
from bench_startup import phases_of
eager_first = bool(steps) and bool(helper_start)  # train.compile_ahead's helper ran: compiled at the switch
phases = phases_of(marks, ends, compile_s, eager_first)
# the compiled steps' pace once settled: the median interval between steps, from the tenth compiled step on (under
# train.max_time the host keeps at most two steps queued, so these intervals are the device's)
# (with compile_ahead, the step of the switch, whether the helper succeeded or the run compiled itself; a run whose
# eager step ran out of memory switched without a record here, and reports none)
first_compiled = ahead["step"] if ahead else (1 if steps and used and not eager_first else None)
late = steps[first_compiled + 8:] if first_compiled else []  # steps[k - 1] ends step k
intervals = sorted(b - a for a, b in zip(late, late[1:]))
compiled_step_ms = round(1000 * intervals[len(intervals) // 2], 3) if len(intervals) >= 5 else None
breakdown = {}
compiler_imported = "torch._dynamo" in sys.modules  # an eager job that imports it pays seconds for nothing
try:  # where compiling went, by torch's own timers (seconds, summed over the process's compiles)
    if not compiler_imported:  # importing it here would add its import time to wall_s
        raise ImportError("the job did not import torch's compiler")
    from torch._dynamo.utils import calculate_time_spent, compile_times, counters
    breakdown = {k: round(v, 2) for k, v in calculate_time_spent().items()}
    names, rows = compile_times(repr="csv", aggregate=True)
    # AOTAutograd's and inductor's caches: hits, misses, bypasses (the reason is in torch's log)
    breakdown["aot_autograd"] = {k: v for k, v in counters["aot_autograd"].items() if "cache" in k or "bypass" in k}
    breakdown["inductor"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    breakdown["top"] = sorted(((n, round(float(v), 2)) for n, v in zip(names, rows)), key=lambda x: -x[1])[:12]
except Exception as e:
    breakdown = {"unavailable": repr(e)}
print("PHASES " + json.dumps({"phases": {k: None if v is None else round(v, 2) for k, v in phases.items()},
                              "torch_compile_s": breakdown, "compiler_imported": compiler_imported,
                              ("to_first_step_s" if steps else "to_first_batch_s"):
                                  round(ends[0] - marks["start"], 2) if ends else None,
                              "compile_ahead": {**ahead, "to_compiled_step_s": round(steps[ahead["step"] - 1]
                                                                                       - marks["start"], 2),
                                                "switch_compile_s": round(loaded_s, 2)}
                                  if ahead.get("ok") and len(steps) >= ahead["step"] else ahead or None,
                              "set_up_parts": {"before the trainer": round(marks["trainer"] - marks["import"], 2),
                                               **{k: round(v, 2) for k, v in set_up_parts.items()}}
                                  if "trainer" in marks else None,
                              "helper_start_s": round(helper_start[0], 2) if helper_start else None,
                              "steps": len(steps), "compiled_step_ms": compiled_step_ms,
                              "cache_load_s": round(sum(c.load_s for c in used), 2),
                              "compile_cache": [c.state for c in used],
                              "first_call_s": [round(c.first_call_s, 2) for c in used]}), flush=True)
if quick_exit:
    _end_process(code)
sys.exit(code)
"""


def phases_of(marks: dict, ends: list[float], compile_s: float, eager_first: bool) -> dict:
    """The run's phases (seconds) from the driver's timestamps (`marks`: start, import, checkpoint where a sample
    job reads one, network set-up, end; `ends`: when each step or batch ended). `compile_s` is the compiled
    network's load and first call; it stands between the set-up and the first step unless that step was eager
    (`eager_first`: train.compile_ahead, whose run loads the helper's step at its switch, later, within "rest")."""
    set_up = marks.get("network set-up", marks["import"])
    before_first = 0.0 if eager_first else compile_s
    return {"import": marks["import"] - marks["start"],
            "checkpoint": marks["checkpoint"] - marks["import"] if "checkpoint" in marks else None,
            "network set-up": set_up - marks.get("checkpoint", marks["import"]),
            "compile": before_first,
            "first batch": ends[0] - set_up - before_first if ends else None,
            "rest": marks["end"] - (ends[0] if ends else set_up)}


def child_env(**extra: str) -> dict:
    """This environment for a child process, with the project first on PYTHONPATH (carried packages stay found)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def first_checkpoint(work: Path) -> Path | None:
    """The oldest checkpoint of the oldest run under `work` (the cold training run's, or the untimed one's)."""
    from ddpm_cli.engine.runs import list_checkpoints

    found = [c for run in sorted((work / "runs").glob("*/")) for c in list_checkpoints(run)]
    return found[0] if found else None


def scenario_env(scenario: str, ddpm_dir: Path, inductor_dir: Path) -> dict:
    env = child_env(PYTHONUNBUFFERED="1", DDPM_COMPILE_CACHE_DIR=str(ddpm_dir),
                    TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), TRITON_CACHE_DIR=str(inductor_dir / "triton"))
    if scenario == "inductor-only":
        env["DDPM_COMPILE_CACHE"] = "off"
    return env


def run_command(args: list[str], env: dict, cwd: Path) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], capture_output=True, text=True,
                       env={**env, "BENCH_STARTUP_DIR": str(Path(__file__).resolve().parent)}, cwd=cwd)
    wall = time.perf_counter() - t
    lines = p.stdout.strip().splitlines()
    found = [json.loads(x[len("PHASES "):]) for x in lines if x.startswith("PHASES ")]
    if p.returncode != 0 or not found:
        sys.exit(f"ddpm {shlex.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    summary = [x for x in lines if not x.startswith("PHASES ")]
    # compile_ahead's messages (its switch, micro-batches, a failed helper), wherever the CLI printed them
    ahead = [x.strip() for x in (p.stdout + p.stderr).splitlines()
             if "compile_ahead" in x and not x.startswith("PHASES ")][:8]
    return {"wall_s": round(wall, 2), **found[0], "summary": summary[-2 if args[0] == "train" else -1:],
            **({"ahead_said": ahead} if ahead else {})}


def brief(command: str, scenario: str, res: dict, note: str) -> str:
    """A run in one line, for a reader of a device call's last lines (the BENCH line holds everything)."""
    phases = res.get("phases") or {}
    parts = ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if v is not None)
    first = res.get("to_first_step_s") or res.get("to_first_batch_s")
    step = f"; compiled step {res['compiled_step_ms']:.2f} ms" if res.get("compiled_step_ms") else ""
    return (f"ROW {command} {scenario}: first at {first if first is not None else '?'} s ({parts}); wall "
            f"{res.get('wall_s')} s{step}{f'; {note}' if note else ''}")


def scenarios(tag: str, args: list[str], which: list[str], work: Path, note: str = "") -> None:
    """Run `args` under each scenario in turn, each a fresh process with this job's own cache folders (they start
    empty: the first scenario is the cold one); print a BENCH line per run, then its ROW line (`brief`, ending with
    `note`)."""
    ddpm_dir, inductor_dir = work / f"{tag}-ddpm-cache", work / f"{tag}-inductor"
    if "cold" in which:  # a --work folder kept from an earlier call holds them
        for d in (ddpm_dir, inductor_dir, work / f"{tag}-inductor-portable", work / f"{tag}-data-cache",
                  work / f"{tag}-data-cache-portable"):
            shutil.rmtree(d, ignore_errors=True)
    for scenario in which:
        inductor = work / f"{tag}-inductor-portable" if scenario == "portable" else inductor_dir
        data = work / (f"{tag}-data-cache-portable" if scenario == "portable" else f"{tag}-data-cache")
        env = {**scenario_env(scenario, ddpm_dir, inductor), "DDPM_DATA_CACHE_DIR": str(data)}
        res = run_command(args, env, work)
        print("BENCH " + json.dumps({"kind": "startup", "command": args[0], "scenario": scenario, "args": args,
                                     **res}), flush=True)
        print(brief(args[0], scenario, res, note), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "cifar10-fast.yaml"))
    p.add_argument("--set", action="append", default=[], help="more config overrides for the training runs")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--sample", action="append", default=None, help="`ddpm sample` options of one sampling job "
                   "(repeatable; default: '-n 64 --grid g.png' and '-n 10000', the issue's two)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, in order: {SCENARIOS}")
    p.add_argument("--commands", default="train,sample")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="train.compile and --compile")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile-ahead", action="store_true", help="train.compile_ahead on: the training runs' first "
                   "steps are eager while a helper compiles; give --train-steps and --set train.max_time=S so that a "
                   "run goes on past its switch (its step and time are in the BENCH line's compile_ahead)")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, 3 steps, 4 images (smoke run)")
    p.add_argument("--work", type=Path, default=None, help="keep the caches, runs and outputs in this folder "
                   "(default: a temporary one), so a later invocation can run the warm scenarios of the same jobs")
    a = p.parse_args()
    which = [s for s in a.scenarios.split(",") if s]
    if bad := [s for s in which if s not in SCENARIOS]:
        sys.exit(f"unknown scenario(s) {bad}; choose from {SCENARIOS}")
    if "cold" in which and which[0] != "cold":
        sys.exit("cold must come first: the other scenarios reuse what it leaves")
    if "cold" not in which and a.work is None:
        sys.exit("without cold, give --work: the folder of the invocation that ran it")
    steps = 3 if a.tiny else a.train_steps
    device = "cpu" if a.tiny and a.device == "auto" else a.device
    sample_jobs = a.sample or (["-n 4 --steps 2 --batch-size 2"] if a.tiny else ["-n 64 --grid g.png", "-n 10000"])
    commands = a.commands.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = a.work.resolve() if a.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        sets = [*(TINY if a.tiny else []), "data.dataset=shapes", f"train.steps={steps}", "train.max_time=null",
                f"train.guide_step={max(1, steps // 2)}", f"train.device={device}", f"train.compile={a.compile}",
                f"logging.run_dir={work / 'runs'}", "logging.sample_count=4", "logging.sample_steps=2",
                f"logging.log_every={steps}", *(["train.compile_ahead=true"] if a.compile_ahead else []), *a.set]
        train_args = ["train", "--config", str(Path(a.config).resolve()), *[x for s in sets for x in ("--set", s)]]
        if "train" in commands:
            scenarios("train", train_args, which, work, " ".join(f"--set {x}" for x in a.set))
        elif first_checkpoint(work) is None:  # a checkpoint to sample from, not timed
            subprocess.run([sys.executable, "-m", "ddpm_cli", *train_args, "--set", "train.compile=off"], check=True,
                           capture_output=True, env=child_env(DDPM_DATA_CACHE_DIR=str(work / "data-cache")), cwd=work)
        ckpt = first_checkpoint(work)
        if "sample" in commands:
            for j, job in enumerate(sample_jobs):  # cwd is the temporary folder: outputs land there
                args = ["sample", str(ckpt), *shlex.split(job), "--device", device, "--compile", a.compile,
                        "--overwrite"]
                scenarios(f"sample{j}", args, which, work, job)


if __name__ == "__main__":
    main()
