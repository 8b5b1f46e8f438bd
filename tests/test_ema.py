"""The weight averages (engine/ema.py, engine/posthoc_ema.py) follow the training model's parameters after the
model re-lays out or reloads their data, since they list the parameters once and keep them."""
from __future__ import annotations

import torch

from ddpm_cli.engine.ema import EMA
from ddpm_cli.engine.posthoc_ema import PosthocEMA


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))


def _changes(model: torch.nn.Module, step: int) -> None:
    """What training does between updates: new weights, written in place."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * (step + i))


def test_the_averages_follow_parameters_re_laid_out_and_reloaded_after_their_first_update():
    model, fresh = _net(), _net()
    ema, posthoc = EMA(model, 0.5), PosthocEMA(model, (0.1,))
    for step in range(1, 4):
        _changes(model, step)
        if step == 2:  # .to() swaps each parameter's data (new storage), load_state_dict copies into it
            model.to(memory_format=torch.channels_last)
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
        posthoc.update(model, step)
    # the same averages from scratch, each update listing the parameters anew
    want_ema = [p.detach().clone() for p in fresh.parameters()]
    want_post = [p.detach().clone() for p in fresh.parameters()]
    gamma = posthoc.exponents[0]
    for step in range(1, 4):
        _changes(fresh, step)
        for w, p in zip(want_ema, fresh.parameters()):
            w.lerp_(p.detach(), 0.5)
        beta = (1.0 - 1.0 / step) ** (gamma + 1.0)
        for w, p in zip(want_post, fresh.parameters()):
            w.lerp_(p.detach(), 1.0 - beta)
    for got, want in zip(ema.model.parameters(), want_ema):
        torch.testing.assert_close(got, want)
    for got, want in zip(posthoc.averages[0], want_post):
        torch.testing.assert_close(got, want)


def test_an_average_lists_the_parameters_of_each_model_it_is_given():
    """A model wrapped after the average was made (torch.compile, DDP) is another object: listed again."""
    model = _net()
    ema = EMA(model, 0.0)  # decay 0: the average becomes the weights it is given
    other = _net()
    _changes(other, 5)
    ema.update(model)
    ema.update(other)
    for got, want in zip(ema.model.parameters(), other.parameters()):
        torch.testing.assert_close(got, want.detach())
