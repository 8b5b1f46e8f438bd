"""The config as documentation: the resolved config as commented YAML (`ddpm config show`) and the field
reference table (`ddpm config reference`, docs/config.md)."""
from __future__ import annotations

import json

import yaml
from pydantic import BaseModel

from ddpm_cli.config.schema import RunConfig


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def to_commented_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML with every field's help as a comment above it."""
    out: list[str] = []

    def emit(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            for line in (field.description or "").splitlines():
                out.append(f"{pad}# {line.strip()}")
            if isinstance(value, BaseModel):
                out.append(f"{pad}{name}:")
                emit(value, indent + 1)
            else:
                dumped = yaml.safe_dump({name: json.loads(json.dumps(value))}, default_flow_style=True,
                                        sort_keys=False, width=10_000, allow_unicode=True).strip()
                out.append(pad + dumped.removeprefix("{").removesuffix("}"))

    for name in RunConfig.model_fields:
        section = getattr(cfg, name)
        doc = (type(section).__doc__ or "").strip()
        out.append(f"# --- {name}: {doc}")
        out.append(f"{name}:")
        emit(section, 1)
        out.append("")
    return "\n".join(out)


def reference_markdown() -> str:
    """A Markdown table of every field (section, name, default, help), for the README."""
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    defaults = RunConfig()

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
                continue
            help_text = " ".join((field.description or "").split())
            rows.append(f"| `{prefix}{name}` | `{json.dumps(value)}` | {help_text} |")

    walk(defaults, "")
    return "\n".join(rows)
