"""train.grad_accum: a step's batch in micro-batches gives the update of the whole batch, and bad values are one
clear error. (Its exact resume is a variant of tests/test_reliability.py's exact-resume test.)"""
from __future__ import annotations

import pytest
import torch

from conftest import cli, tiny_config, tiny_overrides, write_yaml
from ddpm_cli.engine.checkpoint import load_checkpoint
from ddpm_cli.engine.grad_accum import GradAccumulator
from ddpm_cli.engine.train import Trainer, train
from ddpm_cli.errors import ConfigError


def _step_losses(res) -> list[float]:
    return [r["loss"] for r in res.metrics if "loss" in r]


@pytest.mark.parametrize("k,sampling", [(2, "uniform"), (4, "uniform"), (2, "lognormal")])
def test_micro_batches_give_the_update_of_one_batch(tmp_path, k, sampling):
    """fp32 on the CPU: the same data, flips, timesteps and noise reach the network either way (the timesteps by
    the diffusion's own draw, diffusion.timestep_sampling's), so only the order of the float sums differs.
    Tolerance: 1e-6 relative on the losses, 1e-5 on the weights (lr 1e-3; Adam's first steps move each weight by
    about lr, so a rounding-level gradient difference stays far below it)."""
    common = dict(train__steps=6, logging__log_every=1, diffusion__timestep_sampling=sampling)
    one = train(tiny_config(tmp_path / "one", **common))
    acc = train(tiny_config(tmp_path / "acc", train__grad_accum=k, **common))
    assert acc.images_seen == one.images_seen == 6 * 16  # batch_size stays the step's batch
    assert _step_losses(acc) == pytest.approx(_step_losses(one), rel=1e-6)
    a = load_checkpoint(one.run_dir / "checkpoints" / "ckpt-00000006.safetensors")
    b = load_checkpoint(acc.run_dir / "checkpoints" / "ckpt-00000006.safetensors")
    for name in a.model_state:
        torch.testing.assert_close(b.model_state[name], a.model_state[name], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(b.ema_state[name], a.ema_state[name], rtol=0, atol=1e-5, msg=name)


def test_accumulated_gradients_are_the_whole_batch_s(tmp_path):
    """The gradients themselves, before clipping and the optimizer: the sum of the micro-batches' scaled ones
    equals one backward of the whole batch (fp32; 1e-5 relative, 1e-7 absolute for the near-zero ones)."""
    trainer = Trainer(tiny_config(tmp_path, train__grad_accum=4))
    x, y = trainer.batcher.next()
    params = list(trainer.model.parameters())
    torch.manual_seed(7)
    trainer._loss(x, None).backward()
    whole = [p.grad.clone() for p in params]
    trainer.opt.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = trainer.accumulate(trainer._loss, x, None)
    assert loss.requires_grad is False and loss.ndim == 0
    for p, g in zip(params, whole):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_accumulator_sums_into_its_own_buffers_not_autograd_s():
    """Each micro-batch's .grad is taken and cleared (a CUDA-graphed backward reuses that memory), and the
    sums end up in .grad in the parameters' layout."""
    w = torch.nn.Parameter(torch.ones(2, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    seen = []

    def loss_fn(x, y, t, noise):
        assert w.grad is None  # cleared after the micro-batch before
        seen.append((x.shape[0], t.shape[0], noise.shape))
        return (w * x.mean()).sum()

    acc = GradAccumulator([w], 2, lambda n, device: torch.randint(0, 10, (n,), device=device))
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    acc(loss_fn, x, None)
    assert seen == [(2, 2, (2, 3, 2, 2))] * 2
    torch.testing.assert_close(w.grad, torch.full_like(w, x.mean().item()))  # (mean(0,1) + mean(2,3)) / 2
    assert w.grad.is_contiguous(memory_format=torch.channels_last)


def test_a_batch_not_divisible_by_grad_accum_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, train__grad_accum=3)
    assert e.value.problems == ["train.grad_accum: batch_size 16 is not divisible by grad_accum 3 (each micro-batch is "
                                "batch_size / grad_accum images); pick a grad_accum that divides it"]
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs"))
    r = cli("train", "--config", cfg, "--set", "train.grad_accum=3")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "error: --set: 1 problem(s)" and len(lines) == 2
    assert "train.grad_accum: batch_size 16 is not divisible by grad_accum 3" in lines[1]
    assert lines[1].endswith("(from --set train.grad_accum=3)")
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    r = cli("train", "--config", cfg, "--set", "train.grad_accum=0")
    assert r.exit_code == 1 and "train.grad_accum" in r.stderr and "greater than or equal to 1" in r.stderr


def test_grad_accum_refuses_ddp_sync_and_makes_auto_flat(tmp_path):
    from ddpm_cli.engine.build import grad_sync

    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, train__grad_accum=2, train__grad_sync="ddp")
    assert "use grad_sync auto or flat" in e.value.problems[0]
    assert grad_sync(tiny_config(tmp_path, train__grad_accum=2), None) == "flat"
    assert grad_sync(tiny_config(tmp_path), None) == "ddp"


def test_the_start_line_names_the_micro_batches(tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_overrides(tmp_path / "runs", train__steps=2))
    r = cli("train", "--config", cfg, "--set", "train.grad_accum=4")
    assert r.exit_code == 0, r.stderr
    assert "global batch 16 (4 micro-batches of 4 per device)" in r.stdout
