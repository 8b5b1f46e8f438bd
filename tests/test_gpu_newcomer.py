"""The quickstart's grid on CUDA: the training grid drawn with the full ancestral sampler and classifier-free
guidance (logging.sample_guidance) under the CUDA defaults (bf16, compile), as on the CPU."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_guided_ancestral_grid_on_cuda(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shapes_score import read_grid

    from ddpm_cli.engine.train import train

    cfg = tiny_config(tmp_path, train__device="cuda", model__conditional=True, train__label_dropout=0.1,
                      diffusion__schedule="cosine", diffusion__num_timesteps=50, train__steps=20,
                      logging__sample_every=10**6, logging__sample_count=20, logging__sample_steps=50,
                      logging__sample_guidance=2.0)
    res = train(cfg)
    tiles, rows, cols = read_grid(res.run_dir / "samples" / "step_00000020.png", 16)
    assert (rows, cols) == (10, 2) and tiles.float().std() > 0  # a row per class, images not blank
