"""Serving speed: the registered pyfunc (raw PNG bytes in, top-k out) vs a bare torch forward on
already-decoded tensors, same batch, same model; and requests/s through ``mlflow models serve``.

The model is registered for real (embedded SQLite store, a small real shard manifest) and loaded
back with ``mlflow.pyfunc.load_model("models:/...@champion")``, so the pyfunc figure includes
MLflow's schema enforcement, PNG decode, the eval transform, forward, softmax and top-k.
Pyfunc and bare forward run in interleaved repeats and each keeps its fastest repeat (on a
shared machine, medians mostly measure the neighbours).

    nice python bench/serve_speed.py                # vit_tiny_patch4_28, batch 64
    nice python bench/serve_speed.py --quick        # smoke run
    nice python bench/serve_speed.py --clock cpu --threads 1   # on a shared machine

The last line printed is one JSON object: pyfunc_img_s, bare_img_s, pyfunc_over_bare,
serve_req_s (one image per request, keep-alive), serve_batch_img_s (batch per request),
onnx_img_s / onnx_over_pyfunc / onnx_over_bare (the ``vitpipe export-onnx`` graph in
onnxruntime on the decoded tensors, CPU), ...
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitpipe.config import (
    ModelConfig,
    RegisterConfig,
    ShardConfig,
    SourceConfig,
    TrackingConfig,
    TrainConfig,
)
from vitpipe.data import read_manifest, shard
from vitpipe.models import build_from_config
from vitpipe.registry import register
from vitpipe.registry.predict import load_model
from vitpipe.stack.mlflow_server import start_model_server
from vitpipe.weights import save_safetensors

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fmnist_test(n: int) -> np.ndarray:
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n].copy()


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def registered_model(work: Path, model_cfg: ModelConfig) -> tuple[str, torch.nn.Module, object]:
    """Shard a small real subset, log a run as the trainer would, register it; return the
    tracking URI, the torch model and the manifest."""
    from mlflow import MlflowClient

    manifest_uri = shard(ShardConfig(source=SourceConfig(path=str(FMNIST), limit_per_split=64),
                                     output=str(work / "shards"), workers=1))
    manifest = read_manifest(manifest_uri)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=str(work / "mlartifacts"))
    rid = client.create_run(exp).info.run_id
    torch.manual_seed(0)
    model = build_from_config(model_cfg).eval()
    cfg_path = work / "train_config.json"
    cfg_path.write_text(TrainConfig(model=model_cfg).model_dump_json())
    save_safetensors(model.state_dict(), work / "model.safetensors")
    client.log_artifact(rid, str(cfg_path), "config")
    client.log_artifact(rid, manifest_uri.removeprefix("file://"), "manifest")
    client.log_artifact(rid, str(work / "model.safetensors"), "weights")
    client.log_metric(rid, "test_top1", 0.5)
    client.set_tag(rid, "vitpipe.eval_digest", manifest.splits["test"].digest)
    client.set_terminated(rid)
    register(RegisterConfig(model_name="bench", run_id=rid, tracking=TrackingConfig(uri=uri)))
    return uri, model, manifest


def fastest(fns: dict[str, Callable[[], None]], repeats: int, iters: int,
            clock: Callable[[], float]) -> dict[str, float]:
    """Seconds per call of each fn: interleaved repeats, fastest repeat kept."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            for _ in range(iters):
                fn()
            best[k] = min(best[k], (clock() - t0) / iters)
    return best


def serve_rates(uri: str, work: Path, pngs: list[bytes], seconds: float) -> dict[str, float]:
    """Requests/s with one image per request, and images/s with the whole batch per request."""
    b64 = [base64.b64encode(p).decode() for p in pngs]
    one = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64[0]]]}})
    batch = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}})
    with start_model_server("models:/bench@champion", uri, work) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)

        def post(body: str) -> None:
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"serve answered {resp.status}: {data[:300]!r}")

        for _ in range(3):
            post(one)
            post(batch)
        out = {}
        for key, body, per in (("serve_req_s", one, 1), ("serve_batch_img_s", batch, len(b64))):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                post(body)
                n += 1
            out[key] = n * per / (time.perf_counter() - t0)
        conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch4_28")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--serve-seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, steadier on a machine shared with other jobs")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.quick:
        args.repeats, args.iters, args.serve_seconds = 2, 2, 2.0
    model_cfg = ModelConfig(name=args.model)
    with tempfile.TemporaryDirectory(prefix="vitpipe-serve-bench-") as tmp:
        work = Path(tmp)
        uri, model, manifest = registered_model(work, model_cfg)
        pyfunc = load_model("models:/bench@champion", TrackingConfig(uri=uri))
        images = fmnist_test(args.batch)
        pngs = [png(i) for i in images]
        mean = torch.tensor(manifest.mean).view(-1, 1, 1)
        std = torch.tensor(manifest.std).view(-1, 1, 1)
        x = ((torch.from_numpy(images).float().div(255).unsqueeze(1)) - mean) / std

        def bare() -> None:
            with torch.inference_mode():
                model(x)

        def via_pyfunc() -> None:
            pyfunc.predict(pngs, params={"top_k": 5})

        # same answers, or the comparison is meaningless
        got = pyfunc.predict(pngs, params={"top_k": 1})["top_k_indices"].tolist()
        with torch.inference_mode():
            want = model(x).argmax(-1)[:, None].tolist()
        assert got == want, "pyfunc and bare forward disagree"
        # the ONNX export (vitpipe export-onnx) in onnxruntime, on the same decoded tensors,
        # with as many intra-op threads as torch
        import onnxruntime as ort

        from vitpipe.registry.onnx_export import export_onnx

        export_onnx("models:/bench@champion", work / "model.onnx", TrackingConfig(uri=uri))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(work / "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
        xn = x.numpy()

        def via_onnx() -> None:
            sess.run(["logits"], {"pixels": xn})

        assert (sess.run(["logits"], {"pixels": xn})[0].argmax(-1)[:, None].tolist() == want), \
            "onnxruntime and bare forward disagree"
        bare(), via_pyfunc(), via_onnx()  # warm-up
        t = fastest({"bare": bare, "pyfunc": via_pyfunc, "onnx": via_onnx}, args.repeats,
                    args.iters, clock)
        result = {
            "model": args.model, "batch": args.batch, "torch_threads": torch.get_num_threads(),
            "clock": args.clock,
            "pyfunc_img_s": round(args.batch / t["pyfunc"], 1),
            "bare_img_s": round(args.batch / t["bare"], 1),
            "pyfunc_over_bare": round(t["bare"] / t["pyfunc"], 3),
            "onnx_img_s": round(args.batch / t["onnx"], 1),
            "onnx_over_pyfunc": round(t["pyfunc"] / t["onnx"], 3),
            "onnx_over_bare": round(t["bare"] / t["onnx"], 3),
        }
        print(f"pyfunc {result['pyfunc_img_s']} img/s, bare forward {result['bare_img_s']} "
              f"img/s (batch {args.batch})", flush=True)
        serve = serve_rates(uri, work, pngs, args.serve_seconds)
        result.update({k: round(v, 1) for k, v in serve.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
