"""Exporting a checkpoint for inference, each export checked against the PyTorch model right after it is written:

- safetensors: one set of weights (EMA or raw) in fp32, fp16 or bf16, the metadata kept (kind "export"), so
  `ddpm sample` loads it like any checkpoint (with its autoguidance guide, train.guide_step, when it has one);
- onnx: the denoiser (x_t, t, y) -> the network's prediction (no y for an unconditional model) with a dynamic
  batch, run in onnxruntime on random inputs (the main weights only: a stored guide is not part of it). Its
  output is named for what the network predicts (diffusion.prediction): "eps", the noise, or "v";
- pt2: the same denoiser as a torch.export program (torch.export.load(path).module()), with the same metadata
  as ONNX's in its extra file ddpm.json (torch.export.load(path, extra_files={"ddpm.json": ""})).

ONNX and pt2 hold each upsampling folded into one transposed convolution with a stored 4x4 kernel
(nn.unet.fold_nearest2x: the same function, 2.25x fewer multiply-adds there) and are checked against the model
as trained, unfolded.

Each export is checked under a temporary name and only then moved into place, so a check beyond the
tolerance (or any failure) leaves no wrong file behind and replaces no earlier one."""
from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine.checkpoint import load_checkpoint, load_model, require_ema_decay, weights_metadata
from ddpm_cli.engine.files import as_utf8, atomic_write_bytes, fsync_dir, temp_beside
from ddpm_cli.errors import CheckpointError, DdpmError, UsageError
from ddpm_cli.nn.unet import fold_upsampling

FORMATS = ("safetensors", "onnx", "pt2", "diffusers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Largest relative error (max |export - torch| / max |torch|) accepted by the check after an export.
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}
ONNX_OPSET = 18
PT2_METADATA = "ddpm.json"  # the pt2 archive's extra file holding the export's metadata
CHECK_BATCH = 3  # differs from the tracing batch (2), so the check also proves the batch is dynamic


@dataclass
class ExportResult:
    path: Path
    format: str
    weights: str  # "model", "ema", or "ema 0.9999" for one of train.ema_extra
    dtype: str
    file_size: int
    rel_error: float  # of the check against PyTorch (fp32, source weights)
    tolerance: float
    checked_with: str  # what ran the export in the check


def default_output(checkpoint: Path, fmt: str, dtype: str = "fp32", weights: str = "ema") -> Path:
    """Beside the checkpoint: ckpt-00000020-export-fp16.safetensors, ckpt-00000020.onnx, ckpt-00000020.pt2; a
    non-default choice of weights is named: ckpt-00000020-raw.onnx, ckpt-00000020-ema0.9999-export-fp32...."""
    stem = checkpoint.name.removesuffix(".safetensors")
    if weights != "ema":
        stem += "-raw" if weights == "model" else "-" + weights.replace(" ", "")
    if fmt == "safetensors":
        return checkpoint.with_name(f"{stem}-export-{dtype}.safetensors")
    return checkpoint.with_name(f"{stem}.{fmt}")


class Denoiser(torch.nn.Module):
    """The network with the exported signature: forward(x_t, t[, y]) -> its prediction (epsilon or v, as the
    checkpoint's diffusion.prediction says), (B, C, H, W), (B,), (B,)."""

    def __init__(self, model: torch.nn.Module, conditional: bool):
        super().__init__()
        self.model = model
        self.conditional = conditional

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_t, t, y if self.conditional else None)


def random_inputs(cfg, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs like sampling's: x_t ~ N(0, 1), t in [0, T), y in [0, num_classes] (the last is 'no label')."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = torch.randn(batch, *m.image_shape(), generator=g)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (batch,), generator=g)
    if not m.conditional:
        return x, t
    return x, t, torch.randint(0, m.num_classes + 1, (batch,), generator=g)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-12))


def _unfolded_output(net: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The checkpoint's function as trained (nearest upsampling, then the 3x3 convolution): what a folded export
    is checked against."""
    fold_upsampling(net, False)
    with torch.no_grad():
        return net(*inputs)


def check_export(dst: Path, err: float, tol: float, what: str, scale: float | None = None) -> None:
    """Raise if the written-but-not-yet-placed export misses the tolerance (the caller removes its temporary).
    `scale`: in fp16 exports, the source's largest output. A network whose outputs are all near zero is barely
    trained: its zero-initialised layers have hardly moved, and weights that small fall below fp16's range."""
    if not err <= tol and scale is not None and scale < 1e-3:
        raise DdpmError(f"export check failed: the checkpoint is barely trained (its outputs are at most "
                        f"{scale:.1e}: its zero-initialised layers have hardly moved), and its weights are too small "
                        f"for fp16; {dst.name} was not written. Export it as bf16 or fp32, or train longer")
    if not err <= tol:  # also catches NaN
        raise DdpmError(f"export check failed: {what} differs from PyTorch by a relative error of {err:.3g} "
                        f"(limit {tol:g}); {dst.name} was not written. Please report this with the checkpoint's "
                        f"`ddpm inspect --json`")


def _place(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move a checked export into place: only now does it replace an earlier file of that name, and only with
    `overwrite`. Without it a file that appeared under that name since the start (another process) is kept: a hard
    link fails where the name is taken, where a rename would replace it. (The caller removes `tmp`.)"""
    try:
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)
            except FileExistsError:
                raise DdpmError(f"{dst} appeared while exporting; pass --overwrite or another --out") from None
            except OSError as e:  # a filesystem without hard links: check, then rename
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                    raise
                if dst.exists() or dst.is_symlink():
                    raise DdpmError(f"{dst} appeared while exporting; pass --overwrite or another --out") from None
                os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as e:
        raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None


def _prepare(src: str | Path, dst: Path | None, fmt: str, dtype: str, overwrite: bool, ema: bool | None,
             ema_decay: float | None = None):
    if fmt not in FORMATS:
        raise DdpmError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise DdpmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    # options that cannot go together: usage errors (exit 2), found before the checkpoint is read
    if fmt not in ("safetensors", "diffusers") and dtype != "fp32":
        raise UsageError(f"--format {fmt} exports fp32 only; drop --dtype (fp16/bf16 are for safetensors and "
                         f"diffusers)")
    if ema_decay is not None and ema is False:
        raise UsageError("--ema-decay picks EMA weights; drop --no-ema")
    ckpt = load_checkpoint(src)
    if ema and not ckpt.has_ema:
        raise CheckpointError(f"{ckpt.path} has no EMA weights; drop --ema (or pass --no-ema)")
    use_ema = ckpt.has_ema if ema is None else ema
    if ema_decay is not None:  # one of the EMA averages by decay: it stands in for the main one from here on
        require_ema_decay(ckpt.header, ckpt.config.train.ema_decay, ema_decay)
        ckpt.ema_state = ckpt.average(ema_decay)
        use_ema = True
    chosen = _weights(use_ema, ema_decay) if use_ema or ckpt.has_ema else "ema"  # raw-only: as is
    if fmt == "diffusers":  # a folder; engine.diffusers_io checks it
        from ddpm_cli.engine.diffusers_io import default_export_folder

        dst = Path(dst) if dst is not None else default_export_folder(ckpt.path, chosen)
        if dst.resolve() == ckpt.path.resolve() or dst.resolve() in ckpt.path.resolve().parents:
            raise DdpmError(f"the export would replace its own source {ckpt.path}; pass another --out")
        return ckpt, use_ema, dst
    dst = Path(dst) if dst is not None else default_output(ckpt.path, fmt, dtype, chosen)
    if dst.resolve() == ckpt.path.resolve():
        raise DdpmError(f"the export would replace its own source {dst}; pass another --out")
    if dst.exists() and not overwrite:
        raise DdpmError(f"{dst} already exists; pass --overwrite or another --out")
    if dst.is_dir():
        raise DdpmError(f"{dst} is a directory; pass a file name to --out")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DdpmError(f"cannot create folder {dst.parent}: {e.strerror or e}") from None
    return ckpt, use_ema, dst


def export_safetensors(ckpt, use_ema: bool, dst: Path, dtype: str, ema_decay: float | None = None,
                       overwrite: bool = False) -> ExportResult:
    from safetensors.torch import save as st_save

    state = ckpt.ema_state if use_ema else ckpt.model_state
    tensors = {f"model.{k}": (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    num_params = sum(v.numel() for v in state.values())
    meta = weights_metadata(ckpt.config, ckpt.step, int(ckpt.metadata.get("images_seen", 0)), num_params,
                            has_ema=False, classes=ckpt.classes, kind="export", dtype=DTYPE_NAMES[dtype])
    meta.update(source_weights=_weights(use_ema, ema_decay), exported_from=as_utf8(ckpt.path.name),
                source_created=ckpt.metadata.get("created", ""))
    if ckpt.guide_state is not None:  # the autoguidance guide travels too, so the export samples as the source
        meta["guide_step"] = str(ckpt.guide_step)
        tensors.update({f"guide.{k}": (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
                        for k, v in ckpt.guide_state.items()})
    tmp = temp_beside(dst, ".safetensors")
    try:
        try:
            atomic_write_bytes(tmp, st_save(tensors, metadata=meta))
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
        # Check: the exported file, loaded as `ddpm sample` loads it, against the source weights in fp32.
        ref, _, cfg, _ = load_model(ckpt.path, "cpu", use_ema=use_ema, ema_decay=ema_decay)
        got, _, _, _ = load_model(tmp, "cpu", use_ema=False)
        inputs = random_inputs(cfg, CHECK_BATCH)
        with torch.no_grad():
            want = Denoiser(ref, cfg.model.conditional)(*inputs)
            err = relative_error(Denoiser(got, cfg.model.conditional)(*inputs), want)
        check_export(dst, err, TOLERANCE[dtype], f"the {dtype} weights",
               float(want.abs().max()) if dtype == "fp16" else None)
        _place(tmp, dst, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(dst, "safetensors", _weights(use_ema, ema_decay), dtype, dst.stat().st_size, err,
                        TOLERANCE[dtype], "PyTorch (weights loaded back)")


def _weights(use_ema: bool, ema_decay: float | None) -> str:
    """Which weights an export holds, in words: "model", "ema", or "ema 0.9999" for a chosen average."""
    return "model" if not use_ema else "ema" if ema_decay is None else f"ema {ema_decay}"


def _metadata(ckpt, weights: str, inputs: list[str], output: str) -> dict[str, str]:
    """What an ONNX file's properties and a pt2 archive's ddpm.json hold: the checkpoint's metadata (its config
    among it), the weights exported, and the inputs and the output by name ("eps" or "v": what the network
    predicts)."""
    keep = ("format", "format_version", "ddpm_version", "step", "images_seen", "num_params", "classes", "config")
    meta = {k: ckpt.metadata[k] for k in keep if k in ckpt.metadata}
    meta.update(kind="export", source_weights=weights, exported_from=as_utf8(ckpt.path.name),
                inputs=json.dumps(inputs), output=output)
    return meta


def _torch_onnx_export(net: torch.nn.Module, args: tuple, path: Path, names: list[str], output: str) -> str:
    """Export with the TorchScript-based exporter (fast, needs no onnxscript) and fall back to the dynamo one
    (torch.export + onnxscript) where the former is unavailable; returns which one ran."""
    dynamic_axes = {name: {0: "batch"} for name in [*names, output]}
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, args, str(path), input_names=names, output_names=[output],
                              dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False)
            return "torchscript exporter"
        except Exception as e:  # noqa: BLE001 - removed or failing: try the other exporter
            errors.append(f"torchscript exporter: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        try:
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(net, args, str(path), input_names=names, output_names=[output],
                              dynamic_shapes=tuple({0: batch} for _ in args), opset_version=ONNX_OPSET,
                              dynamo=True)
            return "dynamo exporter"
        except Exception as e:  # noqa: BLE001
            errors.append(f"dynamo exporter: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    path.unlink(missing_ok=True)
    raise DdpmError(f"ONNX export failed ({'; '.join(errors)})")


def export_onnx(ckpt, use_ema: bool, dst: Path, ema_decay: float | None = None,
                overwrite: bool = False) -> ExportResult:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise DdpmError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing); "
                        f"pip install 'ddpm-cli[export]'") from None
    model, _, cfg, _ = load_model(ckpt.path, "cpu", use_ema=use_ema, ema_decay=ema_decay)
    net = fold_upsampling(Denoiser(model, cfg.model.conditional).eval(), frozen=True)
    names = ["x_t", "t", "y"] if cfg.model.conditional else ["x_t", "t"]
    output = cfg.diffusion.prediction  # "eps" or "v"
    tmp = temp_beside(dst)
    try:
        try:
            exporter = _torch_onnx_export(net, random_inputs(cfg, 2, seed=1), tmp, names, output)
            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, _metadata(ckpt, _weights(use_ema, ema_decay), names, output))
            onnx.save(proto, str(tmp))
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
        inputs = random_inputs(cfg, CHECK_BATCH)
        try:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run([output], {n: v.numpy() for n, v in zip(names, inputs)})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise DdpmError(f"the exported ONNX model does not run in onnxruntime ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); {dst.name} was not written") from None
        err = relative_error(torch.from_numpy(got), _unfolded_output(net, inputs))
        check_export(dst, err, TOLERANCE["fp32"], "onnxruntime's output")
        _place(tmp, dst, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(dst, "onnx", _weights(use_ema, ema_decay), "fp32", dst.stat().st_size, err,
                        TOLERANCE["fp32"], f"onnxruntime (batch {CHECK_BATCH}; {exporter})")


def export_pt2(ckpt, use_ema: bool, dst: Path, ema_decay: float | None = None,
               overwrite: bool = False) -> ExportResult:
    model, _, cfg, _ = load_model(ckpt.path, "cpu", use_ema=use_ema, ema_decay=ema_decay)
    net = fold_upsampling(Denoiser(model, cfg.model.conditional).eval(), frozen=True)
    args = random_inputs(cfg, 2, seed=1)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # written under its own name in a temporary folder beside it: the archive's top folder is named for the file;
    # its suffix lower-case, since torch.export.save and load log a warning for a name not ending in .pt2 (m.PT2)
    tmp_dir = temp_beside(dst)
    tmp = tmp_dir / f"{as_utf8(dst.stem)}.pt2"
    try:
        try:
            tmp_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(net, args, dynamic_shapes=tuple({0: batch} for _ in args))
                names = ["x_t", "t", "y"] if cfg.model.conditional else ["x_t", "t"]
                meta = _metadata(ckpt, _weights(use_ema, ema_decay), names, cfg.diffusion.prediction)
                torch.export.save(program, str(tmp), extra_files={PT2_METADATA: json.dumps(meta)})
            inputs = random_inputs(cfg, CHECK_BATCH)
            with torch.no_grad():
                got = torch.export.load(str(tmp)).module()(*inputs)
        except OSError as e:
            raise DdpmError(f"cannot write {dst}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            raise DdpmError(f"torch.export failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); {dst.name} was not written") from None
        err = relative_error(got, _unfolded_output(net, inputs))
        check_export(dst, err, TOLERANCE["fp32"], "the torch.export program")
        _place(tmp, dst, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(dst, "pt2", _weights(use_ema, ema_decay), "fp32", dst.stat().st_size, err,
                        TOLERANCE["fp32"], f"torch.export.load (batch {CHECK_BATCH})")


def export_diffusers(ckpt, use_ema: bool, dst: Path, dtype: str, ema_decay: float | None,
                     overwrite: bool) -> ExportResult:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/): diffusers' UNet2DModel and DDPMScheduler
    configs and weights for the same network and noise schedule; checked by reading it back."""
    from ddpm_cli.engine.diffusers_io import write_pipeline

    state = ckpt.ema_state if use_ema else ckpt.model_state
    tolerance = 1e-6 if dtype == "fp32" else TOLERANCE[dtype]  # fp32: the same numbers, so the same function
    size, err = write_pipeline(state, ckpt.config, dst, DTYPES[dtype], overwrite, tolerance)
    return ExportResult(dst, "diffusers", _weights(use_ema, ema_decay), dtype, size, err, tolerance,
                        "ddpm reading the folder back (the mapping both ways)")


def export_checkpoint(src: str | Path, dst: str | Path | None = None, fmt: str = "safetensors", *,
                      ema: bool | None = None, ema_decay: float | None = None, dtype: str = "fp32",
                      overwrite: bool = False) -> ExportResult:
    """Export a checkpoint (or a run directory's latest) and check the result; see the module docstring."""
    ckpt, use_ema, out = _prepare(src, Path(dst) if dst is not None else None, fmt, dtype, overwrite, ema, ema_decay)
    if fmt == "safetensors":
        return export_safetensors(ckpt, use_ema, out, dtype, ema_decay, overwrite)
    if fmt == "onnx":
        return export_onnx(ckpt, use_ema, out, ema_decay, overwrite)
    if fmt == "diffusers":
        return export_diffusers(ckpt, use_ema, out, dtype, ema_decay, overwrite)
    return export_pt2(ckpt, use_ema, out, ema_decay, overwrite)
