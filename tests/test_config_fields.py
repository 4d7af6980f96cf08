"""Every config field is read by some code: no setting a user can change to no effect.

The walk covers every pydantic model reachable from ``vitpipe.config.STAGES`` (nested sections,
recursively). A field counts as read when its name is an attribute access (``cfg.name``) or a
string key (``d["name"]``, ``.get("name")``, ``getattr(cfg, "name")``) in the code of
``vitpipe/`` or ``flows/`` outside ``vitpipe/config/`` (parsed with ``ast``, so comments and
docstrings do not count). ``ModelConfig`` fields are read another way: ``build_from_config``
and ``build_model`` pass them all as keyword arguments to ``VisionTransformer`` (through
``ModelConfig.resolved()``), which is checked by calling them, not by listing the fields.
A field consumed only in some other indirect way goes into ``EXCEPTIONS`` with the reason.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vitpipe.config import STAGES, ModelConfig

ROOT = Path(__file__).parents[1]

# "Model.field" -> why it is read although no code outside vitpipe/config/ names it.
# Every entry must name an existing field that the scan does not already find read.
EXCEPTIONS: dict[str, str] = {}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes in an annotation (``Foo``, ``Foo | None``, ``dict[str, Foo]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _models_in(arg)]


def config_models() -> dict[type[BaseModel], str]:
    """Every config model reachable from STAGES -> the first dotted path it was met at."""
    found: dict[type[BaseModel], str] = {}

    def walk(model: type[BaseModel], where: str) -> None:
        if model in found:
            return
        found[model] = where
        for name, field in model.model_fields.items():
            for sub in _models_in(field.annotation):
                walk(sub, f"{where}.{name}")

    for stage, model in STAGES.items():
        walk(model, stage)
    return found


def names_read() -> set[str]:
    """Attribute names and identifier-like string constants in vitpipe/ (not config/), flows/."""
    files = [p for d in ("vitpipe", "flows") for p in sorted((ROOT / d).rglob("*.py"))
             if (ROOT / "vitpipe" / "config") not in p.parents]
    assert len(files) > 20, files
    out: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                out.add(node.attr)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value.isidentifier()):
                out.add(node.value)
    return out


def model_kwargs_consumed(monkeypatch) -> set[str]:
    """Keyword arguments the model builders pass to ``VisionTransformer`` that its
    ``__init__`` uses (names in its body, not just its signature)."""
    from vitpipe.models import registry
    from vitpipe.models.vit import VisionTransformer

    passed: set[str] = set()

    class Capture:
        def __init__(self, **kw: Any) -> None:
            passed.update(kw)

    monkeypatch.setattr(registry, "VisionTransformer", Capture)
    registry.build_from_config(ModelConfig())  # supervised / fine-tune / evaluate / pyfunc
    registry.build_model(ModelConfig().name)  # the MAE encoder (models.mae.build_mae)
    init = ast.parse(textwrap.dedent(inspect.getsource(VisionTransformer.__init__))).body[0]
    assert isinstance(init, ast.FunctionDef)
    used = {n.id for stmt in init.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    return passed & used & set(inspect.signature(VisionTransformer.__init__).parameters)


def test_the_walk_reaches_every_nested_section() -> None:
    names = {m.__name__ for m in config_models()}
    assert {"TrainConfig", "OptimConfig", "CheckpointConfig", "DistConfig", "MAEConfig",
            "ModelConfig", "DataConfig", "AugmentConfig", "S3Config", "ShardConfig",
            "SourceConfig", "TrackingConfig", "EvaluateConfig", "RegisterConfig",
            "PipelineConfig", "LaunchConfig", "OrchestrationConfig"} <= names


def test_model_fields_reach_the_vision_transformer(monkeypatch) -> None:
    """Every ModelConfig field but ``name`` (the variant, read directly) is a
    VisionTransformer argument the builders pass and the model uses."""
    consumed = model_kwargs_consumed(monkeypatch)
    missing = sorted(set(ModelConfig.model_fields) - {"name"} - consumed)
    assert not missing, ("ModelConfig fields not passed to or not used by "
                         f"VisionTransformer.__init__: {missing}")


def test_every_config_field_is_read(monkeypatch) -> None:
    read = names_read()
    via_kwargs = model_kwargs_consumed(monkeypatch)
    unread = []
    for model, where in config_models().items():
        for name in model.model_fields:
            key = f"{model.__name__}.{name}"
            if name in read or key in EXCEPTIONS:
                continue
            if model is ModelConfig and name in via_kwargs:
                continue
            unread.append(f"  {key} (e.g. {where}.{name})")
    assert not unread, (
        "config fields that no code in vitpipe/ (outside vitpipe/config/) or flows/ reads:\n"
        + "\n".join(unread)
        + "\nRemove each dead field (and its preset keys), or add it to EXCEPTIONS in "
          "tests/test_config_fields.py with how it is consumed.")


def test_exceptions_name_existing_fields_that_need_them() -> None:
    fields = {f"{m.__name__}.{n}" for m in config_models() for n in m.model_fields}
    stale = sorted(set(EXCEPTIONS) - fields)
    assert not stale, f"EXCEPTIONS names fields that no longer exist: {stale}"
    read = names_read()
    needless = sorted(k for k in EXCEPTIONS if k.split(".", 1)[1] in read)
    assert not needless, f"EXCEPTIONS lists fields code now reads directly: {needless}"
    assert all(isinstance(v, str) and v.strip() for v in EXCEPTIONS.values())
