"""ddpm: train, sample and evaluate denoising diffusion models from the command line.

Importing this package is cheap (no torch); the Python API lives in `ddpm_cli.api`."""
__version__ = "0.1.0"
