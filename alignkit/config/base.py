"""What every config schema shares: YAML reading with dotted ``key=value`` overrides, the strict
base model, and error messages that name the field and suggest a fix."""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-8``/``5E+3`` as floats (PyYAML's YAML 1.1 reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 — a SafeLoader subclass


class ConfigError(ValueError):
    """Every problem of a config file, with field paths and fixes."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _suggest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _model_fields_at(path: tuple, root: type[BaseModel]) -> set[str]:
    """Field names of the (nested) model at ``path`` below ``root``; dict[str, Model] levels skip the key."""
    model: Any = root
    parts = list(path)
    while parts:
        part = parts.pop(0)
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return set()
        ann = fields[part].annotation
        cands = getattr(ann, "__args__", (ann,))
        if getattr(ann, "__origin__", None) is dict:
            cands, parts = cands[1:], parts[1:]  # dict value type; drop the user's key
        for cand in cands:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return set()
    return set(getattr(model, "model_fields", {}))


def _format_errors(err: ValidationError, source: str, prefix: tuple = (),
                   root: type[BaseModel] | None = None) -> list[str]:
    """One line per error: file, field path, reason; an unknown key gets the closest field of
    the model at its path below ``root`` as a suggestion."""
    lines = []
    for e in err.errors():
        loc = (*prefix, *e["loc"])
        path = ".".join(str(x) for x in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            hint = _suggest(key, _model_fields_at(loc[:-1], root)) if root is not None else ""
            lines.append(f"{source}: field '{path}': unknown key{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: field '{path}': {e['msg']}{got_s}")
    return lines


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value (e.g. train.learning_rate=1e-5)")
        k, v = o.split("=", 1)
        out.append((k.strip(), yaml_load(v) if v != "" else None))
    return out


def read_raw_config(path: str | Path | dict, overrides: list[str] | None = None) -> tuple[dict, str]:
    """A config file (or dict) as a mapping with dotted overrides applied, and its name for
    error messages; shared by recipe configs and attack configs (``alignkit.config.attack``)."""
    if isinstance(path, dict):
        raw, source = copy.deepcopy(path), "<dict>"  # overrides must not mutate the caller's dict
    else:
        source = str(path)
        try:
            raw = yaml_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for k, v in parse_overrides(overrides or []):
        set_dotted(raw, k, v)
    return raw, source
