"""``evaluate(cfg)``: score weights on a split, write plots + metrics.json, log to MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, EvaluateConfig
from ..errors import CheckpointError
from ..tracking import Tracker, split_digest

CURVE_KEYS = ("loss", "lr", "grad_norm", "img_s", "epoch_loss", "val_top1", "val_top1_ema")


def resolve_weights(cfg: EvaluateConfig) -> str:
    """``cfg.weights`` or, with only a run id, that run's ``weights/model.safetensors``."""
    if cfg.weights:
        return cfg.weights
    if cfg.run_id:
        name = "model_ema" if cfg.use_ema else "model"
        return f"runs:/{cfg.run_id}/weights/{name}.safetensors"
    raise ConfigError("evaluate needs 'weights' (a safetensors path/URI) or 'run_id'")


def load_classifier(cfg: EvaluateConfig, num_classes: int, uri: str, cache: Path,
                    tracking_uri: str | None) -> torch.nn.Module:
    """Build the model ``uri``'s weights say they are (vitpipe writes the architecture into
    their metadata: a champion re-evaluated under a newer config stays itself), else
    ``cfg.model``, with the manifest's class count; load ``uri`` strictly."""
    from ..config import ModelConfig
    from ..models import build_from_config
    from ..weights import fetch_weights, load_classifier_weights, saved_architecture, weights_file

    local = weights_file(fetch_weights(uri, cache, cfg.data.s3, tracking_uri), f"weights {uri}")
    saved = saved_architecture(local)
    arch = ModelConfig.model_validate_json(saved[0]) if saved else cfg.model
    model = build_from_config(arch.model_copy(update={"num_classes": num_classes}))
    load_classifier_weights(model, local, uri)
    return model.eval()


@torch.no_grad()
def gather_logits(acc, model: torch.nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' logits and labels (on CPU), padding (label < 0) removed."""
    logits, labels = [], []
    for x, y in loader:
        x, y = x.to(acc.device), y.to(acc.device)
        with acc.autocast():
            out = model(x).float()
        out, y = acc.gather_for_metrics((out, y))
        keep = y >= 0
        logits.append(out[keep].cpu())
        labels.append(y[keep].cpu())
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def training_history(tracker: Tracker, run_id: str | None) -> dict[str, list[tuple[int, float]]]:
    """The training run's metric history for the curves plot (empty without a run)."""
    if not run_id:
        return {}
    return {k: h for k in CURVE_KEYS if (h := tracker.metric_history(k, run_id))}


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Metrics ``<split>_top1/_top5/_ece``, per-class accuracy, ``artifacts`` (local paths)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    acc = Accelerator(cpu=not torch.cuda.is_available())
    try:
        return _evaluate(cfg, acc)
    finally:
        if acc.num_processes > 1:
            acc.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _evaluate(cfg: EvaluateConfig, acc) -> dict[str, Any]:
    from .. import plots
    from ..data import make_loader, read_manifest
    from ..data.transforms import build_eval_transform
    from .metrics import classification_metrics

    tracker = Tracker(cfg.tracking, active=acc.is_main_process)
    tracker.check()
    if acc.is_main_process and cfg.run_id:
        tracker.attach(cfg.run_id)
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set (the shard stage's manifest.json URI)")
    manifest = read_manifest(cfg.data.manifest, cfg.data.s3)
    if cfg.split not in manifest.splits:
        raise ConfigError(f"split '{cfg.split}' not in manifest {cfg.data.manifest} "
                          f"(splits: {sorted(manifest.splits)})")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = [str(c) for c in manifest.classes]
    model = load_classifier(cfg, len(classes), resolve_weights(cfg), out / ".weights_cache",
                            tracker.uri).to(acc.device)
    img_size = cfg.data.augment.img_size or model.img_size
    tf = build_eval_transform(cfg.data.augment, manifest, img_size)
    loader = make_loader(cfg.data.manifest, cfg.split, cfg.data.eval_batch_size,
                         acc.process_index, acc.num_processes, data=cfg.data, train=False,
                         transform=tf, pin_memory=acc.device.type == "cuda")
    logits, labels = gather_logits(acc, model, loader)
    skipped = _skipped(acc, loader)  # before the loader is iterated again (attention images)
    expected = int(manifest.splits[cfg.split].count)
    if labels.numel() + int(skipped["count"]) != expected:
        raise CheckpointError(f"evaluated {labels.numel()} samples of '{cfg.split}' (and "
                              f"skipped {int(skipped['count'])} bad ones) but the manifest lists "
                              f"{expected}; the loader dropped or duplicated data")
    scalars, details = classification_metrics(logits, labels, len(classes), cfg.split, classes,
                                              cfg.ece_bins)
    scalars[f"skipped_samples_{cfg.split}"] = float(skipped["count"])
    details["skipped_samples"] = skipped["keys"]
    artifacts: dict[str, str] = {}
    if acc.is_main_process:
        s = cfg.split
        artifacts["confusion_matrix"] = str(plots.plot_confusion(
            details["confusion_matrix"], classes, out / f"{s}_confusion_matrix.png",
            f"confusion matrix ({s})"))
        artifacts["reliability"] = str(plots.plot_reliability(
            details["calibration"], out / f"{s}_reliability.png", f"reliability ({s})"))
        history = training_history(tracker, cfg.run_id)
        if history:
            artifacts["training_curves"] = str(plots.plot_training_curves(
                history, out / "training_curves.png"))
        if cfg.num_attention_images:
            images, names = _first_images(loader, cfg.num_attention_images, classes)
            artifacts["attention"] = str(plots.plot_attention(
                model.cpu(), images, out / f"{s}_attention_rollout.png", names,
                manifest.mean, manifest.std))
        payload = {"split": s, "metrics": scalars, **details,
                   "weights": resolve_weights(cfg), "dataset_digest": split_digest(manifest, s)}
        metrics_path = out / "metrics.json"
        metrics_path.write_text(json.dumps(_no_nan(payload), indent=2, default=str))
        artifacts["metrics_json"] = str(metrics_path)
        if not cfg.run_id:
            tracker.start(run_name=f"evaluate/{s}",
                          tags={**cfg.tracking.tags, "vitpipe.mode": "evaluate"})
        else:
            tracker.run_id = cfg.run_id
        tracker.log_metrics({k: v for k, v in scalars.items() if v == v}, step=0)
        tracker.set_tags({"vitpipe.eval_digest": split_digest(manifest, s),
                          "vitpipe.eval_split": s})
        tracker.log_dataset(manifest, cfg.data.manifest, s, "evaluation")
        for path in artifacts.values():
            tracker.log_artifact(path, "eval" if path.endswith(".json") else "plots")
    acc.wait_for_everyone()
    return {**scalars, "per_class_accuracy": details["per_class_accuracy"],
            "confusion_matrix": details["confusion_matrix"], "artifacts": artifacts,
            "run_id": cfg.run_id or tracker.run_id, "split": cfg.split}


def _skipped(acc, loader: Any) -> dict[str, Any]:
    """Bad samples skipped, over all ranks: their count, and (shard, key) of each damaged one."""
    keys = [{"shard": sh, "key": k} for sh, k in loader.bad_keys]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        keys = gather_object([keys])
        keys = [k for part in keys for k in part]
    n = torch.tensor([float(loader.bad_samples)], device=acc.device)
    return {"count": int(acc.reduce(n, reduction="sum")[0]), "keys": keys}


def _first_images(loader: Any, n: int, classes: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Up to ``n`` real (label >= 0) images from the start of this rank's loader."""
    xs, names = [], []
    for x, y in loader:
        keep = y >= 0
        xs.append(x[keep])
        names += [classes[int(i)] for i in y[keep]]
        if sum(len(t) for t in xs) >= n:
            break
    return torch.cat(xs)[:n], names[:n]


def _no_nan(v: Any) -> Any:
    """NaN (an empty class or bin) -> null, so metrics.json is strict JSON."""
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_no_nan(x) for x in v]
    return None if isinstance(v, float) and v != v else v
