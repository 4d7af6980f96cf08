"""Strict pydantic base, YAML loading, dotted overrides and clear config errors.

Every stage config derives from :class:`StrictModel`, so a misspelt key is an error, not a
silently ignored setting. Errors name the key, where it came from and the closest valid key.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import VitpipeError

M = TypeVar("M", bound="StrictModel")

# PipelineConfig has a `register` stage; pydantic warns that it shadows ABCMeta.register,
# which no config ever calls. Silenced here so every CLI call is not prefixed by it.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

# Keys whose values must never reach logs, MLflow params or error messages.
SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")


class ConfigError(VitpipeError, ValueError):
    """A config problem a user can fix: says what, where, and what to do."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _field_names(model: type[BaseModel], path: tuple[Any, ...],
                 sections_only: bool = False) -> list[str]:
    """Valid keys at ``path`` inside ``model`` (walks nested StrictModel fields)."""
    current: Any = model
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [name for name, f in current.model_fields.items()
                if not sections_only or _model_in(f.annotation) is not None]
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as ``Foo | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# Spellings from other trainers (timm, Hugging Face, MAE) for keys named shortly here: a close
# match to the long form (``learning_rat``) suggests the short key (``lr``).
SYNONYMS: dict[str, str] = {
    "learning_rate": "lr", "base_learning_rate": "blr", "base_lr": "blr",
    "min_learning_rate": "min_lr", "lr_min": "min_lr", "num_epochs": "epochs",
    "n_epochs": "epochs", "warmup": "warmup_epochs", "warmup_steps": "warmup_epochs",
    "max_grad_norm": "clip_grad", "grad_clip": "clip_grad", "clip_grad_norm": "clip_grad",
    "gradient_accumulation_steps": "accum_steps", "grad_accum_steps": "accum_steps",
    "smoothing": "label_smoothing", "train_batch_size": "batch_size", "bs": "batch_size",
    "workers": "num_workers", "patch": "patch_size", "ema": "ema_decay",
    "layer_decay_rate": "layer_decay", "amp": "mixed_precision", "precision": "mixed_precision",
}


def _suggest(key: str, pool: list[str]) -> list[str]:
    """The closest valid key to ``key``: by spelling, else through a known synonym."""
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    if close:
        return close
    by_syn = [s for s in difflib.get_close_matches(key.lower(), list(SYNONYMS), n=3, cutoff=0.75)
              if SYNONYMS[s] in pool]
    return [SYNONYMS[by_syn[0]]] if by_syn else []


def format_validation_error(model: type[BaseModel], err: ValidationError, source: str) -> str:
    """Turn pydantic's error list into lines a user can act on."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            valid = _field_names(model, parent)
            # a mapping under an unknown key was meant for a section: prefer section names
            sections = _field_names(model, parent, sections_only=True)
            pool = sections if isinstance(e.get("input"), dict) and sections else valid
            close = _suggest(key, pool)
            hint = f"; did you mean '{'.'.join([*map(str, parent), close[0]])}'?" if close else ""
            where = ".".join(map(str, parent)) or "top level"
            lines.append(
                f"unknown key '{dotted}' in {source} (section: {where}){hint} "
                f"Valid keys there: {', '.join(valid)}"
            )
        elif e["type"] == "value_error":  # a cross-field check of a whole section
            where = f" (section: {dotted})" if dotted else ""
            text = e["msg"].removeprefix("Value error, ")
            lines.append(f"invalid config in {source}{where}: {text}")
        else:
            value = e.get("input")
            shown = "<hidden>" if any(m in dotted.lower() for m in SECRET_MARKERS) else repr(value)
            lines.append(f"invalid value for '{dotted}' in {source}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate ``data`` as ``model``; raise :class:`ConfigError` with readable messages."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(model, err, source)) from None


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, bools, lists, null) or keep it a string.

    ``1e-3`` is a float here too (YAML 1.1 would read it as a string).
    """
    if _FLOAT.match(text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (copy); keys are checked on validate."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = parse_value(raw)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (presets live in configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Load ``model`` from an optional YAML file plus dotted overrides, validated."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path else "defaults"
    if overrides:
        source += " + overrides"
    return validate(model, data, source)


def flatten(cfg: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flat ``a.b.c -> str(value)`` view for MLflow params; secrets are redacted."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif any(m in key.lower() for m in SECRET_MARKERS):
            out[name] = "<redacted>" if value else ""
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """JSON schema of a config (what Prefect shows as a flow's parameters)."""
    return model.model_json_schema()
