"""Shared fixtures: tiny configs and a session-wide trained checkpoint, all on the CPU."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Two busy cores: torch's default of one thread per core spins and slows tiny convolutions many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")
# Compiled code the tests make goes to a folder of this session, not the user's ~/.cache/ddpm/compile (the tests'
# subprocesses inherit it, so within a session they still share it).
if "DDPM_COMPILE_CACHE_DIR" not in os.environ:
    os.environ["DDPM_COMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPM_COMPILE_CACHE_DIR"], True)
os.environ.setdefault("WANDB_MODE", "offline")
# Decoded training images are cached per user (engine/data_cache.py): off in the tests, which decode their own small
# folders anew (tests/test_data_cache.py turns it on in a folder of its own); never the user's ~/.cache/ddpm/data.
if "DDPM_DATA_CACHE_DIR" not in os.environ:
    os.environ["DDPM_DATA_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-data-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPM_DATA_CACHE_DIR"], True)
os.environ.setdefault("DDPM_DATA_CACHE", "off")
# eval's reference statistics likewise (`ddpm cache clear` in a test empties it): never the user's
# ~/.cache/ddpm/fid-stats.
if "DDPM_CACHE_DIR" not in os.environ:
    os.environ["DDPM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-fid-stats-")
    atexit.register(shutil.rmtree, os.environ["DDPM_CACHE_DIR"], True)


def tiny_overrides(run_dir: Path, **extra) -> dict:
    """A config dict for a very small model on 16x16 shapes: a few steps take a fraction of a second."""
    cfg = {
        "model": {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [8], "norm_groups": 4, "dropout": 0.0, "time_emb_dim": 32},
        "diffusion": {"schedule": "linear", "num_timesteps": 100},
        "data": {"dataset": "shapes", "shapes_count": 256},
        # compile_ahead off: a GPU test's few compiled steps are the compiled path's (`auto`, the default, would
        # train them eagerly beside a helper on a cold cache); tests of compile_ahead turn it on
        "train": {"steps": 20, "batch_size": 16, "lr": 1e-3, "warmup_steps": 5, "ema_decay": 0.9,
                  "device": "cpu", "compile_ahead": False},
        "logging": {"run_dir": str(run_dir), "run_name": "tiny", "log_every": 5, "checkpoint_every": 10,
                    "sample_every": 10, "sample_count": 8, "sample_steps": 5},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__", 1)
        if "__" in key:
            key, sub = key.split("__", 1)
            cfg[section].setdefault(key, {})[sub] = value
        else:
            cfg[section][key] = value
    return cfg


def perturbed_unet(seed: int = 0):
    """A tiny UNet (8x8, two levels, attention at 4x4) with every weight perturbed: its zero-initialised output
    layers would otherwise hide any difference between two ways of running it."""
    import torch

    from ddpm_cli.nn.unet import UNet

    torch.manual_seed(seed)
    model = UNet(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 norm_groups=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def with_failing_backward(x, fail):
    """`x`, through an identity whose backward calls `fail(grad)` first (which raises: out of memory, say). Saved
    tensors of the ops before it in the forward are then still held by the graph when the backward stops."""
    import torch

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            fail(g)
            return g

    return FailingBackward.apply(x)


def tiny_config(run_dir: Path, **extra):
    from ddpm_cli.config import validate_config

    return validate_config(tiny_overrides(run_dir, **extra))


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """An unconditional tiny run (20 steps); returns the run directory."""
    from ddpm_cli.engine.train import train

    base = tmp_path_factory.mktemp("runs")
    return train(tiny_config(base)).run_dir


@pytest.fixture(scope="session")
def trained_conditional_run(tmp_path_factory) -> Path:
    """A class-conditional tiny run with label dropout (for guidance)."""
    from ddpm_cli.engine.train import train

    base = tmp_path_factory.mktemp("runs_cond")
    cfg = tiny_config(base, model__conditional=True, train__label_dropout=0.2)
    return train(cfg).run_dir


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m ddpm_cli ARGS` in a subprocess (for signals and import checks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddpm_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_main_probing_teardown(*args: str, timeout: float = 300):
    """Run the `ddpm` entry point (cli.app.main) in a subprocess whose exit handler prints TEARDOWN: it does when
    Python tears the process down, and not when a command ended it right away (ui.exit_quickly_when_done)."""
    probe = ("import atexit, sys; atexit.register(lambda: print('TEARDOWN', flush=True)); "
             "from ddpm_cli.cli.app import main; sys.argv = ['ddpm', *sys.argv[1:]]; main()")
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=timeout)


def cli(*args):
    """Invoke the `ddpm` app in-process (CliRunner), stringifying the arguments."""
    from typer.testing import CliRunner

    from ddpm_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


def one_line_error(r, code=(1, 2)) -> str:
    """The command failed with one clear line on stderr, an exit code of 1 or 2, and no traceback."""
    assert r.exit_code in code, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception  # not an uncaught exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


def pytest_collection_modifyitems(items):
    """The GPU suite's slow tests start first, one per pytest-xdist worker (benchmarks/gpu_suite.sh): xdist hands
    each worker two consecutive tests to begin with, so each slow test is followed by a short one."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    slow = [item for item in gpu if item.get_closest_marker("slow")]
    short = [item for item in gpu if not item.get_closest_marker("slow")]
    paired = [x for pair in zip(slow, short) for x in pair] + slow[len(short):] + short[len(slow):]
    items[:] = paired + [item for item in items if not item.get_closest_marker("gpu")]
