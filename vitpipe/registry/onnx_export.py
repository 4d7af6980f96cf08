"""ONNX export of a registered model, for consumers without Python/torch (onnxruntime, C++,
browsers): the network only, with a dynamic batch axis; preprocessing (decode, the channel
mode, resize + centre crop, scale to [0, 1], normalise) stays the consumer's and is written
into the ONNX model's metadata (``vitpipe.*`` props), so the file says how to feed it.

The graph comes from ``torch.onnx.export`` (the dynamo exporter, PyTorch's supported path);
:func:`check_against_pyfunc` runs onnxruntime beside the pyfunc's own network on the same
preprocessed images and fails when logits differ by more than ``atol``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrackingConfig
from ..errors import VitpipeError

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


def _classifier(model_uri: str, tracking: TrackingConfig | None) -> Any:
    from .predict import load_model

    return load_model(model_uri, tracking).unwrap_python_model()  # a VitClassifier




def write_onnx(net: torch.nn.Module, input_shape: tuple[int, int, int], meta: dict[str, str],
               out: str | Path, opset: int = 18) -> Path:
    """``net`` as ONNX at ``out`` (input ``pixels`` (batch, C, H, W) float32, output
    ``logits``; dynamic batch), with ``meta`` as metadata props; checked by onnx's checker."""
    try:
        import onnx
    except ImportError as err:
        raise VitpipeError("ONNX export needs onnx, onnxscript and onnxruntime "
                           "(pip install onnx onnxscript onnxruntime)") from err
    net = net.float().eval().cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(net, (torch.zeros(2, *input_shape),), dynamo=True,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                opset_version=opset, dynamic_shapes=({0: batch},),
                                verbose=False)
    program.save(str(out))
    model = onnx.load(str(out))
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(model, str(out))
    onnx.checker.check_model(str(out))
    return out


def onnx_metadata(model_uri: str, classes: list[str], input_shape: tuple[int, int, int],
                  mode: str, transform: Any, mean: list[float], std: list[float]
                  ) -> dict[str, str]:
    """What a consumer needs to feed the graph (the pyfunc's preprocessing, spelled out)."""
    c, h, w = input_shape
    text = (f"decode the image; convert to PIL mode {mode}; vitpipe's eval transform "
            f"{transform!r} (resize + centre crop to {h}x{w}, float in [0, 1], normalise with "
            f"mean {mean} and std {std}); stack as float32 NCHW (N, {c}, {h}, {w})")
    return {"vitpipe.model_uri": model_uri, "vitpipe.classes": json.dumps(list(classes)),
            "vitpipe.input_shape": json.dumps(list(input_shape)),
            "vitpipe.mean": json.dumps(list(mean)), "vitpipe.std": json.dumps(list(std)),
            "vitpipe.channel_mode": mode, "vitpipe.preprocess": text}


def export_onnx(model_uri: str, out: str | Path, tracking: TrackingConfig | None = None,
                opset: int = 18) -> dict[str, Any]:
    """Write ``model_uri``'s network as ONNX to ``out``; returns what was written."""
    clf = _classifier(model_uri, tracking)
    meta = onnx_metadata(model_uri, clf.classes, clf.input_shape, clf.mode, clf.transform,
                         clf.mean, clf.std)
    path = write_onnx(clf.model, clf.input_shape, meta, out, opset)
    return {"path": str(path), "model_uri": model_uri, "input": INPUT_NAME,
            "output": OUTPUT_NAME, "input_shape": ["batch", *clf.input_shape], "opset": opset,
            "classes": clf.classes}


def check_against_pyfunc(model_uri: str, onnx_path: str | Path, images: list[Any],
                         tracking: TrackingConfig | None = None, atol: float = 1e-4) -> float:
    """Max |logit difference| between onnxruntime and the pyfunc's network on ``images``
    (anything the pyfunc takes), preprocessed by the pyfunc; raises above ``atol``."""
    import onnxruntime as ort

    clf = _classifier(model_uri, tracking)
    x = torch.stack([clf._preprocess(v) for v in images]).float()
    with torch.inference_mode():
        ref = clf.model.float().cpu()(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.max(np.abs(got - ref)))
    if diff > atol:
        raise VitpipeError(f"ONNX logits differ from the pyfunc's by {diff:.3g} (> {atol})")
    return diff
