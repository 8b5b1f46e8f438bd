"""Diffusion math: noise schedules, the training loss and the samplers.

Meets the network only through `model(x_t, t, y) -> epsilon or v` (diffusion.prediction). `schedules` is
numpy-only so the config can check a schedule without importing torch."""
