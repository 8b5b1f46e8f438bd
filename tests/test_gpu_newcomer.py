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


def test_the_python_api_trains_samples_and_saves_on_cuda(tmp_path):
    """README's custom loop on the device its users have: the API (its loss, EMA, sampler and save) ran on the CPU
    alone in the tests."""
    import math

    from ddpm_cli.api import Diffusion, load_config, load_data

    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    diffusion = Diffusion.from_config(cfg, device="cuda")
    assert all(p.is_cuda for p in diffusion.parameters())
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-3)
    data = load_data(cfg)
    diffusion.classes = data.classes
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    losses = []
    for _, (x, y) in zip(range(40), loader):
        loss = diffusion.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        diffusion.update_ema()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and sum(losses[-10:]) < sum(losses[:10]), losses
    images = diffusion.sample(10, steps=10, seed=1)
    assert images.shape == (10, *cfg.model.image_shape()) and images.std() > 0.05  # images, not one flat colour
    one_level = 2 / 255 + 1e-6  # the images are 8-bit: a kernel's last bit may move a pixel by one level
    assert (diffusion.sample(10, steps=10, seed=1) - images).abs().max() <= one_level  # seeded
    diffusion.save(tmp_path / "m.safetensors")
    back = Diffusion.from_checkpoint(tmp_path / "m.safetensors", device="cuda")
    assert back.classes == data.classes and back.images_seen == diffusion.images_seen > 0
    assert (back.sample(10, steps=10, seed=1) - images).abs().max() <= one_level
