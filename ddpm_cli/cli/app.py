"""The `ddpm` Typer app: registers each command module. Imports nothing heavy, so `ddpm --help` is fast."""
from __future__ import annotations

import sys
from typing import Optional

import typer
import typer.core
from typer.core import TyperGroup

from ddpm_cli import __version__
from ddpm_cli.cli import cache_cmd, config_cmd, ui
from ddpm_cli.cli.ema_cmd import ema_command
from ddpm_cli.cli.eval_cmd import eval_command
from ddpm_cli.cli.export import export_command
from ddpm_cli.cli.import_cmd import import_command
from ddpm_cli.cli.inspect_cmd import inspect_command
from ddpm_cli.cli.sample import sample_command
from ddpm_cli.cli.train import train_command

# The click that typer runs on: its own copy from typer 0.2x on (typer._click), the click package before
_click = getattr(typer.core, "_click", None) or __import__("click")
click_errors = _click.exceptions
NoArgsIsHelp = getattr(click_errors, "NoArgsIsHelpError", ())  # click 8.2 on; before, the help exits 0


def usage_line(e: click_errors.UsageError) -> str:
    """Click's usage error as ddpm's one line: what is wrong, and what to write or where to look."""
    cmd = e.ctx.command_path if e.ctx is not None else "ddpm"
    if isinstance(e, click_errors.NoSuchOption):
        near = ui.close_option(e.option_name, e.ctx.command.params if e.ctx else [])
        return f"{cmd} has no option {e.option_name}; " + (f"did you mean {near}?" if near else f"see {cmd} -h")
    if isinstance(e, click_errors.MissingParameter) and getattr(e.param, "param_type_name", "") == "argument":
        name = e.param.name
        return f"{cmd} needs its {name} argument: {cmd} {name.upper()} [OPTIONS] (see {cmd} -h)"
    message = e.format_message().rstrip(".").replace(": Value error, ", ": ", 1)  # (typer 0.2x's words for a choice)
    return f"{message[:1].lower()}{message[1:]}; see {cmd} -h"


class DdpmGroup(TyperGroup):
    """The app's command group: a usage error (an unknown option, a missing argument, a value of the wrong type) is
    one `error:` line and exit 2, like every other error of ddpm, not click's usage text in a box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelp as e:  # `ddpm`, `ddpm cache`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click_errors.UsageError as e:
            ui.err_console.print(ui.labelled("error:", "bold red", usage_line(e)), soft_wrap=True)
            sys.exit(2)
        except click_errors.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            ui.err_console.print("Aborted!", markup=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(name="ddpm", help="Train, sample and evaluate denoising diffusion models (DDPM).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=DdpmGroup,
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
