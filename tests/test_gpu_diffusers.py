"""A diffusers-format model imported and sampled on CUDA with the CUDA defaults (bf16, channels-last, folded
upsampling, compile where it applies), through the CLI. Needs no diffusers: the folder is written by ddpm's own
mapping (tests/test_diffusers.py checks that mapping against diffusers on the CPU). Skipped without a GPU;
`DDPM_GPU_SUITE_ON_CPU=1` runs it on the CPU (both samplings then on the CPU), to debug the test itself."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import ok

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available()
                                                  and not os.environ.get("DDPM_GPU_SUITE_ON_CPU"),
                                                  reason="needs a CUDA GPU")]


def _diffusers_folder(tmp_path):
    """A tiny UNet2DModel folder in the google/ddpm-* layout (bottom-right padding, 1e-6 epsilon, [sin, cos]
    embedding), with random (non-zero) output layers."""
    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.build import build_unet
    from ddpm_cli.engine.diffusers_io import write_pipeline

    cfg = validate_config({
        "model": {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
                  "attention_resolutions": [8], "norm_groups": 4, "norm_eps": 1e-6, "dropout": 0.0,
                  "downsample_padding": "bottom-right"},
        "diffusion": {"num_timesteps": 1000, "variance": "posterior"}})
    torch.manual_seed(0)
    model = build_unet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_pipeline(model.state_dict(), cfg, tmp_path / "pipe", torch.float32, overwrite=False)
    return tmp_path / "pipe"


def _sample(ckpt, out, *extra) -> np.ndarray:
    ok("sample", ckpt, "-n", 8, "--batch-size", 4, "--seed", 2, "--sampler", "ddim", "--steps", 10, "--format",
       "npz", "--out", out, *extra)
    with np.load(out) as d:
        return d["arr_0"]


def test_an_imported_diffusers_model_samples_on_cuda_with_the_defaults(tmp_path):
    ok("import", _diffusers_folder(tmp_path), "--out", tmp_path / "m.safetensors")
    gpu = _sample(tmp_path / "m.safetensors", tmp_path / "gpu.npz")  # --device auto: CUDA, its defaults
    again = _sample(tmp_path / "m.safetensors", tmp_path / "again.npz")
    cpu = _sample(tmp_path / "m.safetensors", tmp_path / "cpu.npz", "--device", "cpu")
    assert gpu.dtype == np.uint8 and gpu.shape == cpu.shape and gpu.shape[0] == 8
    assert np.array_equal(gpu, again)  # deterministic by seed
    diff = np.abs(gpu.astype(int) - cpu.astype(int))
    assert diff.mean() < 3 and (diff > 32).mean() < 0.01, (diff.mean(), diff.max())  # bf16 against fp32
    assert np.abs(cpu[:4].astype(int) - cpu[4:].astype(int)).mean() > 10  # the images differ: the check means something
