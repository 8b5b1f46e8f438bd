"""`ddpm config show | validate | reference`: look at a resolved config, check a file, print the field table."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddpm_cli.cli.ui import console, friendly

app = typer.Typer(help="Show, check and document run configs.", no_args_is_help=True)


def _config_argument(help: str):
    return typer.Argument(None, metavar="CONFIG", show_default=False, help=help)


def _one_config(path: Optional[Path], config: Optional[Path]) -> Optional[Path]:
    """The config given as the argument or with -c (show and validate take either, as train takes -c)."""
    from ddpm_cli.errors import UsageError

    if path is not None and config is not None:
        raise UsageError("give the config once: as the argument or with -c, not both")
    if path is not None and "=" in path.name and not path.exists():  # a field's value, without its --set
        raise UsageError(f"{path} is not a config file; to change a field, pass --set {path}")
    return path or config


@app.command("show")
@friendly
def show(path: Optional[Path] = _config_argument("YAML config (or -c); default: the defaults."),
         config: Optional[Path] = typer.Option(None, "--config", "-c", show_default=False,
                                               help="YAML config, as train takes it; default: the defaults."),
         set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable).")) -> None:
    """Print the resolved config as YAML, each field with its help."""
    from ddpm_cli.config import load_config, to_commented_yaml

    console.print(to_commented_yaml(load_config(_one_config(path, config), set_)), markup=False, soft_wrap=True)


@app.command("validate")
@friendly
def validate(path: Optional[Path] = _config_argument("YAML config to check (or -c)."),
             config: Optional[Path] = typer.Option(None, "--config", "-c", show_default=False,
                                                   help="YAML config to check, as train and show take it."),
             set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable).")) -> None:
    """Check a config; list every problem with its field path."""
    from ddpm_cli.config import load_config
    from ddpm_cli.errors import UsageError

    config = _one_config(path, config)
    if config is None:
        raise UsageError("give a config to check: ddpm config validate FILE (or -c FILE)")
    cfg = load_config(config, set_)
    m = cfg.model
    console.print(f"{config}: valid ({cfg.data.dataset} data, {m.size_text()}, base {m.base_channels} "
                  f"x {list(m.channel_mults)}, {cfg.diffusion.schedule} schedule, T={cfg.diffusion.num_timesteps})",
                  markup=False, soft_wrap=True)


@app.command("reference")
def reference() -> None:
    """Print every config field with its default and help, as a Markdown table."""
    from ddpm_cli.config import reference_markdown

    console.print(reference_markdown(), markup=False, soft_wrap=True)
