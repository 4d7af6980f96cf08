"""Weights on disk and into models: safetensors files, timm files, pretrained loading.

``load_pretrained`` is how an MAE encoder (or any ViT checkpoint) becomes the start of a
fine-tune: position tables are resampled to the model's grid, the head is re-initialised
when classes differ, and anything else that does not fit is a ``CheckpointError`` naming
the keys, rather than a silently half-loaded model. Pickles are only ever read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import CheckpointError
from .models.pos_embed import resample_axis, resample_grid
from .models.timm_compat import convert_timm_state_dict, is_timm_state_dict

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
_MAX_SHOWN = 10


# ---- files -----------------------------------------------------------------------------------
def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, Any] | None = None) -> Path:
    """Write ``state_dict`` atomically (temp file + rename). Metadata values are stored as
    strings (non-strings JSON-encoded), since safetensors metadata is ``str -> str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen and t.numel():  # safetensors refuses tensors sharing storage
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        seen.add(storage)
        tensors[k] = t
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def saved_architecture(path: str | Path) -> tuple[str, int] | None:
    """(model config JSON, class count) that vitpipe wrote into a weights file's metadata, or
    None (a file from elsewhere); reads only the header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    if "model" not in meta or "num_classes" not in meta:
        return None
    return meta["model"], int(meta["num_classes"])


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict on CPU, metadata) of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth/.pt/.bin`` (``weights_only=True``).

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad/unsafe pickles
        raise CheckpointError(
            f"cannot read {path} as tensors-only (weights_only=True): {err}. "
            "Convert it to .safetensors or a plain state dict.") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def load_timm_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A local timm ViT weights file, converted to vitpipe keys. Nothing is downloaded."""
    sd = load_state_file(path)
    if not is_timm_state_dict(sd):
        raise CheckpointError(f"{path} does not look like a timm ViT (no 'pos_embed' tensor)")
    return convert_timm_state_dict(sd)


# ---- from a URI ------------------------------------------------------------------------------
def _model_version_source(uri: str, registry_uri: str) -> str:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> the version's download
    URI, looked up in the registry at ``registry_uri``."""
    from mlflow import MlflowClient

    from .tracking import model_version

    try:
        mv = model_version(uri, registry_uri)
        client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
        return client.get_model_version_download_uri(mv.name, mv.version)
    except Exception as err:
        raise CheckpointError(f"cannot resolve {uri} in the model registry at "
                              f"{registry_uri}: {err}") from None


def fetch_weights(uri: str, cache_dir: Path, s3: Any = None, tracking_uri: str | None = None
                  ) -> Path:
    """A local path for ``uri``: a path/``file://`` as is, ``s3://`` (a file or a prefix) or
    ``runs:/``/``models:/``/``mlflow-artifacts:`` downloaded into ``cache_dir``."""
    from . import storage

    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow.artifacts

        cache_dir.mkdir(parents=True, exist_ok=True)
        if uri.startswith("models:/") and tracking_uri:
            # download_artifacts' tracking_uri does not reach models:/ URIs: they resolve
            # through the registry URI (else MLFLOW_REGISTRY_URI / the tracking default)
            uri = _model_version_source(uri, tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(cache_dir), tracking_uri=tracking_uri))
        except Exception as err:
            raise CheckpointError(f"cannot download {uri} from MLflow: {err}") from None
    if storage.is_s3(uri):
        local = cache_dir / Path(uri.rstrip("/")).name
        if local.exists():
            shutil.rmtree(local) if local.is_dir() else local.unlink()
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            if storage.exists(uri, s3=s3):
                storage.download_file(uri, str(local), s3=s3)
            else:
                storage.download_prefix(uri, local, s3=s3)
                if not local.exists():
                    raise CheckpointError(f"{uri} does not exist")
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot download {uri}: {err}") from None
        return local
    p = Path(os.path.expanduser(uri))
    if not p.exists():
        raise CheckpointError(f"{uri} does not exist")
    return p


# ---- into a model ----------------------------------------------------------------------------
def strip_wrapper_prefix(name: str) -> str:
    """``name`` without the DDP (``module.``) / ``torch.compile`` (``_orig_mod.``) prefixes
    that wrappers put in front of parameter names, however they are nested. The one place
    vitpipe strips them: checkpoints, exports and optimizer groups all go through it."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def unwrap_module(model: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers,
    which hide the model's own methods (``no_weight_decay``, ``layer_id``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with every key passed through :func:`strip_wrapper_prefix`."""
    return {strip_wrapper_prefix(k): v for k, v in sd.items()}


def shape_mismatch(saved: dict[str, tuple[int, ...]], own: dict[str, tuple[int, ...]]) -> str:
    """Missing, unexpected and mis-shaped keys of ``saved`` against ``own``; "" when they fit."""
    missing = sorted(k for k in own if k not in saved)
    unexpected = sorted(k for k in saved if k not in own)
    wrong = sorted(f"{k} {saved[k]} vs model {own[k]}"
                   for k in own if k in saved and saved[k] != own[k])
    parts = []
    if missing:
        parts.append(f"missing: {_shown(missing)}")
    if unexpected:
        parts.append(f"unexpected: {_shown(unexpected)}")
    if wrong:
        parts.append(f"shape mismatch: {_shown(wrong)}")
    return "; ".join(parts)


def check_architecture(ckpt_file: str | Path, model: nn.Module, where: str,
                       hint: str = "Point checkpoint.dir/--resume elsewhere or fix the model "
                                   "config.") -> None:
    """Raise :class:`CheckpointError` naming keys if the safetensors file ``ckpt_file`` does
    not fit ``model`` (names compared without wrapper prefixes; only headers are read)."""
    with safe_open(str(ckpt_file), framework="pt") as f:
        saved = {strip_wrapper_prefix(k): tuple(f.get_slice(k).get_shape())
                 for k in f.keys()}  # noqa: SIM118
    own = {strip_wrapper_prefix(k): tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_mismatch(saved, own)
    if problems:
        raise CheckpointError(
            f"checkpoint {where} is from another architecture than the configured model: "
            + problems + ". " + hint
        )


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:_MAX_SHOWN]) + (f" (+{len(keys) - _MAX_SHOWN} more)"
                                           if len(keys) > _MAX_SHOWN else "")


CLASSIFIER_FILE = "model.safetensors"  # what a run exports under weights/


def weights_file(path: str | Path, where: str,
                 names: tuple[str, ...] = (CLASSIFIER_FILE,)) -> Path:
    """The weights file a fetched URI stands for: ``path`` itself if a file, else the first of
    ``names`` in it, else the first of them anywhere below it (a run's ``weights/`` folder, a
    registered model's folder, a checkpoint dir). ``where``, the URI the user gave, is what the
    error names."""
    path = Path(path)
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    if path.is_dir():
        for name in names:
            found = sorted(p for p in path.rglob(Path(name).name) if p.is_file())
            if found:
                return found[0]
        raise CheckpointError(f"{where} ({path}) holds none of {list(names)}")
    raise CheckpointError(f"{where} not found ({path})")


def load_classifier_weights(model: nn.Module, local_path: str | Path, where: str) -> nn.Module:
    """Load a trained classifier's weights into ``model`` exactly (no resampling, no head
    re-init): evaluation and the registered pyfunc both load through here.

    ``local_path`` is a safetensors file or a directory holding ``model.safetensors``;
    ``where`` (the URI the user gave) is what errors name. Wrapper prefixes are stripped; a
    file of another architecture is a :class:`CheckpointError` naming the keys.
    """
    path = weights_file(local_path, f"weights {where}")
    try:
        check_architecture(path, model, where, hint="Check model.name and its overrides "
                           "against the run that produced the weights.")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"weights {where} ({path}) are not readable safetensors: "
                              f"{err}") from None
    state, _ = load_safetensors(path)
    try:
        model.load_state_dict(strip_wrappers(state), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights {where} do not fit {type(model).__name__}: {err}") from None
    return model


def load_pretrained(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load a ViT (or MAE / timm) state dict into ``model`` for fine-tuning or inference.

    Returns a report: ``loaded`` (count), ``resampled``, ``reinitialized`` (head),
    ``mapped`` (``norm`` <-> ``fc_norm`` when pooling differs), ``ignored`` (e.g. MAE decoder).
    Raises ``CheckpointError`` naming missing, unexpected and mis-shaped keys otherwise.
    """
    sd = strip_wrappers(state_dict)
    target = model.state_dict()
    report: dict[str, Any] = {"resampled": [], "reinitialized": [], "mapped": [], "ignored": []}

    # a whole MAE: keep the encoder, ignore the decoder
    if any(k.startswith("encoder.") for k in sd) and not any(k.startswith("encoder.")
                                                              for k in target):
        report["ignored"] = sorted(k for k in sd if not k.startswith("encoder."))
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if is_timm_state_dict(sd):
        sd = convert_timm_state_dict(sd)

    # token pooling uses `norm`, avg pooling `fc_norm`: carry the final norm across
    for a, b in (("norm", "fc_norm"), ("fc_norm", "norm")):
        if f"{b}.weight" in target and f"{b}.weight" not in sd and f"{a}.weight" in sd \
                and f"{a}.weight" not in target:
            for p in ("weight", "bias"):
                sd[f"{b}.{p}"] = sd.pop(f"{a}.{p}")
            report["mapped"].append(f"{a} -> {b}")

    # position tables: resample to the model's grid
    for key, v in list(sd.items()):
        if key not in target or v.shape == target[key].shape:
            continue
        want = target[key].shape
        if key == "pos_embed.weight" and v.ndim == 3 and v.shape[2] == want[2]:
            old, new = v.shape[1], want[1]
            if _square(old) and _square(new):
                g_old, g_new = int(old**0.5), int(new**0.5)
                sd[key] = resample_grid(v, (g_old, g_old), (g_new, g_new))
                report["resampled"].append(f"{key} {g_old}x{g_old} -> {g_new}x{g_new}")
        elif key in ("pos_embed.row", "pos_embed.col") and v.ndim == 3 and v.shape[2] == want[2]:
            sd[key] = resample_axis(v, want[1])
            report["resampled"].append(f"{key} {v.shape[1]} -> {want[1]}")

    # head: keep the model's fresh init when absent or of another class count
    head_keys = [k for k in target if k.startswith("head.")]
    if any(k not in sd or sd[k].shape != target[k].shape for k in head_keys):
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(model.num_classes)
            target = model.state_dict()
        for k in head_keys:
            sd[k] = target[k]
        report["reinitialized"] = head_keys
    extra_head = sorted(k for k in sd if k.startswith("head.") and k not in target)
    for k in extra_head:  # a headless encoder ignores a checkpoint's classifier
        sd.pop(k)
    report["ignored"] += extra_head

    problems = shape_mismatch({k: tuple(v.shape) for k, v in sd.items()},
                              {k: tuple(v.shape) for k, v in target.items()})
    if problems:
        raise CheckpointError(
            "checkpoint does not fit this model (another architecture?) - "
            + problems
            + ". Check model.name and its overrides (embed_dim, depth, pos_embed, stem, "
            "global_pool) against the run that produced the weights."
        )
    model.load_state_dict(sd, strict=True)
    report["loaded"] = len(sd)
    return report


def _square(n: int) -> bool:
    r = int(round(n**0.5))
    return r * r == n
