"""The registered model: an MLflow pyfunc that takes raw images and returns top-k classes.

Everything a consumer needs travels inside the model: the weights (safetensors), the resolved
training config (how the network was built, which eval transform it used) and the shard
manifest (class names, channels, normalisation). Preprocessing happens in ``predict``, with the
same ``build_eval_transform`` the evaluator used, so a served model cannot drift from the
trained one. Loading needs only ``vitpipe`` installed (it carries torch, pillow, safetensors).

Input (one image per row): a DataFrame column ``image``, ``{"image": [...]}``, a list, a Series or
a single value, holding encoded bytes, base64 text, file paths, numpy arrays or PIL images
(through ``mlflow.pyfunc.load_model``, arrays must sit in a DataFrame column or the dict: MLflow
turns a bare list of arrays into a 2-D frame first). Output: a DataFrame,
one row per input row, with ``label``, ``top_k_labels``, ``top_k_indices``, ``top_k_probs`` and
``error`` (None, or why that row could not be read; the other rows are still predicted).

Serving (``mlflow models serve -m models:/<name>@champion --env-manager local``), POST
``/invocations`` with ``Content-Type: application/json`` and base64-encoded image files, one of::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ["<base64>"]]}}
    {"dataframe_records": [{"image": "<base64>"}, {"image": "<base64>"}]}
    {"inputs": ["<base64>", "<base64>"], "params": {"top_k": 3}}

The answer is ``{"predictions": [{"label", "top_k_labels", "top_k_indices", "top_k_probs",
"error"}, ...]}`` with HTTP 200 even when some rows failed (their ``error`` says why).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from ..errors import DataError
from .images import ImageInputError, load_image, mode_for_channels

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "top_k_labels", "top_k_indices", "top_k_probs", "error")
ART_WEIGHTS, ART_TRAIN_CONFIG, ART_MANIFEST, ART_META = (
    "weights", "train_config", "manifest", "vitpipe_meta")
_CHUNK = 256  # images per forward pass: bounds memory for large requests


def signature(top_k: int) -> ModelSignature:
    """Input: one unnamed string column (base64 text is what JSON carries; bytes, paths and
    arrays pass too, since MLflow does not coerce object columns to string). Unnamed, so that
    MLflow's schema enforcement accepts a plain list, a Series or a single value as well as a
    DataFrame column ``image``/``{"image": [...]}``; a named column would reject all but the
    last two. Output as in the module docstring."""
    inputs = Schema([ColSpec("string")])
    outputs = Schema([
        ColSpec("string", "label", required=False),
        ColSpec(Array("string"), "top_k_labels"),
        ColSpec(Array("long"), "top_k_indices"),
        ColSpec(Array("double"), "top_k_probs"),
        ColSpec("string", "error", required=False),
    ])
    params = ParamSchema([ParamSpec("top_k", "long", top_k)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def build_network(train_cfg: Any, manifest: Any) -> torch.nn.Module:
    """The classifier exactly as the trainer built it: the config's model with
    ``num_classes`` set to the manifest's class count."""
    from ..models import build_from_config

    return build_from_config(train_cfg.model.model_copy(
        update={"num_classes": len(manifest.classes)}))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights strictly; a mismatch is a CheckpointError naming the keys."""
    from ..weights import load_classifier_weights

    load_classifier_weights(model, path, str(path))


class VitClassifier(mlflow.pyfunc.PythonModel):
    """Raw images in, top-k class names/indices/probabilities out (see module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from ..config import TrainConfig
        from ..data import read_manifest
        from ..data.transforms import build_eval_transform

        arts = context.artifacts
        cfg = TrainConfig.model_validate_json(Path(arts[ART_TRAIN_CONFIG]).read_text())
        manifest = read_manifest(str(arts[ART_MANIFEST]))
        meta = json.loads(Path(arts[ART_META]).read_text())
        self.classes: list[str] = list(manifest.classes)
        self.default_top_k = int(meta.get("top_k", 5))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = build_network(cfg, manifest)
        load_weights(net, arts[ART_WEIGHTS])
        self.model = net.eval().to(self.device)
        self.mode = mode_for_channels(int(net.in_chans))
        img_size = cfg.data.augment.img_size or int(net.img_size)
        self.transform = build_eval_transform(cfg.data.augment, manifest, img_size)
        self.input_shape = (int(net.in_chans), img_size, img_size)
        self.mean, self.std = list(manifest.mean), list(manifest.std)  # for an ONNX export

    # ``pd.DataFrame`` is what MLflow hands over after enforcing the logged signature, and a
    # hint MLflow derives no schema from (list[...] hints would override the signature).
    def predict(self, context: mlflow.pyfunc.PythonModelContext | None,
                model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        values = rows_of(model_input)
        top_k = int((params or {}).get("top_k") or self.default_top_k)
        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        top_k = min(top_k, len(self.classes))
        tensors: list[torch.Tensor] = []
        good: list[int] = []
        errors: list[str | None] = [None] * len(values)
        for i, value in enumerate(values):
            try:
                tensors.append(self._preprocess(value))
                good.append(i)
            except DataError as err:  # ImageInputError and the transform's own DataErrors
                errors[i] = f"row {i}: {err}"
            except Exception as err:  # noqa: BLE001 - one bad row must not fail the batch
                errors[i] = f"row {i}: preprocessing failed: {type(err).__name__}: {err}"
        probs, idx = self._topk(tensors, top_k)
        out: dict[str, list[Any]] = {c: [None] * len(values) for c in OUTPUT_COLUMNS}
        out["error"] = errors
        for j, i in enumerate(good):
            ids = idx[j].tolist()
            out["label"][i] = self.classes[ids[0]]
            out["top_k_labels"][i] = [self.classes[c] for c in ids]
            out["top_k_indices"][i] = ids
            out["top_k_probs"][i] = [float(p) for p in probs[j].tolist()]
        return pd.DataFrame({c: pd.Series(out[c], dtype=object) for c in OUTPUT_COLUMNS})

    def _preprocess(self, value: Any) -> torch.Tensor:
        t = self.transform(load_image(value, self.mode))
        if tuple(t.shape) != self.input_shape:
            raise ImageInputError(f"preprocessed to shape {tuple(t.shape)}, the model takes "
                                  f"{self.input_shape}")
        return t

    @torch.inference_mode()
    def _topk(self, tensors: list[torch.Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
        if not tensors:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        probs, idx = [], []
        for s in range(0, len(tensors), _CHUNK):
            x = torch.stack(tensors[s:s + _CHUNK]).to(self.device)
            p = torch.softmax(self.model(x).float(), dim=-1)
            top = torch.topk(p, k, dim=-1)
            probs.append(top.values.cpu())
            idx.append(top.indices.cpu())
        return torch.cat(probs).numpy(), torch.cat(idx).numpy()


def rows_of(model_input: Any) -> list[Any]:
    """One list item per image, whatever container the caller (or MLflow) handed us."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            return model_input[INPUT_COLUMN].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise DataError(f"input DataFrame needs a column '{INPUT_COLUMN}'; got columns "
                        f"{list(model_input.columns)}")
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise DataError(f"input dict needs the key '{INPUT_COLUMN}'; got {list(model_input)}")
        col = model_input[INPUT_COLUMN]
        return list(col) if isinstance(col, (list, tuple)) else [col]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object:
            return list(model_input.reshape(-1))
        # numeric: (H, W) is one image; (N, H, W), (N, H, W, C), (N, C, H, W) a batch
        return [model_input] if model_input.ndim == 2 else list(model_input)
    if isinstance(model_input, (str, bytes, bytearray, Path)):
        return [model_input]
    if isinstance(model_input, Sequence):
        return list(model_input)
    return [model_input]
