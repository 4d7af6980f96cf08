"""Fine-tune sources: an encoder file, a weights file or a checkpoint dir, given as a URI.

Accepted: a local path, ``s3://`` (vitpipe.storage) or ``runs:/<run_id>/<path>`` (MLflow).
A full MAE state (``encoder.*`` + decoder) is reduced to its encoder; anything without encoder
weights is refused with the keys it does have. Head re-init and pos-embed resampling are
``vitpipe.weights.load_pretrained``'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..weights import strip_wrappers
from .checkpoint import MODEL_FILE

_CANDIDATES = ("encoder.safetensors", MODEL_FILE)


def encoder_weights(state: dict[str, torch.Tensor], uri: str,
                    model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The classifier-shaped encoder part of ``state``; :class:`CheckpointError` if none."""
    state = strip_wrappers(state)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    own = set(model.state_dict())
    body = {k for k in own if k.startswith(("blocks.", "patch_embed."))}
    if not body & set(state):
        shown = sorted(state)[:5]
        raise CheckpointError(
            f"fine-tune source {uri} has no encoder weights for {type(model).__name__} "
            f"(expected keys like {sorted(body)[:2]}, found {shown or 'nothing'})"
        )
    return state


def load_init(model: torch.nn.Module, uri: str, cache_dir: Path, s3: Any = None,
              tracking_uri: str | None = None) -> Any:
    """Load ``uri``'s encoder into ``model``; returns ``load_pretrained``'s report."""
    from ..weights import fetch_weights, load_pretrained, load_safetensors, weights_file

    local = weights_file(fetch_weights(uri, cache_dir, s3, tracking_uri),
                         f"fine-tune source {uri}", _CANDIDATES)
    try:
        state, _meta = load_safetensors(local)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"fine-tune source {uri} ({local}) is not readable safetensors: "
                              f"{err}") from None
    return load_pretrained(model, encoder_weights(state, uri, model))
