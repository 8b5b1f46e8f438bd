"""The one draw path on CUDA: what `ddpm sample` gathers is what `ddpm eval` streams into Inception, and eval's
sampling options (shared with sample) and --ref-limit run there. Skipped without a GPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_draw_and_the_eval_stream_give_the_same_images_on_cuda(trained_run):
    from ddpm_cli.diffusion.sampler_spec import SamplerSpec
    from ddpm_cli.engine.draw import DrawOptions, draw, load_drawer, plan_draw
    from ddpm_cli.engine.evaluation.sources import samples_source

    plan = plan_draw(trained_run, DrawOptions(SamplerSpec("ddim", 3, eta=1.0), seed=5))
    drawer, _ = load_drawer(plan, torch.device("cuda"), 7)
    assert drawer.bf16 and not drawer.compiled  # a small job: eager, bf16 on CUDA
    a = draw(drawer, 7, batch_size=3, seed=5)
    b = draw(drawer, 7, batch_size=3, seed=5)
    streamed = torch.cat(list(samples_source(drawer, 7, seed=5, sample_batch=3).batches(2)))
    assert a.shape == (7, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and torch.equal(a, streamed)


def test_eval_with_sample_s_options_and_a_reference_limit_on_cuda(trained_run, tmp_path):
    pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from conftest import run_cli
    from test_eval import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth")
    ref = tmp_path / "ref.npz"
    r = run_cli("sample", trained_run, "-n", "30", "--steps", "3", "--format", "npz", "--out", ref)
    assert r.returncode == 0, r.stderr[-2000:]
    common = ["--ref", str(ref), "--inception-weights", str(weights), "--cache-dir", str(tmp_path / "cache"),
              "-n", "8", "--steps", "3", "--sampler", "ddim", "--kid-subset-size", "4"]
    r = run_cli("eval", trained_run, *common, "--eta", "1", "--spacing", "quadratic", "--no-ema",
                "--ref-limit", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["precision"] == "bf16" and out["ref_n"] == 20 and out["eta"] == 1.0 and out["ema_decay"] is None
    assert math.isfinite(out["fid"])
