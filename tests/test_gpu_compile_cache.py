"""The compile cache on CUDA (issue 24): a second `ddpm sample --compile on` process, with an empty inductor cache of
its own, loads what the first compiled from the compile cache and draws the same images. A tiny model; `pytest -m
gpu` runs it (skipped without a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TIMEOUT = 420  # one process: torch's import and a cold compile of the tiny network


def test_a_second_sample_process_loads_the_compiled_network(tmp_path):
    from ddpm_cli.api import Diffusion
    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.compile_cache import list_entries

    ckpt = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    d = Diffusion.from_config(validate_config(tiny_overrides(tmp_path / "runs")), device="cpu")
    with torch.no_grad():  # zero-initialised output layers: perturb them, so the images show the network
        for p in d.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d.ema.copy_from(d.model)
    d.save(ckpt)
    cache = tmp_path / "compile-cache"
    outputs, lines = [], []
    for i in range(2):
        inductor = tmp_path / f"inductor{i}"  # each its own: the second can only get the first's code from ours
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DDPM_COMPILE_CACHE_DIR": str(cache),
               "TORCHINDUCTOR_CACHE_DIR": str(inductor), "TRITON_CACHE_DIR": str(inductor / "triton")}
        env.pop("DDPM_COMPILE_CACHE", None)
        out = tmp_path / f"s{i}.npz"
        r = subprocess.run([sys.executable, "-m", "ddpm_cli", "sample", str(ckpt), "-n", "6", "--steps", "4",
                            "--batch-size", "4", "--compile", "on", "--format", "npz", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-4000:]
        assert "warning:" not in r.stderr, r.stderr
        lines.append(r.stdout.strip().splitlines()[-1])
        outputs.append(np.load(out)["arr_0"])
        entries = list_entries(cache)
        assert [e.name.split("-")[0] for e in entries] == ["sample"], entries
        assert entries[0].meta["hits"] == i and entries[0].meta["key"]["env"]["device"] == "cuda"
    print(lines)  # the first batch's time, cold and then from the cache, for the record (-s)
    assert "compiled: the first batch took" in lines[0] and "compile cache" not in lines[0]
    assert "(loaded from the compile cache)" in lines[1]
    assert outputs[0].shape == outputs[1].shape == (6, 16, 16, 3)
    # the same images: cuDNN's autotuner may pick other kernels in each process, so bf16 pixels can differ by a
    # level or so (as tests/test_gpu_acceptance.py allows)
    assert np.abs(outputs[0].astype(np.int16) - outputs[1].astype(np.int16)).mean() <= 1.0
    info = json.loads(subprocess.run([sys.executable, "-m", "ddpm_cli", "cache", "info", "--json"], cwd=ROOT,
                                     capture_output=True, text=True, check=True, timeout=60,
                                     env={**os.environ, "DDPM_COMPILE_CACHE_DIR": str(cache)}).stdout)
    assert [e["hits"] for e in info["entries"]] == [1]
