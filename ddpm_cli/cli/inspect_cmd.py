"""`ddpm inspect CKPT`: what a checkpoint holds (format, run progress, architecture, schedule, tensors) read from
its safetensors header alone, so it never imports torch and is fast on big files; a run directory lists its
checkpoints. `--json` for scripts."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import typer

from ddpm_cli.cli.ui import console, friendly


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _listed(v) -> list:
    """A stored list as a list; a damaged one (a number, a string) as its one item, so a row still shows it."""
    return list(v) if isinstance(v, (list, tuple)) else [] if v is None else [v]


def _json_safe(v):
    """JSON has no NaN or infinity: a stored value that is one is shown as its text ("nan")."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _guide_step(header) -> int | str | None:
    """The stored guide's step, or why it cannot be used (inspect shows a broken file, it does not refuse it)."""
    from ddpm_cli.engine.checkpoint import stored_guide_step
    from ddpm_cli.errors import CheckpointError

    try:
        return stored_guide_step(header)
    except CheckpointError as e:
        return f"unusable ({e})"


def describe(header, sha256: bool = False) -> dict:
    """A checkpoint header -> a JSON-ready summary (the `--json` output; the table shows the same)."""
    from ddpm_cli.engine.checkpoint import StoredConfig, class_names, ema_decays, has_ema_weights
    from ddpm_cli.errors import DdpmError

    meta = header.metadata
    stored = StoredConfig.of(header)
    cfg = stored.sections()  # lenient: inspect shows what it can read
    classes = class_names(meta)
    dtypes: dict[str, int] = {}
    model_params = 0
    for name, info in header.tensors.items():
        info = info if isinstance(info, dict) else {}  # a damaged entry is counted, not trusted
        dtype = info.get("dtype") if isinstance(info.get("dtype"), str) else "?"
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        shape = info.get("shape")
        if name.startswith("model.") and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            model_params += math.prod(shape)
    num_params = _int(meta.get("num_params"))
    train = cfg["train"]
    main_decay = train.get("ema_decay") if isinstance(train.get("ema_decay"), (int, float)) else None
    info = {
        "path": str(header.path),
        "file_size": header.file_size,
        "format": meta.get("format"),
        "format_version": _int(meta.get("format_version")),
        "kind": meta.get("kind"),
        "ddpm_version": meta.get("ddpm_version"),
        "created": meta.get("created"),
        "step": _int(meta.get("step")),
        "images_seen": _int(meta.get("images_seen")),
        "num_params": num_params if num_params is not None else (model_params or None),
        "has_ema": has_ema_weights(header),
        "ema_decays": ema_decays(header, main_decay),
        "guide_step": _guide_step(header),
        "guide_weight": train.get("guide_weight") if _number(train.get("guide_weight")) else None,
        "dtype": meta.get("dtype"),
        "model": cfg.get("model", {}),
        "diffusion": cfg.get("diffusion", {}),
        "classes": classes,
        "tensors": {"count": len(header.tensors), "dtypes": dict(sorted(dtypes.items()))},
    }
    try:  # what sample, export and a resume would say of the stored config (inspect still shows what it can)
        stored.validated()
    except DdpmError as e:
        info["config_problem"] = str(e)
    for key in ("source_weights", "exported_from", "source", "source_path"):
        if key in meta:
            info[key] = meta[key]
    try:  # `ddpm ema`'s output: which average it is
        posthoc = json.loads(meta["posthoc_ema"]) if "posthoc_ema" in meta else None
    except ValueError:
        posthoc = None
    if isinstance(posthoc, dict):
        info["posthoc_ema"] = posthoc
    if sha256:
        info["sha256"] = file_sha256(header.path)
    return info


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _rows(info: dict) -> list[tuple[str, str]]:
    m, d = info["model"], info["diffusion"]
    opt = lambda v: "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    rows = [
        ("file", info["path"]),
        ("file size", f"{human_size(info['file_size'])} ({info['file_size']:,} bytes)"),
        ("format", f"{info['format']} v{opt(info['format_version'])}"),
        ("kind", opt(info["kind"])),
        ("ddpm version", opt(info["ddpm_version"])),
        ("created", opt(info["created"])),
        ("step", opt(info["step"])),
        ("images seen", opt(info["images_seen"])),
    ]
    if info.get("config_problem"):  # every config row below reads '-': say why, once
        rows.append(("stored config", f"unusable: {info['config_problem']}"))
    if m:
        classes = info["classes"]
        if m.get("conditional"):
            names = f": {', '.join(map(str, classes))}" if classes else ""
            cls = f"{m.get('num_classes')} (conditional){names}"
        else:
            cls = "unconditional"
        size = m.get("image_size")
        h, w = size if isinstance(size, (list, tuple)) and len(size) == 2 else (size, size)
        sides = type(h) is int and type(w) is int and min(h, w) > 0

        def level(r) -> str:  # an attention resolution names a level by its shorter side: its height x width
            if sides and type(r) is int and h != w:
                return f"{h * r // min(h, w)}x{w * r // min(h, w)}"
            return f"{r}x{r}"

        rows += [
            ("image size", f"{h}x{w}, {m.get('in_channels')} channel(s)"),
            ("base channels", opt(m.get("base_channels"))),
            ("channel multipliers", ", ".join(map(str, _listed(m.get("channel_mults"))))),
            ("residual blocks", f"{m.get('num_res_blocks')} per level"),
            ("attention", (", ".join(map(level, _listed(m.get("attention_resolutions")))) or "mid only")
             + (f" ({m['head_channels']} channels a head)" if m.get("head_channels")
                else f" ({m.get('num_heads', 1)} head(s))")),
            ("classes", cls),
        ]
    ema = ", ".join(map(str, info["ema_decays"])) or ("yes" if info["has_ema"] else "no")
    rows += [("parameters", opt(info["num_params"])), ("EMA weights", ema)]
    if isinstance(info["guide_step"], int):
        rows.append(("autoguidance guide", f"the weights of step {info['guide_step']:,}, weight "
                                           f"{opt(info['guide_weight'])} (sample/eval default)"))
    elif info["guide_step"] is not None:
        rows.append(("autoguidance guide", info["guide_step"]))
    if "source_weights" in info:
        rows.append(("exported from", f"{info.get('exported_from', '?')} ({info['source_weights']} weights)"))
    ph = info.get("posthoc_ema")
    if ph:
        fit = ph.get("fit_error")
        rows.append(("post-hoc EMA", f"relative length {ph.get('length')} at step {opt(ph.get('step'))}, from "
                                     f"{ph.get('averages')} stored averages"
                                     + (f" (profile fit error {fit:.2%})" if isinstance(fit, (int, float)) else "")))
    if "source" in info:
        rows.append(("imported from", f"{info['source']}: {info.get('source_path', '?')}"))
    if d:
        sched = f"{d.get('schedule')}, T = {d.get('num_timesteps')}"
        if d.get("schedule") != "cosine":
            sched += f", low {d.get('schedule_low')} / high {d.get('schedule_high')}"
        if d.get("schedule") == "dns":
            sched += f", offset {d.get('dns_offset')}"
        predicts = {"eps": "the noise (eps)", "v": "the velocity (v)"}.get(str(d.get("prediction", "eps")), "?")
        rows += [("schedule", sched), ("network predicts", predicts), ("sampler variance", opt(d.get("variance")))]
    t = info["tensors"]
    rows.append(("tensors", f"{t['count']:,} ({', '.join(f'{k} x {v}' for k, v in t['dtypes'].items()) or '-'})"))
    if info.get("dtype"):
        rows.append(("weights dtype", info["dtype"]))
    return rows


def _list_run(run_dir: Path, as_json: bool, sha256: bool) -> None:
    from ddpm_cli.engine.checkpoint import read_header
    from ddpm_cli.engine.posthoc_ema import list_snapshots
    from ddpm_cli.engine.runs import latest_checkpoint, list_checkpoints, no_checkpoints_error
    from ddpm_cli.errors import DdpmError

    found = list_checkpoints(run_dir)
    if not found:
        raise no_checkpoints_error(run_dir)
    latest = latest_checkpoint(run_dir)
    try:
        snaps = list_snapshots(run_dir)
    except DdpmError:
        snaps = []  # inspect shows what it can read; `ddpm ema` names the damaged snapshot
    entries = []
    for p in found:
        entry: dict = {"path": str(p), "latest": latest is not None and p.resolve() == latest.resolve()}
        try:
            h = read_header(p)
            entry.update(file_size=h.file_size, step=_int(h.metadata.get("step")),
                         images_seen=_int(h.metadata.get("images_seen")), created=h.metadata.get("created"),
                         has_ema=h.metadata.get("has_ema") == "true")
            if sha256:
                entry["sha256"] = file_sha256(p)
        except DdpmError as e:
            entry["error"] = str(e)
        entries.append(entry)
    if as_json:
        listing = {"run_dir": str(run_dir), "latest": str(latest) if latest else None, "checkpoints": entries,
                   "posthoc_ema_snapshots": [{"path": str(x.path), "step": x.step, "lengths": x.lengths}
                                             for x in snaps]}
        typer.echo(json.dumps(_json_safe(listing), indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"checkpoints of {run_dir}"), title_justify="left", box=None, pad_edge=False,
                  caption="* latest (what sample/export/--resume use)", caption_justify="left")
    for col in ("checkpoint", "step", "images", "created", "size"):
        table.add_column(col, justify="right" if col in ("step", "images", "size") else "left", no_wrap=True)
    if sha256:
        table.add_column("sha256", no_wrap=True)
    for e in entries:
        name = Path(e["path"]).name + ("*" if e["latest"] else " ")
        if "error" in e:
            table.add_row(Text(name), "-", "-", "unreadable", "-", *(["-"] if sha256 else []))
            continue
        table.add_row(Text(name), f"{e['step']:,}" if e["step"] is not None else "-",
                      f"{e['images_seen']:,}" if e["images_seen"] is not None else "-",
                      Text((e["created"] or "-")[:19].replace("T", " ")), human_size(e["file_size"]),
                      *([e["sha256"]] if sha256 else []))
    console.print(table)
    for e in entries:
        if "error" in e:
            console.print(f"{Path(e['path']).name}: {e['error']}", markup=False, soft_wrap=True)
    console.print(f"details of one: ddpm inspect {shlex.quote(str(latest or found[-1]))}", markup=False, soft_wrap=True)
    if snaps:
        console.print(f"post-hoc EMA: {len(snaps)} snapshots of the lengths "
                      f"{', '.join(f'{x:g}' for x in snaps[-1].lengths)} (steps {snaps[0].step:,} to "
                      f"{snaps[-1].step:,}); a checkpoint of any length: ddpm ema {shlex.quote(str(run_dir))} "
                      f"--length L",
                      markup=False, soft_wrap=True)


@friendly
def inspect_command(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT",
                                      help="A .safetensors checkpoint, or a run directory (lists its "
                                           "checkpoints).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    sha256: bool = typer.Option(False, "--sha256", help="Also compute the file's SHA-256 (reads the whole file)."),
) -> None:
    """Show what a checkpoint holds, from its header alone (fast, no torch)."""
    from ddpm_cli.engine.checkpoint import read_header
    from ddpm_cli.engine.checkpoint.format import refuse_other_kinds

    if checkpoint.is_dir():
        from ddpm_cli.engine.runs import run_folder

        return _list_run(run_folder(checkpoint), as_json, sha256)
    header = read_header(checkpoint)
    refuse_other_kinds(checkpoint, header)  # (a run's training state or EMA snapshot: it says what to pass)
    info = describe(header, sha256=sha256)
    if as_json:
        typer.echo(json.dumps(_json_safe(info), indent=2))  # plain: rich would wrap long strings
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = _rows(info)
    for key, value in rows:
        table.add_row(key, Text(value))  # values come from the file (class names, paths): no markup
    console.print(table)
    if "sha256" in info:  # on its own unwrapped line, so it can be copied whole
        width = max(len(k) for k, _ in rows)
        console.print(f"[bold]{'sha256':<{width}}[/]  {info['sha256']}", soft_wrap=True)
