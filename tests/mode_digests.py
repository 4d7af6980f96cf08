"""SHA-256 of the final weights (tensors and metadata) of a tiny fixed-seed run of every
training task.

Behaviour checks for engine refactors: run before and after a change on the same machine, and
the digests must match (``python -m tests.mode_digests``). Not a test: the figures depend on
the torch build and the CPU, so they are compared by hand, not hard-coded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from tests.test_train_support import make_shards, train_cfg
from vitpipe.train import train


def _sha(path: str) -> str:
    """Over the tensors (sorted by name) and the sorted metadata: safetensors writes its
    metadata map in no fixed order, so the file's own bytes differ between equal runs."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        h.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def digests(tmp: Path, tasks: list[str]) -> dict[str, str]:
    shards = make_shards(tmp / "shards", 240, 60)
    common = ["data.batch_size=32", "train.epochs=2", "seed=3", "train.ema_decay=0.9",
              "log_every_n_steps=2"]
    out: dict[str, str] = {}
    mae = train(train_cfg(tmp / "mae", shards, *common, "mode=mae"))
    out["mae"] = _sha(mae["weights"])
    runs = {"supervised": ["mode=supervised", "data.augment.mixup_alpha=0.8"],
            "finetune": ["mode=finetune", f"init={mae['weights']}", "train.layer_decay=0.75"]}
    if "distill" in tasks:
        sup = train(train_cfg(tmp / "teacher", shards, *common, "mode=supervised"))
        runs["distill"] = ["mode=distill", f"distill.teacher={sup['weights']}",
                           "model.depth=1"]
    for name, extra in runs.items():
        res = train(train_cfg(tmp / name, shards, *common, *extra))
        out[name] = _sha(res["weights"])
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(sys.stderr):
        found = digests(Path(d), sys.argv[1:])
    print(json.dumps(found, indent=2))
