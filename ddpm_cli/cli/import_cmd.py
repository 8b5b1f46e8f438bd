"""`ddpm import PATH`: a diffusers model folder (the DDPM paper's google/ddpm-* models) as a ddpm checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.outputs import PATH_METAVAR, output_path, refuse_replacing
from ddpm_cli.cli.ui import console, friendly


@friendly
def import_command(
    path: Path = typer.Argument(..., metavar="PATH",
                                help="A diffusers UNet2DModel folder (config.json, diffusion_pytorch_model."
                                     "safetensors, scheduler_config.json) or a DDPMPipeline folder (unet/, "
                                     "scheduler/).", show_default=False),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar=PATH_METAVAR, show_default=False,
                                      help="Checkpoint to write (default: FOLDER.safetensors beside the folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Import a diffusers DDPM model (e.g. google/ddpm-cifar10-32) as a ddpm checkpoint."""
    from ddpm_cli.cli.inspect_cmd import human_size

    out = output_path("--out", out, "model.safetensors")
    # the files the import reads: the folder's own, or a pipeline's unet/ and scheduler/ (no walk of a wrong, big one)
    read = [f for d in (path, path / "unet", path / "scheduler") if d.is_dir() for f in d.iterdir()]
    refuse_replacing({"--out": out}, [path, *read])
    from ddpm_cli.engine.diffusers_io import import_diffusers  # torch: after the refusals of the outputs

    r = import_diffusers(path, out, overwrite)
    m, d = r.config.model, r.config.diffusion
    console.print(f"wrote {r.path} ({human_size(r.file_size)}; {r.num_params:,} parameters)", markup=False,
                  soft_wrap=True)
    attention = list(m.attention_resolutions) or "the middle block only"  # (the middle block always attends)
    console.print(f"model: {m.size_text()}x{m.in_channels}, base {m.base_channels}, mults {list(m.channel_mults)}, "
                  f"attention at {attention}; schedule: {d.schedule}, T = {d.num_timesteps}, variance {d.variance}",
                  markup=False, soft_wrap=True)
    if not r.scheduler_found:
        console.print("note: the folder has no scheduler_config.json; DDPMScheduler's defaults were assumed (linear "
                      "betas 1e-4 to 0.02, T = 1000, fixed_small variance)", markup=False, soft_wrap=True)
