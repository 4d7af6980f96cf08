"""The Accelerate training engine: one loop for every task (supervised, MAE, fine-tune, distill).

The engine knows no mode by name: what a mode means (its model, loss, validation, artifacts)
is its task object (:mod:`.tasks`). One short loop (torchtitan style) over a
:class:`TrainState`; everything else is a named helper. The order matters:
cheap checks first (preflight all-reduce, tracking reachability, batch semantics, manifest,
model, fine-tune source, resume checkpoint), every rank agreeing on success, then data and steps.

Exactness of resume rests on: the schedule being a function of the step, every RNG restored
and verified, loader start-up RNG isolated (``fork_rng``), and the data cursor
(epoch + samples consumed by this rank) fed back through ``make_loader(start_sample=...)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TrainConfig
from ..errors import CheckpointError, TrainingError
from ..tracking import Tracker, run_tags
from .artifacts import log_run_inputs, open_run
from .checkpoint import CheckpointManager
from .distributed import (
    StopFlag,
    all_ok,
    check_replicas,
    fault_injection,
    is_collective_failure,
    make_accelerator,
    preflight,
)
from .ema import ModelEma
from .optim import WarmupCosine, build_optimizer, group_summary, scaled_lr
from .tasks import Task, get_task
from .tasks.base import Setup


class TrainingInterrupted(TrainingError):
    """SIGTERM arrived; a checkpoint was written; rerun with ``--resume auto`` to continue."""


@dataclass
class Cursor:
    """Where training is: optimizer steps overall, epoch, and optimizer steps into the epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class Plan:
    """Batch and step arithmetic, derived once and logged."""

    world_size: int
    micro_batch: int
    accum_steps: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size


@dataclass
class TrainState:
    """Everything a step changes, in one object: what a checkpoint restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    ema: ModelEma | None
    cursor: Cursor
    plan: Plan


@dataclass
class Session:
    """What the loop reads but does not change: the run's config, task, I/O and data."""

    cfg: TrainConfig
    task: Task
    acc: Any
    tracker: Tracker
    ckpt: CheckpointManager
    stop: StopFlag
    run_id: str | None
    train_loader: Callable[[int, int], Any]  # (epoch, start_sample) -> loader
    val_loader: Any


def micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Per-process forward batch; validates ``train.global_batch_size`` divisibility."""
    accum, g = cfg.train.accum_steps, cfg.train.global_batch_size
    if g is None:
        return cfg.data.batch_size
    if g % (accum * world_size):
        raise ConfigError(
            f"train.global_batch_size={g} is not divisible by train.accum_steps ({accum}) x "
            f"world size ({world_size}) = {accum * world_size}; pick a multiple of "
            f"{accum * world_size} or unset it and use data.batch_size (per process)"
        )
    return g // (accum * world_size)


def _batches(loader: Any, n: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``n`` batches; the loader's start-up (worker seeds) runs under a forked,
    deterministically seeded RNG so it never shifts the training RNG (exact resume)."""
    if n <= 0:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        it = iter(loader)
        first = next(it, None)
    if first is None:
        raise TrainingError("the training loader yielded no batch")
    yield first
    for i in range(1, n):
        try:
            yield next(it)
        except StopIteration:
            raise TrainingError(f"the training loader ended after {i} batches; "
                                f"len(loader) promised {n}") from None
    if n >= len(loader):  # the whole epoch: let the loader finish (its workers' skip counts)
        next(it, None)


@torch.no_grad()
def top1(acc, model: torch.nn.Module, loader: Any) -> float:
    """Top-1 over a padded eval loader (labels < 0 dropped), summed over ranks."""
    was = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for x, y in loader:
        x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
        keep = y >= 0
        with acc.autocast():
            pred = model(x).argmax(-1)
        counts[0] += (pred[keep] == y[keep]).sum()
        counts[1] += keep.sum()
    model.train(was)
    counts = acc.reduce(counts, reduction="sum")
    return float(counts[0] / counts[1].clamp_min(1))


def skipped_samples(acc, loader: Any) -> float:
    """Bad samples the loader skipped in its last full pass, summed over ranks."""
    n = torch.tensor([float(getattr(loader, "bad_samples", 0))], device=acc.device)
    return float(acc.reduce(n, reduction="sum")[0])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training stage; returns ``run_id, weights, checkpoint_dir, steps, metrics``."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    acc = make_accelerator(cfg)
    try:
        return _train(cfg, acc)
    finally:
        _shutdown(acc)


def _shutdown(acc) -> None:
    from accelerate.state import AcceleratorState, GradientState

    with contextlib.suppress(Exception):  # a dead peer can make teardown fail; exit anyway
        acc.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train(cfg: TrainConfig, acc) -> dict[str, Any]:
    from accelerate.utils import broadcast_object_list, set_seed

    from ..data import make_loader, read_manifest
    from ..data.transforms import build_eval_transform, build_train_transform

    task = get_task(cfg)
    preflight(acc, cfg.dist.preflight_timeout_s)
    tracker = Tracker(cfg.tracking, active=acc.is_main_process)
    all_ok(acc, tracker.check)
    micro = all_ok(acc, lambda: micro_batch_size(cfg, acc.num_processes))
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set (the shard stage's manifest.json URI)")
    manifest = all_ok(acc, lambda: read_manifest(cfg.data.manifest, cfg.data.s3))
    if "train" not in manifest.splits:
        raise ConfigError(f"manifest {cfg.data.manifest} has no 'train' split "
                          f"(splits: {sorted(manifest.splits)})")
    num_classes = len(manifest.classes)
    out_dir = Path(cfg.output_dir)
    if acc.is_local_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model, what it starts from (init, teacher), optimizer ----------------------------
    set_seed(cfg.seed)
    model = all_ok(acc, lambda: task.build_model(num_classes))
    report = all_ok(acc, lambda: task.setup(model, Setup(acc, out_dir, tracker.uri)))
    if report:
        acc.print(report)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = build_optimizer(model, cfg.train, task.layer_decay())

    # ---- data plan ------------------------------------------------------------------------
    img_size = task.image_size(model)
    train_tf = build_train_transform(cfg.data.augment, manifest, img_size)
    rank, world = acc.process_index, acc.num_processes
    pin = acc.device.type == "cuda"

    def train_loader(epoch: int, start_sample: int = 0):
        return make_loader(cfg.data.manifest, "train", micro, rank, world, data=cfg.data,
                           epoch=epoch, start_sample=start_sample, seed=cfg.seed,
                           transform=train_tf, pin_memory=pin)

    batches_per_epoch = len(train_loader(0))
    steps_per_epoch = batches_per_epoch // cfg.train.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the train split gives {batches_per_epoch} batches of {micro} per rank "
            f"({world} ranks): fewer than train.accum_steps={cfg.train.accum_steps}; "
            "lower data.batch_size or accum_steps"
        )
    total = math.ceil(cfg.train.epochs * steps_per_epoch)
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    plan = Plan(world, micro, cfg.train.accum_steps, steps_per_epoch, total,
                min(total, round(cfg.train.warmup_epochs * steps_per_epoch)), 0.0)
    plan.lr = scaled_lr(cfg.train, plan.effective_batch)
    scheduler = WarmupCosine(optimizer, plan.lr, cfg.train.min_lr, plan.warmup_steps, total)
    val_loader = None
    if task.classifier and "val" in manifest.splits:
        eval_tf = build_eval_transform(cfg.data.augment, manifest, img_size)
        val_loader = make_loader(cfg.data.manifest, "val", cfg.data.eval_batch_size, rank,
                                 world, data=cfg.data, train=False, seed=cfg.seed,
                                 transform=eval_tf, pin_memory=pin)
    task.build_mix(num_classes)

    # ---- accelerate ---------------------------------------------------------------------------
    model, optimizer = acc.prepare(model, optimizer)
    if ema is not None:
        ema.module.to(acc.device)
    ckpt = CheckpointManager(acc, cfg.checkpoint.dir, cfg.checkpoint.keep_last,
                             out_dir / ".ckpt_staging", cfg.data.s3)
    cursor, run_id, resumed_step = Cursor(), None, None
    resume_from = all_ok(acc, lambda: ckpt.resolve(cfg.checkpoint.resume))
    if resume_from:
        state = all_ok(acc, lambda: ckpt.load(resume_from, model, ema))
        _check_compatible(state, cfg, plan, resume_from)
        cursor = Cursor(**state["cursor"])
        resumed_step = cursor.step
        ckpt.last_saved = resume_from
        scheduler.load_state_dict(state["scheduler"])
        _check_optimizer_step(optimizer, cursor.step, cfg, resume_from)
        run_id = state.get("mlflow_run_id")
        acc.print(f"resumed from {resume_from} at step {cursor.step} (epoch {cursor.epoch}, "
                  f"{cursor.batch_in_epoch} steps in)")
    else:
        set_seed(cfg.seed + rank)  # per-rank randomness (drop path, masks, mixup)

    # ---- tracking ---------------------------------------------------------------------------
    tags = run_tags(cfg.mode, world) | {
        "vitpipe.dataset_digest": str(manifest.digest),  # the whole shard set (registry too)
        "vitpipe.checkpoint_dir": cfg.checkpoint.dir,
    }
    if acc.is_main_process:
        run_id = open_run(tracker, run_id, tags, cfg)
        if not resume_from:
            log_run_inputs(tracker, cfg, manifest, plan, validates=task.classifier)
    run_id = broadcast_object_list([run_id])[0] if world > 1 else run_id
    acc.print(f"plan: {json.dumps(asdict(plan) | {'effective_batch': plan.effective_batch})}")
    for line in group_summary(optimizer.param_groups):
        acc.print(f"  param group {line}")

    stop = StopFlag()
    stop.install()
    status = "FAILED"
    try:
        state = TrainState(model, optimizer, scheduler, ema, cursor, plan)
        session = Session(cfg, task, acc, tracker, ckpt, stop, run_id, train_loader, val_loader)
        metrics = _loop(session, state)
        check_replicas(acc, model, cursor.step)
        weights = task.export(acc, model, ema, out_dir, tracker, manifest)
        status = "FINISHED"
    except TrainingInterrupted:
        status = "KILLED"
        raise
    except RuntimeError as err:
        if world > 1 and is_collective_failure(err):
            raise TrainingError(
                f"rank {rank}: a collective failed at step {cursor.step}: a peer process died "
                f"or stalled (process-group timeout {cfg.dist.timeout_s:g}s). "
                f"Resume from the last checkpoint with --resume auto. Cause: {err}"
            ) from None
        raise
    finally:
        stop.restore()
        tracker.end(status)
    return {"run_id": run_id, "weights": str(weights), "checkpoint_dir": cfg.checkpoint.dir,
            "checkpoint": ckpt.last_saved, "resumed_from_step": resumed_step,
            "steps": cursor.step, "metrics": metrics, "plots": list(task.plots)}


def _check_compatible(state: dict[str, Any], cfg: TrainConfig, plan: Plan, where: str) -> None:
    """The data cursor is only meaningful for the same mode, world size and batch layout."""
    want = {"mode": cfg.mode, "world_size": plan.world_size, "micro_batch": plan.micro_batch,
            "accum_steps": plan.accum_steps, "num_workers": cfg.data.num_workers}
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {where} cannot resume this run exactly ({shown}); "
                              "use the same launch/batch settings or checkpoint.resume=none")


def _check_optimizer_step(optimizer: Any, step: int, cfg: TrainConfig, where: str) -> None:
    if cfg.train.mixed_precision == "fp16":
        return  # the scaler may skip steps: AdamW's counter can lag the loop's
    for st in optimizer.state_dict()["state"].values():
        if "step" in st and int(st["step"]) != step:
            raise CheckpointError(f"checkpoint {where}: optimizer step {int(st['step'])} != "
                                  f"saved loop step {step}; the checkpoint is inconsistent")
        break


def train_step(acc, model, optimizer, task: Task, x: torch.Tensor, y: torch.Tensor,
               want_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: the task's loss, backward and (on accumulation boundaries) clip + step.

    Returns the loss and, on a boundary, the pre-clip gradient norm when clipping or
    ``want_norm`` (the norm costs a pass over the grads, so the loop asks on log steps only).
    """
    clip = task.cfg.train.clip_grad
    with acc.accumulate(model):
        loss = task.loss(model, x, y)
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients and (clip or want_norm):
            grad_norm = acc.clip_grad_norm_(model.parameters(), clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def _loop(run: Session, state: TrainState) -> dict[str, float]:
    from tqdm.auto import tqdm

    cfg, acc, tracker, stop = run.cfg, run.acc, run.tracker, run.stop
    model, optimizer, scheduler, ema = state.model, state.optimizer, state.scheduler, state.ema
    cursor, plan = state.cursor, state.plan

    rank = acc.process_index
    # Piped output (a flow streaming into Prefect logs) gets a line per refresh: refresh less.
    bar = tqdm(total=plan.total_steps, initial=cursor.step, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 10.0,
               disable=not (acc.is_main_process and cfg.progress))
    metrics: dict[str, float] = {}
    last_saved = cursor.step if cursor.step > 0 else -1  # resumed: that step is on disk
    window_loss = torch.zeros(2, device=acc.device)
    t_window, n_window = time.perf_counter(), 0
    img_s = 0.0
    eval_every = max(1, round(cfg.eval_every_epochs))
    model.train()

    def save(step: int) -> str:
        meta = {"cursor": asdict(cursor), "scheduler": scheduler.state_dict(), "step": step,
                 "mode": cfg.mode, "world_size": plan.world_size, "micro_batch": plan.micro_batch,
                 "accum_steps": plan.accum_steps, "num_workers": cfg.data.num_workers,
                 "mlflow_run_id": run.run_id,
                 "model": cfg.model.name, "time": time.time()}
        uri = run.ckpt.save(step, meta, ema)
        tracker.set_tags({"vitpipe.checkpoint": uri})
        return uri

    while cursor.step < plan.total_steps:
        epoch_start = cursor.step
        epoch_loss = torch.zeros(2, device=acc.device)
        n_steps = min(plan.steps_per_epoch - cursor.batch_in_epoch,
                      plan.total_steps - cursor.step)
        start_sample = cursor.batch_in_epoch * plan.accum_steps * plan.micro_batch
        loader = run.train_loader(cursor.epoch, start_sample)
        seed = (cfg.seed * 1_000_003 + cursor.epoch * 1009 + rank) % 2**63
        for x, y in _batches(loader, n_steps * plan.accum_steps, seed):
            x = x.to(acc.device, non_blocking=True)
            y = y.to(acc.device, non_blocking=True)
            want_norm = (cursor.step + 1) % cfg.log_every_n_steps == 0
            loss, grad_norm = train_step(acc, model, optimizer, run.task, x, y, want_norm)
            pair = torch.stack([loss.detach().float(), torch.ones((), device=acc.device)])
            window_loss += pair
            epoch_loss += pair
            if not acc.sync_gradients:
                continue
            # ---- one optimizer step done ----
            cursor.step += 1
            cursor.batch_in_epoch += 1
            scheduler.step()
            if ema is not None:
                ema.update(acc.unwrap_model(model))
            n_window += 1
            fault_injection(cursor.step, rank)
            if cursor.step % cfg.log_every_n_steps == 0 or cursor.step == plan.total_steps:
                dt = time.perf_counter() - t_window
                img_s = n_window * plan.effective_batch / max(dt, 1e-9)
                wl = acc.reduce(window_loss, reduction="sum")
                if not torch.isfinite(wl[0]):  # checked here: no extra device sync per step
                    raise TrainingError(f"loss is {float(wl[0])} by step {cursor.step}; lower "
                                        "the lr, set train.clip_grad or use bf16")
                step_metrics = {"loss": float(wl[0] / wl[1].clamp_min(1)),
                                "lr": scheduler.lr,
                                "img_s": img_s}
                if grad_norm is not None:
                    step_metrics["grad_norm"] = float(grad_norm)
                tracker.log_metrics(step_metrics, step=cursor.step)
                bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", lr=f"{step_metrics['lr']:.2e}",
                                img_s=f"{img_s:.0f}", refresh=False)
                metrics["loss"] = step_metrics["loss"]
                window_loss.zero_()
                t_window, n_window = time.perf_counter(), 0
            bar.update(1)
            if (plan.world_size == 1 or cursor.step % cfg.log_every_n_steps == 0) and \
                    stop.should_stop(acc):  # a collective when distributed: not every step
                uri = save(cursor.step)
                bar.close()
                raise TrainingInterrupted(
                    f"rank {rank}: stopped by signal {stop.signum or 'on a peer'} at step "
                    f"{cursor.step}; checkpoint saved to {uri}; rerun with --resume auto"
                )
            if cursor.step % cfg.checkpoint.every_n_steps == 0:
                save(cursor.step)
                last_saved = cursor.step
        # ---- end of epoch (or of the step budget inside it) ----
        finished_epoch = cursor.batch_in_epoch >= plan.steps_per_epoch
        if finished_epoch:
            cursor.epoch += 1
            cursor.batch_in_epoch = 0
        epoch_metrics: dict[str, float] = {"epoch": float(cursor.epoch)}
        el = acc.reduce(epoch_loss, reduction="sum")
        if el[1] > 0:
            epoch_metrics["epoch_loss"] = float(el[0] / el[1])
        if finished_epoch:  # bad samples skipped in this epoch's pass (0 when all were good)
            epoch_metrics["skipped_samples_train"] = skipped_samples(acc, loader)
        last = cursor.step >= plan.total_steps
        val = run.val_loader
        if val is not None and (last or (finished_epoch and cursor.epoch % eval_every == 0)):
            epoch_metrics["val_top1"] = top1(acc, model, val)
            epoch_metrics["skipped_samples_val"] = skipped_samples(acc, val)
            if ema is not None:
                epoch_metrics["val_top1_ema"] = top1(acc, ema.module, val)
        tracker.log_metrics(epoch_metrics, step=cursor.step)
        metrics.update({k: v for k, v in epoch_metrics.items() if k != "epoch"})
        shown = " ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items() if k != "epoch")
        acc.print(f"epoch {cursor.epoch - finished_epoch} steps {epoch_start}->{cursor.step}/"
                  f"{plan.total_steps} lr {scheduler.lr:.2e} img/s {img_s:.0f} {shown}",
                  flush=True)
    bar.close()
    if last_saved != cursor.step:
        save(cursor.step)
    metrics["steps"] = float(cursor.step)
    return metrics
