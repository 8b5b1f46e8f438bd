"""`ddpm export CKPT`: a slim inference checkpoint (safetensors, fp32/fp16/bf16), an ONNX denoiser, a
torch.export program or a diffusers DDPMPipeline folder, each checked right after it is written."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.outputs import PATH_METAVAR, output_path, refuse_replacing, run_of
from ddpm_cli.cli.ui import console, friendly


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    onnx = "onnx"
    pt2 = "pt2"
    diffusers = "diffusers"


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _format_of(fmt: ExportFormat | None, out: str | None) -> ExportFormat:
    """--format, or the one --out's suffix names (.safetensors, .onnx, .pt2); a --format that the suffix contradicts
    is refused (m.onnx holding safetensors bytes fails in onnxruntime, far from its cause)."""
    from ddpm_cli.errors import UsageError

    suffix = Path(out).suffix.lower() if out else ""
    named = next((f for f in ExportFormat if f != ExportFormat.diffusers and suffix == f".{f.value}"), None)
    if fmt is not None and named is not None and fmt != named:
        raise UsageError(f"--out {out} is named as a {named.value} file, and --format {fmt.value} writes "
                         f"{'a folder' if fmt == ExportFormat.diffusers else f'a .{fmt.value} file'}; drop --format "
                         f"to write {named.value}, or name the output for {fmt.value}")
    return fmt or named or ExportFormat.safetensors


@friendly
def export_command(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT",
                                      help="A .safetensors checkpoint, or a run directory (its latest).",
                                      show_default=False),
    fmt: Optional[ExportFormat] = typer.Option(None, "--format", "-f", show_default=False,
                                               help="safetensors: inference-only weights, loadable by `ddpm "
                                                    "sample`; onnx: the denoiser (x_t, t[, y]) -> eps or v, as the "
                                                    "checkpoint predicts, any batch; "
                                                    "pt2: a torch.export program; diffusers: a DDPMPipeline folder "
                                                    "(unet/, scheduler/) for diffusers' from_pretrained. Default: "
                                                    "--out's suffix (.onnx, .pt2), else safetensors."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar=PATH_METAVAR, show_default=False,
                                      help="Output file, or folder for diffusers (default: beside the checkpoint)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Export the EMA weights (default: when "
                                                                     "present) or the raw ones.",
                                       show_default=False),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="Export the EMA weights of this decay "
                                              "(train.ema_decay or one of train.ema_extra).", show_default=False),
    dtype: Dtype = typer.Option(Dtype.fp32, "--dtype", help="Weight precision of a safetensors or diffusers export."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export a checkpoint for inference: slim safetensors, ONNX, torch.export or a diffusers pipeline."""
    from ddpm_cli.cli.inspect_cmd import human_size
    from ddpm_cli.engine.checkpoint import read_header
    from ddpm_cli.engine.runs import resolve_checkpoint

    fmt = _format_of(fmt, out)
    out = output_path("--out", out, None if fmt == ExportFormat.diffusers else f"model.{fmt.value}")
    src = resolve_checkpoint(checkpoint)
    read_header(src)  # a bad file fails here, before torch is imported (engine.export imports it)
    refuse_replacing({"--out": out}, [src], run_of(src), files=fmt != ExportFormat.diffusers)
    from ddpm_cli.engine.export import export_checkpoint

    r = export_checkpoint(checkpoint, out, fmt.value, ema=ema, ema_decay=ema_decay, dtype=dtype.value,
                          overwrite=overwrite)
    console.print(f"wrote {r.path} ({human_size(r.file_size)}; {r.weights} weights, {r.dtype})", markup=False,
                  soft_wrap=True)
    console.print(f"check: relative error {r.rel_error:.2e} against PyTorch (limit {r.tolerance:g}), "
                  f"{r.checked_with}", markup=False, soft_wrap=True)
