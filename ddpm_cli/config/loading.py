"""Loading a run config: YAML files, `--set a.b=v` overrides, validation, and errors that name the field
and its source (the file or the --set)."""
from __future__ import annotations

import copy
import datetime
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ddpm_cli.config.schema import RunConfig
from ddpm_cli.errors import ConfigError, UsageError


# A number with an exponent and no decimal point (1e5): YAML 1.1, which PyYAML reads and writes, takes it as text.
# A float field parses that text; an integer field refuses it, and the problem line then says what to write.
_EXPONENT = re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+")
_PYTHON_CONSTANT = re.compile(r"(?<!')\b(True|False|None)\b(?!')")  # unquoted, as pydantic lists a Literal's choices
_YAML_SPELLING = {"True": "true", "False": "false", "None": "null"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=v' -> (['a', 'b'], v), v parsed as a YAML scalar or list ('64' -> 64, '[1,2]' -> [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise UsageError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.batch_size=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    if overrides and not isinstance(data, dict):
        raise ConfigError(f"cannot apply --set to a config that is a {type(data).__name__}, not a mapping")
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {text!r}: {part} is a value, not a section")
            node = child
        value = _as_text(path, text.partition("=")[2].strip(), value)
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            _merge(node[path[-1]], value)  # `train={steps: 3}` sets steps; the section's other fields stay
        else:
            node[path[-1]] = value
    return data


def _merge(into: dict, new: dict) -> None:
    """Write `new`'s keys into `into`, section by section (a mapping into a mapping merges)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _as_text(path: list[str], raw: str, value: Any) -> Any:
    """A text field's --set value is the text as written (`run_name=2024`, `data.root=2026-01-01`, `root=my photos
    #2`, where YAML would read a number, a date or a comment), but for a quoted string (YAML's reading, unquoted)
    and null or ~ on a field that may be None. Other fields keep YAML's reading."""
    kind = _text_field(path)
    if kind is None or (isinstance(value, str) and raw[:1] in ("\"", "'")):
        return value
    if value is None and kind == "optional" and raw in ("null", "~", "Null", "NULL"):
        return None
    return raw


def _section_of(path) -> type[BaseModel] | None:
    """The config section (a model class) that holds the field at `path` (a dotted key's parts), or None where a
    part is no section."""
    model: type[BaseModel] = RunConfig
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _text_field(path: list[str]) -> str | None:
    """"text" or "optional" where the field at `path` holds free text (str, or str or None); else None."""
    section = _section_of(path)
    field = section.model_fields.get(path[-1]) if section is not None else None
    if field is None:
        return None
    return "text" if field.annotation is str else "optional" if field.annotation == (str | None) else None


def _known_fields(loc: tuple) -> list[str]:
    section = _section_of(loc)
    return list(section.model_fields) if section is not None else []


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per problem: 'path: what is wrong (what is allowed)'."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        path = ".".join(str(p) for p in loc) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if not loc and e["type"] == "value_error":  # RunConfig's checks of how fields go together: located lines
            lines.extend(msg.splitlines())
            continue
        if e["type"] == "literal_error":  # the choices as a config file writes them: true, not True
            msg = _PYTHON_CONSTANT.sub(lambda m: _YAML_SPELLING[m.group(1)], msg)
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), _known_fields(loc), n=1)
            msg = "unknown field" + (f"; did you mean '{near[0]}'?" if near else
                                     f"; allowed here: {', '.join(_known_fields(loc))}")
        elif e["type"] not in ("value_error", "assertion_error") and "input" in e:
            got = e["input"]
            if not isinstance(got, dict):
                shown = json.dumps(got, default=str)
                msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
            if e["type"] == "int_parsing" and isinstance(got, str) and _EXPONENT.fullmatch(got.strip()) and \
                    float(got).is_integer():
                msg += f"; write it as {int(float(got))} (YAML reads {got.strip()} as text)"
            if e["type"] == "string_type" and isinstance(got, (bool, int, float, datetime.date)):
                read = "a date" if isinstance(got, datetime.date) else "true/false" if isinstance(got, bool) else \
                    "a number"
                msg += f"; YAML read it as {read}: quote it to keep it as text"
        lines.append(f"{path}: {msg}")
    return lines


def _blame_overrides(problems: list[str], overrides: list[str]) -> tuple[list[str], int]:
    """Mark each problem in a field that a --set wrote with that --set; returns the lines and how many."""
    keys = {".".join(parse_override(o)[0]): o for o in overrides}
    out, blamed = [], 0
    for line in problems:
        field = line.split(":", 1)[0]
        hit = next((o for k, o in keys.items() if field == k or field.startswith(k + ".")), None)
        blamed += hit is not None
        out.append(f"{line} (from --set {hit})" if hit else line)
    return out, blamed


def validate_config(data: Any, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    """Validate a config dict; `overrides` are the --set texts applied to it, so a problem in a field one of
    them wrote is blamed on that --set rather than on `source`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, diffusion, data, "
                          f"train, logging), not {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        problems, blamed = _blame_overrides(format_validation_error(err) + _combination_problems_beside(err, data),
                                            overrides or [])
        where = source if not blamed else "--set" if blamed == len(problems) else f"{source} with --set"
        raise ConfigError(f"{where}: {len(problems)} problem(s)", problems) from None


def _combination_problems_beside(err: ValidationError, data: dict) -> list[str]:
    """RunConfig's checks of how fields go together run only once every field is valid, so a file with both kinds
    of problem would show the second kind only after the first was fixed. Here they run on the file without its
    invalid fields (their defaults in their place), and a problem is kept only where it reads none of those."""
    import copy

    dropped = set()
    pruned = copy.deepcopy(data)
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"] if p != "function-after"][:2]
        if not loc:
            return []  # a combination problem already: every field was valid
        dropped.add(".".join(loc))
        section = pruned.get(loc[0]) if len(loc) == 2 else None
        if isinstance(section, dict):
            section.pop(loc[1], None)
        else:
            pruned.pop(loc[0], None)
    try:
        cfg = RunConfig.model_validate(pruned, context={"fields_only": True})
    except (ValidationError, TypeError, ValueError):
        return []
    return [f"{path}: {text}" for path, reads, text in cfg.combination_problems()
            if not any(r == d or r.startswith(d + ".") for r in reads for d in dropped)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, except that a key given twice in one mapping is an error: YAML keeps the last,
    so a second `train:` section silently replaced the first one whole."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            # plain keys only: a `<<: *anchor` merge may be overridden (SafeLoader merges it), and complex keys
            # are SafeLoader's to judge
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice at one level; "
                                                            f"keep one (YAML would keep only the last)",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _empty_sections_to_defaults(data: dict, section: type) -> dict:
    """A section of the file left empty (its fields all commented out) is null to YAML: it takes its defaults, at
    any depth (train.early_stopping too). Only where the field is a section, never optional: there null is a
    value."""
    out = {}
    for k, v in data.items():
        field = section.model_fields.get(k) if isinstance(k, str) else None
        sub = field.annotation if field is not None else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            v = {} if v is None else _empty_sections_to_defaults(v, sub) if isinstance(v, dict) else v
        out[k] = v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from the defaults when path is None), apply overrides, validate."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise ConfigError(f"config file {p} not found; pass an existing YAML file (see examples/)")
        if p.is_dir():
            raise ConfigError(f"config path {p} is a directory; pass a YAML file")
        try:
            text = p.read_text(encoding="utf-8")
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not a text file; pass a YAML config") from None
        except RecursionError:
            raise ConfigError(f"{p} is nested too deeply to be a run config") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {p}: {e.strerror}") from None
        if data is None:
            raise ConfigError(f"{p} is empty; start from one of the files in examples/")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, diffusion, data, "
                          f"train, logging), not {type(data).__name__}")
    data = _empty_sections_to_defaults(data, RunConfig)
    base = copy.deepcopy(data) if overrides else None
    data = apply_overrides(data, overrides or [])
    try:
        return validate_config(data, source, overrides)
    except ConfigError as e:
        if not overrides:
            raise
        raise _blame_cross_field(e, base, source, overrides) from None


def _blame_cross_field(err: ConfigError, base: dict, source: str, overrides: list[str]) -> ConfigError:
    """A problem across fields (the guide step past a run that --set shortened, say) names no field a --set wrote,
    so it was reported under `source` alone; one that the config without the --set does not have is theirs."""
    try:
        validate_config(base, source)
        before: set[str] = set()
    except ConfigError as b:
        before = set(b.problems)
    problems = [p if "(from --set " in p or p in before else f"{p} (with --set {', '.join(overrides)})"
                for p in err.problems]
    if problems == err.problems:
        return err
    where = "--set" if all("--set " in p for p in problems) else f"{source} with --set"
    return ConfigError(f"{where}: {len(problems)} problem(s)", problems)


