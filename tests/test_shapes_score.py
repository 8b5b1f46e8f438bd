"""The recognisability score of benchmarks/shapes_score.py tells shapes from noise, and a briefly trained
conditional model (the quickstart's recipe, smaller) from an untrained one; the grid guidance it relies on is
validated."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, tiny_config

sys.path.insert(0, str(ROOT / "benchmarks"))

from shapes_score import ShapesScorer, negatives, score_grid  # noqa: E402

from ddpm_cli.engine.data import make_shapes  # noqa: E402


@pytest.fixture(scope="module")
def scorer() -> ShapesScorer:
    return ShapesScorer(16, count=2000, epochs=4, threshold=0.5)  # smaller and less sure than the benchmark's


def test_real_shapes_score_high_and_noise_low(scorer):
    real = make_shapes(300, 16, 3, seed=0)  # the quickstart's own images; the scorer trained on another seed
    s = scorer.score(real.images, real.labels)
    assert s.recognisable > 0.6 and s.accuracy > 0.6 and s.p_label > 0.6, s.summary()
    assert scorer.score(real.images, (real.labels + 1) % 10).accuracy < 0.1  # the class must be the asked one
    noise = scorer.score(negatives(300, 16, 3, seed=1))
    assert noise.recognisable < 0.2 and noise.p_shape < 0.35, noise.summary()
    flat = scorer.score(torch.full((20, 3, 16, 16), 128, dtype=torch.uint8))
    assert flat.recognisable < 0.2


def test_a_trained_conditional_run_beats_an_untrained_model(tmp_path, scorer):
    from ddpm_cli.api import Diffusion
    from ddpm_cli.engine.train import train

    cfg = tiny_config(tmp_path, model__conditional=True, model__attention_resolutions=[],
                      diffusion__schedule="cosine", diffusion__num_timesteps=50, diffusion__loss_weight="min-snr",
                      data__shapes_count=1000, train__steps=100, train__batch_size=32, train__lr=3e-3,
                      train__warmup_steps=10, train__label_dropout=0.1, train__ema_decay=0.98,
                      logging__log_every=50, logging__checkpoint_every=1000, logging__sample_every=1000,
                      logging__sample_count=20, logging__sample_steps=50, logging__sample_guidance=2.0)
    res = train(cfg)
    grid = max((res.run_dir / "samples").glob("step_*.png"))
    trained = score_grid(scorer, grid, conditional=True)  # the grid as `ddpm train` drew it: 2 per class
    y = torch.arange(10).repeat_interleave(2)
    x = Diffusion.from_config(cfg, device="cpu").sample(20, y=y, sampler="ddpm", guidance=2.0)
    untrained = scorer.score(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), y)
    # 100 steps draw blobs in the right colours more than shapes, but already far from the untrained noise
    assert trained.p_shape > untrained.p_shape + 0.08, (trained.summary(), untrained.summary())
    assert trained.p_label > untrained.p_label and trained.accuracy >= untrained.accuracy


def test_grid_guidance_needs_a_conditional_model_with_label_dropout(tmp_path):
    from ddpm_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, model__conditional=True, logging__sample_guidance=2.0)
    assert "sample_guidance" in " ".join(e.value.problems) and "label_dropout" in " ".join(e.value.problems)
    tiny_config(tmp_path, model__conditional=True, train__label_dropout=0.1, logging__sample_guidance=2.0)
