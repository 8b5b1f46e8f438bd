"""The learning rate of each step: a linear warm-up to the peak, then the peak, and with `train.lr_cooldown` a
linear decay to zero over the last part of the run.

A run's last step is known in advance when `train.steps` ends it. When `train.max_time` does, it is not: the
cool-down then starts once that share of the time has passed, and its end is projected from the measured step time
and fixed there (the same step on every rank), so the steps after are as deterministic as those before. A
resume inside the window continues it (the checkpoint's training state holds it); a run resumed at or past its
end, to train longer, goes back to the peak and cools down again at the end of its new budget."""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, peak: float, warmup_steps: int, cooldown: float, steps: int, max_time: float | None):
        self.peak, self.warmup, self.cooldown = peak, warmup_steps, cooldown
        self.steps, self.max_time = steps, max_time
        self.window: tuple[int, int] | None = None  # the cool-down's first step, and the step it reaches zero
        self.by_steps = (steps - round(cooldown * steps), steps) if cooldown else None

    def at(self, step: int) -> float:
        """The learning rate of step `step` (0-based)."""
        lr = self.peak * (min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0)
        window = self.window or self.by_steps
        if window is not None and step >= window[0]:
            start, end = window
            lr *= max(0.0, (end - step) / max(end - start, 1))
        return lr

    def proposal(self, step: int, elapsed_s: float, steps_left: float) -> int:
        """Whether the cool-down should start at `step` on the clock (0: not yet, or it is settled), else the step
        where it would end: `steps_left` more steps fit the time left. Ranks take the largest (dist.agree)."""
        if self.window is not None or not self.cooldown or self.max_time is None:
            return 0
        if elapsed_s < (1.0 - self.cooldown) * self.max_time or not math.isfinite(steps_left) or steps_left <= 0:
            return 0
        return min(self.steps, step + max(1, round(steps_left)))

    def settle(self, step: int, end: int) -> None:
        """Fix the cool-down to run from `step` to `end` (the agreed proposal); steps ending the run first keep
        their own window when it starts earlier."""
        if self.window is None and end > 0 and (self.by_steps is None or step < self.by_steps[0]):
            self.window = (step, end)

    def ended(self, step: int) -> bool:
        """Whether a cool-down on the clock has reached zero at `step`: the run ends there (its projection of the
        steps left came out short), since a step at a rate of zero would change nothing."""
        return self.window is not None and step >= self.window[1]

    def state_dict(self) -> dict:
        return {"window": list(self.window)} if self.window is not None else {}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Resume at `step`: inside a stored window, that window; at or past its end, none (a new one comes);
        none either when this run has no cool-down on the clock (lr_cooldown 0, or no max_time)."""
        window = state.get("window")
        on_clock = bool(self.cooldown) and self.max_time is not None
        self.window = (int(window[0]), int(window[1])) if window and on_clock and step < int(window[1]) else None
