"""The `ddpm` Typer app: registers each command module. Imports nothing heavy, so `ddpm --help` is fast."""
from __future__ import annotations

from typing import Optional

import typer

from ddpm_cli import __version__
from ddpm_cli.cli import cache_cmd, config_cmd, ui
from ddpm_cli.cli.ema_cmd import ema_command
from ddpm_cli.cli.eval_cmd import eval_command
from ddpm_cli.cli.export import export_command
from ddpm_cli.cli.import_cmd import import_command
from ddpm_cli.cli.inspect_cmd import inspect_command
from ddpm_cli.cli.sample import sample_command
from ddpm_cli.cli.train import train_command

app = typer.Typer(name="ddpm", help="Train, sample and evaluate denoising diffusion models (DDPM).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddpm {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")) -> None:
    """Train, sample and evaluate denoising diffusion models (DDPM)."""


# train takes arguments it does not know, to say what to write instead (a config without -c, a field as an option)
app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train_command)
app.command("eval")(eval_command)
app.command("sample")(sample_command)
app.command("inspect")(inspect_command)
app.command("export")(export_command)
app.command("ema")(ema_command)
app.command("import")(import_command)
app.add_typer(config_cmd.app, name="config")
app.add_typer(cache_cmd.app, name="cache")


def main() -> None:
    """The `ddpm` console script. A command that asked for it (ui.exit_quickly_when_done) ends the process as soon
    as it returns."""
    try:
        app()
    except SystemExit as done:
        if ui.quick_exit_requested():
            ui.end_process(done.code)
        raise
