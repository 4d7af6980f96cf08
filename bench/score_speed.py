"""Batch scoring speed: the ``score`` flow (PNG files in, Parquet out) vs a bare forward of
the same model over the same images already decoded and normalised, same batch.

The model is registered for real (``bench/serve_speed.py``'s setup); the flow runs in
Prefect's ephemeral mode in this process, and its own figure (``img_per_s``: listing, decode
in worker processes, the eval transform, forward, softmax, top-k and the Parquet writes) is
compared with the bare forward's, timed right after it.

    nice python bench/score_speed.py            # 10,000 Fashion-MNIST test images
    nice python bench/score_speed.py --quick    # 512 images

The last line printed is JSON: flow_img_s, bare_img_s, flow_over_bare (target >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_speed import fmnist_test, png, registered_model  # noqa: E402

from vitpipe.config import ModelConfig, ScoreConfig, TrackingConfig  # noqa: E402
from vitpipe.score import decode_workers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch4_28")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None,
                    help="decode processes (default: the score config's own choice)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images = 512
    with tempfile.TemporaryDirectory(prefix="vitpipe-score-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        uri, model, manifest = registered_model(work, ModelConfig(name=args.model))
        images = fmnist_test(args.images)
        folder = work / "in"
        folder.mkdir()
        for i, img in enumerate(images):
            (folder / f"{i:05d}.png").write_bytes(png(img))
        from flows.score import score

        cfg = ScoreConfig(model="models:/bench@champion", input=str(folder),
                          output=str(work / "p.parquet"), batch_size=args.batch,
                          num_workers=args.workers, progress=False,
                          tracking=TrackingConfig(uri=uri))
        t0 = time.perf_counter()
        res = score(cfg)
        flow_wall = time.perf_counter() - t0
        mean = torch.tensor(manifest.mean).view(-1, 1, 1)
        std = torch.tensor(manifest.std).view(-1, 1, 1)
        x = ((torch.from_numpy(images).float().div(255).unsqueeze(1)) - mean) / std
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(x), args.batch):
                torch.softmax(model(x[s:s + args.batch]), -1)
        bare = len(x) / (time.perf_counter() - t0)
    out = {"model": args.model, "images": args.images, "batch": args.batch,
           "workers": decode_workers(args.workers, torch.device("cpu"), 1 << 30),
           "torch_threads": torch.get_num_threads(),
           "flow_img_s": res["img_per_s"], "flow_wall_s": round(flow_wall, 1),
           "bare_img_s": round(bare, 1), "flow_over_bare": round(res["img_per_s"] / bare, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
