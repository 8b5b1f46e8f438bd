"""`ddpm train`: validate the config, run the engine's training loop with a progress display, stop cleanly on
SIGINT/SIGTERM (checkpoint first), resume a run, or launch itself on several GPUs through torchrun."""
from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.launch import is_main_process, relaunch_with_torchrun, under_torchrun
from ddpm_cli.cli.ui import TrainDisplay, close_option, console, fail, friendly, warn


def _install_signal_handlers(stop) -> dict:
    """Route SIGINT/SIGTERM to `stop`, and SIGHUP (the terminal or ssh session closed) unless it is ignored (as
    under nohup); returns the previous handlers so the command can put them back."""
    def handler(signum, frame):  # noqa: ARG001
        if stop.count >= 1 and signum == signal.SIGINT:
            # Second Ctrl-C: leave at once. Checkpoints are written atomically, so the last good one is intact.
            os._exit(130)
        stop.request(signum)

    signals = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signals.append(signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in signals}
    for s in previous:
        signal.signal(s, handler)
    return previous


def _extra_arguments(args: list[str], params) -> str:
    """What to write instead of arguments `ddpm train` does not take (another tool's habits): a config given
    without -c, a run without --resume, a config field as an option of its own, a misspelt one of its `params`."""
    first = args[0]
    if not first.startswith("-"):
        if Path(first).suffix.lower() in (".yaml", ".yml"):
            return f"a config is given with -c: ddpm train -c {shlex.quote(first)}"
        if Path(first).is_dir() or Path(first).suffix.lower() == ".safetensors":
            return f"to continue a run: ddpm train --resume {shlex.quote(first)}"
        return f"unexpected argument {first!r}: ddpm train takes -c CONFIG (a new run) or --resume RUN"
    option, _, value = first.partition("=")
    if not value and len(args) > 1 and not args[1].startswith("-"):
        value = args[1]
    from ddpm_cli.config import RunConfig

    name = option.lstrip("-").replace("-", "_")
    fields = [f"{section}.{name}" for section, info in RunConfig.model_fields.items()
              if name in info.annotation.model_fields]
    if fields:
        return f"no option {option}; config fields are set with --set: --set {fields[0]}={value or 'VALUE'}"
    near = close_option(option, params)
    if near:
        return f"no option {option}; did you mean {near}?"
    return f"no option {option}; see ddpm train -h (config fields are set with --set section.field=VALUE)"


@friendly
def train_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (see examples/).",
                                          show_default=False),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set train.batch_size=64 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run: its directory or a checkpoint.",
                                          show_default=False),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Launch on N GPUs of this machine through torchrun."),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --resume from a checkpoint that is not the "
                                   "run's latest: replace the checkpoints the run saved after it."),
) -> None:
    """Train a diffusion model from a config file."""
    if ctx.args:  # taken (context_settings in cli/app.py) only to say what to write instead
        fail(_extra_arguments(ctx.args, ctx.command.params), code=2)
    from ddpm_cli.config import load_config, refuse_identity_change

    if resume is not None and config is not None:
        fail("pass either --config (a new run) or --resume (its stored config is used; change it with --set)",
             code=2)
    if resume is None and config is None and not set_:  # (the defaults with --set alone stay possible)
        fail("pass --config FILE, a run config (start from examples/quickstart.yaml: a small model on built-in "
             "data, no download), or --resume RUN to continue a run", code=2)
    if resume is not None:
        from ddpm_cli.engine.checkpoint import StoredConfig, read_checkpoint_config

        moved = [s for s in set_ if _moves_the_run(s)]
        if moved:  # the run goes on in its own folder: the stored config would name another one
            fail(f"--set {moved[0]}: a resume continues the run in its own folder; copy the folder (with its "
                 f"checkpoints/) to continue it elsewhere, and --resume the copy", code=2)

        weights, header, cfg = read_checkpoint_config(resume, set_)  # the stored config, --set applied
        if weights.parent.name != "checkpoints":  # the run is the folder above checkpoints/: there is none here
            fail(f"{weights} is not in a run's checkpoints/ folder, so there is no run to continue; --resume the run "
                 f"directory it came from, or copy it with its .state.safetensors into RUN/checkpoints/ and --resume "
                 f"RUN")
        if is_main_process():  # while another process trains the run, refused first (the trainer then locks it)
            from ddpm_cli.engine.runs import check_run_free

            check_run_free(weights.parent.parent, resume=True)
        stored = StoredConfig.of(header).validated()
        refuse_identity_change(stored, cfg, weights)  # before anything in the run is touched (the engine checks too)
        _refuse_going_back(header, cfg)
        later = _later_checkpoints(weights, overwrite)
        if set_:
            _say_if_the_size_changed(stored, cfg)
        if is_main_process():
            _keep_an_edited_config(weights.parent.parent, stored)
    else:
        weights, cfg, later = None, load_config(config, set_), []
    if gpus >= 1 and not under_torchrun():  # --gpus 1 too: one process through the same launcher
        return relaunch_with_torchrun(gpus)

    from ddpm_cli.engine.train import StopFlag, Trainer

    stop = StopFlag()
    previous_handlers = _install_signal_handlers(stop)
    display = TrainDisplay(cfg.train.steps)
    trainer = None
    try:
        trainer = Trainer(cfg, resume=weights, callbacks=display, stop=stop,
                          name_hint=config.stem if config else None)
        if later and is_main_process():  # only once the run can train: a start that fails keeps them
            _remove_later_checkpoints(weights, later)
        result = trainer.run()
    finally:
        display.close()
        for signum, handler in previous_handlers.items():  # a caller (tests, notebooks) gets its own back
            signal.signal(signum, handler)
        if trainer is not None:
            trainer.close()
    if trainer.main:
        _report(trainer, result)


def _moves_the_run(assignment: str) -> bool:
    """Whether a --set names the run's folder: logging.run_dir, logging.run_name, or a whole logging section that
    holds either."""
    key, _, value = assignment.partition("=")
    key = key.strip()
    if key in ("logging.run_dir", "logging.run_name"):
        return True
    if key != "logging":
        return False
    import yaml

    try:
        section = yaml.safe_load(value)
    except yaml.YAMLError:
        return False  # the config's own check says what is wrong with it
    return isinstance(section, dict) and bool({"run_dir", "run_name"} & set(section))


def _refuse_going_back(header, cfg) -> None:
    """A resume whose train.steps the run has passed is refused: it trained nothing and said "done", and left the
    run's config.yaml disagreeing with its checkpoints. (One that has reached it says so in its closing lines.)"""
    try:
        at = int(header.metadata.get("step", 0))
    except ValueError:
        return  # the engine names an unreadable step
    if cfg.train.steps < at:
        fail(f"train.steps = {cfg.train.steps:,} is below the run's step {at:,}: a resume only goes forward; set "
             f"train.steps above {at:,} to continue, or --resume an earlier checkpoint with --overwrite", code=2)


def _report(trainer, result) -> None:
    """The closing lines: how the run ended, and how to sample from its checkpoint."""
    from ddpm_cli.engine.train import result_reason

    why = result_reason(result.stop_reason)
    compiled = f", {result.compile_s:.1f} s of it compiling" if trainer.compiled and result.compile_s else ""
    saved = (f"checkpoint {result.checkpoint}" if result.checkpoint is not None else
             "no checkpoint: the run ended before its first step (raise train.max_time)")
    console.print(f"done: step {result.step}, {result.images_seen:,} images seen in {result.elapsed_s:.1f} s "
                  f"({why}{compiled}); {saved}", markup=False, soft_wrap=True)
    from ddpm_cli.engine.runs import CKPT_RE

    start = CKPT_RE.search(trainer.resumed_from.name) if trainer.resumed_from is not None else None
    if start and int(start.group(1)) == result.step and result.stop_reason == "steps":
        console.print(f"nothing to train: the run was at train.steps = {result.step:,} already; raise it (--set "
                      f"train.steps=N) to continue", markup=False, soft_wrap=True)
    if result.checkpoint is None:
        return
    guided = (f" (autoguided by its step-{trainer.guide[0]} weights by default; --guidance 1 for none)"
              if trainer.guide is not None else "")
    console.print(f"sample with: ddpm sample {shlex.quote(str(result.checkpoint))} -n 64 --grid grid.png{guided}",
                  markup=False, soft_wrap=True)


def _later_checkpoints(weights: Path, overwrite: bool) -> list[Path]:
    """The run's checkpoints after `weights`, which a resume from it replaces (with the metrics, sample grids and
    post-hoc EMA snapshots of those steps): refused unless --overwrite, since they are saved work."""
    from ddpm_cli.engine.runs import latest_checkpoint, list_checkpoints

    latest = latest_checkpoint(weights.parent.parent)
    if latest is not None and latest.resolve() == weights.resolve():
        return []  # the run's latest (latest.json's): a file past it is an interrupted save, which the run redoes
    found = list_checkpoints(weights.parent.parent)
    names = [p.name for p in found]
    later = found[names.index(weights.name) + 1:] if weights.name in names else []
    if later and not overwrite:
        run = weights.parent.parent
        fail(f"{weights.name} is not the run's latest checkpoint: resuming from it would replace what {run} trained "
             f"after it ({len(later)} later checkpoint{'s' if len(later) > 1 else ''}, up to {later[-1].name}, with "
             f"their metrics and post-hoc EMA snapshots); resume from the latest with --resume {run}, or pass "
             f"--overwrite to replace them")
    return later


def _remove_later_checkpoints(weights: Path, later: list[Path]) -> None:
    """--overwrite: the run's checkpoints after `weights` go once the trainer is built and before it trains, so
    that none of them can pass for the run's latest (latest.json first: without it the newest checkpoint left,
    `weights`, is the latest)."""
    from ddpm_cli.engine.runs import state_path

    (weights.parent.parent / "latest.json").unlink(missing_ok=True)
    for old in reversed(later):
        old.unlink(missing_ok=True)
        state_path(old).unlink(missing_ok=True)
    warn(f"--overwrite: removed the {len(later)} checkpoint{'s' if len(later) > 1 else ''} after {weights.name} "
         f"(up to {later[-1].name}); the run continues from {weights.name}")


def _keep_an_edited_config(run_dir: Path, stored) -> None:
    """A resume trains with the checkpoint's config (and --set) and rewrites RUN/config.yaml with it. A config.yaml
    edited since the run wrote it (to change the run's length, say) would be replaced unseen: it is kept, under a
    name of its own, and what differs from the checkpoint's config is named with the --set that applies it."""
    import json

    import yaml

    from ddpm_cli.config import config_to_dict
    from ddpm_cli.engine.files import atomic_write_bytes
    from ddpm_cli.engine.runs import config_edited

    if not config_edited(run_dir):  # as the run wrote it, or not known (a run of an older ddpm)
        return

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    path = run_dir / "config.yaml"
    # Copied, not moved: a resume that then fails (its data missing, say) leaves the run its config.yaml; the
    # copy of an edit already kept by an earlier try is that copy, not another.
    try:
        text = path.read_bytes()
        names = (run_dir / f"config.edited{f'-{n}' if n else ''}.yaml" for n in range(10**6))
        kept = next(p for p in names if not p.exists() or p.read_bytes() == text)
        if not kept.exists():
            atomic_write_bytes(kept, text)
    except OSError as e:  # the run would write over it: stop before anything is lost
        fail(f"{path} was edited since the run wrote it, and it cannot be kept aside ({e.strerror or e}); copy it "
             f"elsewhere and resume again")
    try:
        edited = yaml.safe_load(kept.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        edited = None
    edited = flat(edited) if isinstance(edited, dict) else {}
    ours = flat(config_to_dict(stored))
    changed = sorted(k for k in edited.keys() | ours.keys() if edited.get(k) != ours.get(k))
    shown = ", ".join(f"{k}: {json.dumps(edited.get(k))} there, {json.dumps(ours.get(k))} in the checkpoint"
                      for k in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""

    def as_set(key: str) -> str:  # JSON is YAML: null, true, [1,2] and numbers read back as they were
        v = edited[key]
        return f"--set {key}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"

    sets = " ".join(as_set(k) for k in changed[:3] if k in edited)
    warn(f"{path} was edited since the run wrote it ({shown or 'no setting differs'}{more}); a resume trains with "
         f"the checkpoint's config and --set, so the file is kept as {kept.name}"
         + (f": to apply its changes, resume with {sets}" if sets else ""))


def _say_if_the_size_changed(stored, cfg) -> None:
    """A convolutional network's weights fit any image size, so `--resume --set model.image_size=...` trains on
    at the new size (a fine-tune at a larger size, say): said once, never silently."""
    if stored.model.hw != cfg.model.hw:
        (h0, w0), (h1, w1) = stored.model.hw, cfg.model.hw
        warn(f"the run was trained at {h0}x{w0} and continues at {h1}x{w1} (--set model.image_size): the same "
             f"weights go on at the new size; to start a new network instead, use --config")
