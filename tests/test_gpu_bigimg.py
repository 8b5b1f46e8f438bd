"""Issue 21 on CUDA with the shipped defaults (bf16, channels-last, torch.compile with CUDA graphs, fused Adam):
a non-square model trained in micro-batches with activation checkpointing, resumed, and sampled through the CLI.
`pytest -m gpu` runs it (skipped without a GPU)."""
from __future__ import annotations

import json

import pytest
import torch

from test_gpu_acceptance import checkpoints, ddpm, gpu_config, losses, pngs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_non_square_micro_batches_and_checkpointing_train_resume_and_sample(tmp_path):
    """16x24 images, 2 micro-batches of 8 a step, checkpointed blocks: the CUDA-graphed step accumulates into
    its own buffers (a replay overwrites the graph's gradient memory), and all of it resumes and samples."""
    cfg = gpu_config(tmp_path, "wide", model__image_size=[16, 24], model__checkpointing=True, train__grad_accum=2,
                     train__steps=4, logging__log_every=2, logging__checkpoint_every=2, train__guide_step=None,
                     train__ema_extra=[])
    run = tmp_path / "wide"
    r = ddpm("train", "--config", cfg)
    assert "global batch 16 (2 micro-batches of 8 per device)" in r.stdout and "checkpointing" in r.stdout
    ddpm("train", "--resume", run, "--set", "train.steps=6")
    assert checkpoints(run)[-1] == 6
    got = losses(run)
    assert sorted(got) == [2, 4, 6] and all(0 < v < 10 for v in got.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("nonfinite", 0) == 0 for r in records)  # no step skipped for a non-finite gradient
    out = tmp_path / "s"
    ddpm("sample", run, "-n", "4", "--steps", "5", "--out", out)
    from PIL import Image

    images = pngs(out)
    assert len(images) == 4 and {Image.open(p).size for p in images} == {(24, 16)}  # (width, height)


def steady_peak_gib(tmp_path, checkpointing: bool, **overrides) -> float:
    """The peak memory of compiled steps 3 to 5 (after compiling and cuDNN's search) at 64 px and batch 32.
    Compiled without CUDA graphs (train.compile: on): a replayed graph allocates nothing, its pool being taken when
    it is recorded, so under CUDA graphs the steps after the recording show the same small peak with checkpointing
    or without (seen on an H100, 2026-12-07); the compiled graph, what checkpointing changes, is the same."""
    from conftest import tiny_config
    from ddpm_cli.engine.train import TrainCallbacks, Trainer

    class Peak(TrainCallbacks):
        gib = 0.0

        def on_step(self, step: int) -> None:
            torch.cuda.synchronize()
            if step == 2:
                torch.cuda.reset_peak_memory_stats()
            elif step == 5:
                self.gib = torch.cuda.max_memory_allocated() / 2**30

    cfg = tiny_config(tmp_path, model__image_size=64, model__base_channels=32, model__channel_mults=[1, 1, 2, 2],
                      model__num_res_blocks=2, model__norm_groups=8, model__attention_resolutions=[16],
                      model__checkpointing=checkpointing, train__device="cuda", train__batch_size=32, train__steps=5,
                      train__compile="on", logging__run_name=f"checkpointing-{checkpointing}", logging__log_every=5,
                      logging__checkpoint_every=10**6, logging__sample_every=10**6, **overrides)
    peak = Peak()
    trainer = Trainer(cfg, callbacks=peak)
    trainer.run()
    assert trainer.compiled and trainer.channels_last
    return peak.gib


@pytest.mark.slow  # two compiled steps of a 64 px network: among the suite's slowest
def test_checkpointing_lowers_the_compiled_steps_peak_memory(tmp_path):
    """model.checkpointing with the CUDA defaults' compiled step (bf16, channels-last, combo kernels as auto sets
    them): a step holds well under what it holds without (BENCHMARKS.md, "Larger images")."""
    without, with_ = steady_peak_gib(tmp_path, False), steady_peak_gib(tmp_path, True)
    assert 0 < with_ < 0.75 * without, (with_, without)
