"""Neural networks: the UNet denoiser and its blocks (torch only)."""
