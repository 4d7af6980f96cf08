"""What a training run leaves behind: MLflow inputs (params, config, manifest, datasets) and
the exported weights (+ MAE reconstructions). Main process writes; every rank calls."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..config.base import SECRET_MARKERS
from ..errors import VitpipeError
from ..tracking import Tracker
from ..weights import strip_wrapper_prefix
from .ema import ModelEma


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("<redacted>" if any(m in k.lower() for m in SECRET_MARKERS) and v else
                    _redact(v)) for k, v in data.items()}
    return data


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    if hasattr(manifest, "model_dump"):
        return manifest.model_dump(mode="json")
    if hasattr(manifest, "to_dict"):
        return manifest.to_dict()
    try:
        return asdict(manifest)
    except TypeError:
        return dict(vars(manifest))


def open_run(tracker: Tracker, run_id: str | None, tags: dict[str, str],
              cfg: TrainConfig) -> str | None:
    tags = {**cfg.tracking.tags, **tags}
    if run_id:
        try:
            return tracker.start(run_id=run_id, tags=tags)
        except VitpipeError:
            pass  # the checkpoint's run is in another store: start a fresh one
    return tracker.start(run_name=cfg.tracking.run_name or cfg.mode, tags=tags)


def log_run_inputs(tracker: Tracker, cfg: TrainConfig, manifest: Any, plan: Any,
                   validates: bool) -> None:
    from ..config import flatten

    params = flatten(cfg) | {f"plan.{k}": str(v) for k, v in asdict(plan).items()}
    params["plan.effective_batch"] = str(plan.effective_batch)
    tracker.log_params(params)
    tracker.log_dict(_redact(cfg.model_dump(mode="json")), "config/train_config.json")
    tracker.log_dict(_manifest_dict(manifest), "manifest/manifest.json")
    tracker.log_dataset(manifest, cfg.data.manifest, "train", "training")
    if "val" in manifest.splits and validates:
        tracker.log_dataset(manifest, cfg.data.manifest, "val", "validation")


def _meta(cfg: TrainConfig, manifest: Any, source: str) -> dict[str, str]:
    """Safetensors metadata: enough to rebuild the network without the run (e.g. a teacher)."""
    return {"mode": cfg.mode, "model": cfg.model.model_dump_json(),
            "num_classes": str(len(manifest.classes)),
            "classes": json.dumps(list(manifest.classes)), "source": source}


def export_classifier(cfg: TrainConfig, acc, model, ema: ModelEma | None, out_dir: Path,
                      tracker: Tracker, manifest: Any) -> Path:
    """``model.safetensors`` (EMA weights with ``train.use_ema_for_export``) and, with EMA,
    ``model_ema.safetensors``; main process writes and logs them under ``weights/``."""
    from ..weights import save_safetensors

    raw = acc.unwrap_model(model)
    use_ema = ema is not None and cfg.train.use_ema_for_export
    path = out_dir / "model.safetensors"
    if acc.is_main_process:
        meta = _meta(cfg, manifest, "ema" if use_ema else "model")
        save_safetensors(_cpu((ema.module if use_ema else raw).state_dict()), path, metadata=meta)
        tracker.log_artifact(path, "weights")
        if ema is not None:
            ema_path = out_dir / "model_ema.safetensors"
            save_safetensors(_cpu(ema.module.state_dict()), ema_path,
                             metadata=meta | {"source": "ema"})
            tracker.log_artifact(ema_path, "weights")
    acc.wait_for_everyone()
    return path


def export_encoder(cfg: TrainConfig, acc, model, ema: ModelEma | None, out_dir: Path,
                   tracker: Tracker, manifest: Any) -> Path:
    """An MAE run's ``encoder.safetensors`` (what fine-tuning starts from) and its
    reconstruction figure under ``plots/``."""
    from ..weights import save_safetensors

    use_ema = ema is not None and cfg.train.use_ema_for_export
    src = ema.module if use_ema else acc.unwrap_model(model)
    path = out_dir / "encoder.safetensors"
    if acc.is_main_process:
        save_safetensors(_cpu(src.encoder_state_dict()), path,
                         metadata=_meta(cfg, manifest, "ema" if use_ema else "model"))
        tracker.log_artifact(path, "weights")
        _log_reconstructions(src, cfg, acc, out_dir, tracker, manifest)
    acc.wait_for_everyone()
    return path


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {strip_wrapper_prefix(k): v.detach().float().cpu().contiguous() if v.is_floating_point()
            else v.detach().cpu().contiguous() for k, v in state.items()}


def _log_reconstructions(mae, cfg: TrainConfig, acc, out_dir: Path, tracker: Tracker,
                         manifest: Any) -> None:
    """MAE runs end with a masked / reconstruction / original figure (logged under plots/)."""
    from ..data import make_loader
    from ..data.transforms import build_eval_transform
    from ..plots import plot_mae_reconstructions

    split = "val" if "val" in manifest.splits else "train"
    tf = build_eval_transform(cfg.data.augment, manifest, mae.encoder.img_size)
    loader = make_loader(cfg.data.manifest, split, 8, data=cfg.data, train=False,
                         seed=cfg.seed, transform=tf, num_workers=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        images = next(iter(loader))[0]
        path = plot_mae_reconstructions(mae, images, out_dir / "plots" / "mae_reconstructions.png",
                                        mean=manifest.mean, std=manifest.std)
    tracker.log_artifact(path, "plots")
