"""Consumers' side: load a registered model by URI and print its top-k for image files.

``vitpipe predict models:/vitpipe-fmnist@champion a.png b.png [--top-k 3] [--json]``. The
tracking URI comes from MLFLOW_TRACKING_URI (else the embedded SQLite default). Images that do
not decode are reported per file; the exit status is 1 when any image failed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from ..config import TrackingConfig
from ..errors import TrackingError
from ..tracking import artifact_errors
from .client import bound_http_retries, check_reachable, is_not_found, resolve_uri
from .pyfunc import INPUT_COLUMN, OUTPUT_COLUMNS

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ver>[^/]+))?$")


def load_model(model_uri: str, tracking: TrackingConfig | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` with a bounded reachability check and errors that name the
    model, the alias/version and the tracking URI."""
    tracking = tracking or TrackingConfig()
    uri = resolve_uri(tracking)
    check_reachable(uri, tracking.connect_timeout)
    bound_http_retries()
    mlflow.set_tracking_uri(uri)
    m = _REGISTRY_URI.match(model_uri)
    if m and m["name"] and not m["name"].startswith("m-"):
        _check_registered(m["name"], m["alias"], m["ver"], uri)
    try:
        with artifact_errors(f"download model {model_uri}"):
            return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        reason = "does not exist" if is_not_found(err) else f"cannot be loaded: {err.message}"
        raise TrackingError(f"model {model_uri} {reason} (tracking URI {uri})") from err
    except OSError as err:
        raise TrackingError(f"model {model_uri} cannot be loaded: {err} "
                            f"(tracking URI {uri})") from err


def _check_registered(name: str, alias: str | None, version: str | None, uri: str) -> None:
    """Say precisely which part of ``models:/name@alias`` is missing."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if is_not_found(err):
            raise TrackingError(f"no registered model named '{name}' (tracking URI {uri})") from err
        raise TrackingError(f"cannot read registered model '{name}': {err.message}") from err
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version and version.isdigit():
            client.get_model_version(name, version)
    except MlflowException as err:
        what = f"alias '@{alias}'" if alias else f"version {version}"
        raise TrackingError(f"registered model '{name}' has no {what} "
                            f"(tracking URI {uri})") from err


def predict_files(model: Any, images: list[str], top_k: int) -> pd.DataFrame:
    """Predict image files; a missing or unreadable file becomes that row's error."""
    data: list[bytes] = []
    errors: dict[int, str] = {}
    for i, path in enumerate(images):
        try:
            data.append(Path(path).read_bytes())
        except OSError as err:
            errors[i] = f"cannot read {path}: {err.strerror or err}"
    good = [i for i in range(len(images)) if i not in errors]
    out = model.predict(pd.DataFrame({INPUT_COLUMN: data}), params={"top_k": top_k}) if data \
        else pd.DataFrame(columns=list(OUTPUT_COLUMNS))
    rows: list[dict[str, Any]] = [{}] * len(images)
    for j, rec in zip(good, out.to_dict(orient="records"), strict=True):
        if rec.get("error"):  # the model numbers rows within its own batch: use file order
            rec["error"] = rec["error"].replace(f"row {good.index(j)}:", f"row {j}:", 1)
        rows[j] = rec
    for i, msg in errors.items():
        rows[i] = {"label": None, "top_k_labels": None, "top_k_indices": None,
                   "top_k_probs": None, "error": msg}
    table = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    table.insert(0, "file", images)
    return table


def predict_cli(model_uri: str, images: list[str], top_k: int = 5, as_json: bool = False) -> int:
    """Print the top-k of each image (table or JSON); 1 if any image failed, else 0."""
    model = load_model(model_uri)
    out = predict_files(model, images, top_k)
    records = [_record(r) for r in out.to_dict(orient="records")]
    if as_json:
        print(json.dumps(records, indent=2))
    else:
        print(_table(records))
    failed = [r for r in records if r["error"]]
    for r in failed:
        print(f"vitpipe predict: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _record(row: dict[str, Any]) -> dict[str, Any]:
    err = row.get("error")
    err = err if isinstance(err, str) and err else None  # pandas may hand back NaN for None
    top = [] if err else [
        {"label": lab, "index": int(i), "prob": float(p)}
        for lab, i, p in zip(row["top_k_labels"], row["top_k_indices"], row["top_k_probs"],
                             strict=True)]
    return {"file": row["file"], "label": None if err else row["label"], "top_k": top,
            "error": err}


def _table(records: list[dict[str, Any]]) -> str:
    lines = [f"{'file':<32} {'rank':>4}  {'class':<20} {'index':>5} {'prob':>8}"]
    for r in records:
        name = r["file"] if len(r["file"]) <= 32 else "..." + r["file"][-29:]
        if r["error"]:
            lines.append(f"{name:<32} ERROR {r['error']}")
            continue
        for rank, t in enumerate(r["top_k"], 1):
            shown = name if rank == 1 else ""
            lines.append(f"{shown:<32} {rank:>4}  {t['label']:<20} {t['index']:>5} "
                         f"{t['prob']:>8.4f}")
    return "\n".join(lines)
