"""train.lr_cooldown: the learning rate decays linearly to zero over the run's last part, by steps or on the clock,
and a resume continues the same decay."""
from __future__ import annotations

import pytest

from conftest import tiny_config
from ddpm_cli.engine.lr_schedule import LRSchedule


def _lrs(res) -> dict[int, float]:
    """step -> the learning rate of the step that made it (a record names the step count after it)."""
    return {r["step"] - 1: r["lr"] for r in res.metrics if "lr" in r}


def test_by_steps_the_rate_holds_the_peak_then_falls_linearly_to_zero_at_the_last_step(tmp_path):
    from ddpm_cli.engine.train import train

    res = train(tiny_config(tmp_path, train__steps=20, train__warmup_steps=0, train__lr_cooldown=0.5,
                            logging__log_every=1))
    lrs = _lrs(res)
    assert [lrs[i] for i in range(10)] == [pytest.approx(1e-3)] * 10
    assert [lrs[i] for i in range(10, 20)] == pytest.approx([1e-3 * (20 - i) / 10 for i in range(10, 20)])
    plain = train(tiny_config(tmp_path, train__steps=20, train__warmup_steps=0, logging__log_every=1,
                              logging__run_name="plain"))
    assert list(_lrs(plain).values()) == [pytest.approx(1e-3)] * 20  # 0, the default: no decay


def test_on_the_clock_the_decay_starts_when_its_share_of_the_time_is_left_and_ends_where_the_time_does():
    s = LRSchedule(peak=1.0, warmup_steps=0, cooldown=0.4, steps=10**6, max_time=100.0)
    assert s.proposal(step=100, elapsed_s=59.0, steps_left=50.0) == 0  # 60% of the time has not passed yet
    assert s.proposal(step=100, elapsed_s=61.0, steps_left=float("inf")) == 0  # no step time measured yet
    end = s.proposal(step=120, elapsed_s=61.0, steps_left=39.6)
    assert end == 160
    s.settle(120, end)
    assert s.at(119) == 1.0 and s.at(120) == 1.0 and s.at(140) == pytest.approx(0.5) and s.at(160) == 0.0
    assert s.proposal(step=130, elapsed_s=70.0, steps_left=30.0) == 0  # settled once
    inside, past = (LRSchedule(1.0, 0, 0.4, 10**6, 100.0) for _ in range(2))
    inside.load_state_dict(s.state_dict(), step=150)
    past.load_state_dict(s.state_dict(), step=160)
    assert inside.window == (120, 160) and inside.at(150) == pytest.approx(0.25)
    assert past.window is None and past.at(170) == 1.0  # a finished decay: training longer starts from the peak
    by_steps = LRSchedule(1.0, 0, 0.4, 10**6, None)  # resumed without max_time: no window on the clock
    by_steps.load_state_dict(s.state_dict(), step=150)
    assert by_steps.window is None
    short = LRSchedule(1.0, 0, 0.5, steps=200, max_time=100.0)  # the steps end the run first: their window wins
    short.settle(150, 400)
    assert short.window is None and short.at(150) == pytest.approx(0.5)


def test_the_steps_left_come_from_the_wall_time_per_step_pauses_included(monkeypatch):
    """The cool-down's end is projected from the wall time a step has taken since the first (checkpoints and
    grids between them included), the closing work and the steps the stop check keeps in hand left out."""
    import torch

    from ddpm_cli.engine import time_budget

    clock = [0.0]
    monkeypatch.setattr(time_budget.time, "monotonic", lambda: clock[0])
    budget = time_budget.TimeBudget(0.0, 100.0, torch.device("cpu"))
    clock[0] = 10.0
    budget.step_done(first=True)  # the compiling first step
    assert budget.steps_left() == float("inf")
    for _ in range(9):  # ten steps of 0.5 s and a 5 s checkpoint: 1 s a step, wall time
        clock[0] += 0.5
        budget.step_done(first=False)
    clock[0] += 5.0
    budget.pause()
    clock[0] += 0.5
    budget.step_done(first=False)
    budget.checkpoint_s = 4.0
    assert clock[0] == 20.0 and budget.steps_left(lookahead_steps=10) == pytest.approx((100 - 20 - 4) / 1 - 10)


def test_a_timed_run_decays_and_its_resume_continues_the_same_decay(tmp_path):
    from ddpm_cli.engine import checkpoint as ckpt_io
    from ddpm_cli.engine.runs import latest_checkpoint
    from ddpm_cli.engine.train import train

    cfg = dict(train__steps=100_000, train__warmup_steps=0, train__lr_cooldown=0.5, logging__log_every=1,
               logging__sample_every=10**6)
    res = train(tiny_config(tmp_path, train__max_time=6.0, **cfg))
    lrs = [lr for _, lr in sorted(_lrs(res).items())]
    assert res.stop_reason == "time" and lrs[0] == pytest.approx(1e-3)
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.75e-3, lrs  # decaying when the run ended
    ckpt = latest_checkpoint(res.run_dir)
    start, end = ckpt_io.load_state(ckpt)[1]["lr_schedule"]["window"]
    assert 0 < start < res.step <= end  # the run ends at the decay's end at the latest: no step at a rate of 0
    if res.step == end:
        return  # the decay ended first (the projection came out short): nothing left to resume into
    n = min(3, end - res.step)  # the resumed run ends where the decay does, too
    more = train(tiny_config(tmp_path, train__max_time=600.0, **{**cfg, "train__steps": res.step + n}), resume=ckpt)
    resumed = _lrs(more)
    assert resumed == {i: pytest.approx(1e-3 * (end - i) / (end - start)) for i in range(res.step, res.step + n)}
