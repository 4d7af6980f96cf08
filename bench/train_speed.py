"""Training-engine speed: supervised and MAE steps, and the engine's overhead over bare PyTorch.

A *bare* step is ``model(x) -> loss -> backward -> AdamW.step -> zero_grad``. An *engine* step is
exactly what ``vitpipe.train`` runs per micro-batch (``train_step``: Accelerate-prepared model and
optimizer, ``accumulate``, ``backward``, optional clipping, the param-group AdamW) plus the
per-step bookkeeping (scheduler, loss window). Both run on the same model initialisation and the
same in-memory batches, interleaved (bare, engine, engine, bare, ...) so a noisy neighbour slows
them alike; each uses its fastest repeat.

    nice python bench/train_speed.py            # CPU: configs/fmnist_cpu.yaml model + ViT-S/16 @224
    nice python bench/train_speed.py --quick    # < 1 min: 1 thread, CPU-time clock
    python bench/train_speed.py                 # with CUDA: + ViT-B/16 bf16 img/s and MFU,
                                                #   with and without torch.compile

The last line printed is one JSON object with at least ``sup_img_s``, ``mae_img_s``,
``mae_over_sup_step`` and ``engine_over_bare`` (target >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import time_steps

from vitpipe.config import ModelConfig, TrainConfig, load_stage
from vitpipe.models import build_from_config, build_mae
from vitpipe.models.complexity import forward_flops, mae_forward_flops
from vitpipe.models.registry import resolve
from vitpipe.train.engine import train_step
from vitpipe.train.optim import WarmupCosine, build_optimizer
from vitpipe.train.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def bare_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mae: bool,
              amp: torch.dtype | None) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x)[0] if mae else F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def engine_step(acc, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                cfg: TrainConfig) -> Callable[[], None]:
    task = get_task(cfg)
    opt = build_optimizer(model, cfg.train, task.layer_decay())
    model, opt = acc.prepare(model, opt)
    sched = WarmupCosine(opt, 1e-4, 1e-6, 10, 10_000)
    window = torch.zeros(2, device=x.device)
    one = torch.ones((), device=x.device)
    n = [0]

    def step() -> None:
        n[0] += 1
        loss, _ = train_step(acc, model, opt, task, x, y,
                             want_norm=n[0] % cfg.log_every_n_steps == 0)
        window.add_(torch.stack([loss.detach().float(), one]))
        if acc.sync_gradients:
            sched.step()

    return step


CLOCK: Callable[[], float] = time.perf_counter


def race(steps: dict[str, Callable[[], None]], repeats: int, n: int, warmup: int,
         device: torch.device) -> dict[str, float]:
    """Fastest seconds/step of each, interleaved with alternating order."""
    for s in steps.values():
        for _ in range(warmup):
            s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        for k in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            times[k].append(time_steps(steps[k], n, device, CLOCK))
    return {k: min(v) for k, v in times.items()}


def configs(model: dict | None, batch: int) -> tuple[TrainConfig, TrainConfig]:
    """(supervised, mae) configs from the CPU preset: its own model, or ``model`` (a whole
    model section, e.g. ``{"name": "vit_small_patch16_224"}``) in its place. Replaced, not
    merged: the preset's variant-specific fields (``stem_widths``, ``depth``) would not fit
    another variant."""
    preset = REPO / "configs" / "fmnist_cpu.yaml"
    over = [f"data.batch_size={batch}"]
    sup = load_stage("train", str(preset), over + ["mode=supervised"], section="finetune")
    # the CPU preset has no MAE stage (it did not pay there): time MAE with its model and data
    mae = load_stage("train", str(preset), over + ["mode=mae"], section="finetune")
    if model is not None:
        m = ModelConfig(**model)
        sup, mae = (TrainConfig.model_validate({**c.model_dump(), "model": m.model_dump()})
                    for c in (sup, mae))
    return sup, mae


def bench_model(label: str, acc, sup: TrainConfig, mae_cfg: TrainConfig, batch: int,
                device: torch.device, amp: torch.dtype | None, args,
                wrap: Callable = lambda m: m) -> dict[str, float]:
    torch.manual_seed(0)
    classifier = build_from_config(sup.model).to(device).train()
    mae = build_mae(mae_cfg.model, mae_cfg.mae).to(device).train()
    kw = resolve(sup.model.name, **sup.model.overrides())
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device=device)
    y = torch.randint(0, kw["num_classes"], (batch,), device=device)
    steps = {
        "bare_sup": bare_step(wrap(copy.deepcopy(classifier)), x, y, False, amp),
        "engine_sup": engine_step(acc, wrap(copy.deepcopy(classifier)), x, y, sup),
        "bare_mae": bare_step(wrap(copy.deepcopy(mae)), x, y, True, amp),
        "engine_mae": engine_step(acc, wrap(copy.deepcopy(mae)), x, y, mae_cfg),
    }
    t = race(steps, args.repeats, args.steps, args.warmup, device)
    out = {
        "batch": batch,
        "sup_img_s": batch / t["engine_sup"],
        "mae_img_s": batch / t["engine_mae"],
        "bare_sup_img_s": batch / t["bare_sup"],
        "bare_mae_img_s": batch / t["bare_mae"],
        "mae_over_sup_step": t["engine_mae"] / t["engine_sup"],
        "engine_over_bare": t["bare_sup"] / t["engine_sup"],
        "engine_over_bare_mae": t["bare_mae"] / t["engine_mae"],
    }
    if device.type == "cuda":
        flops = 3 * forward_flops(kw) * batch  # fwd + bwd ~ 3x fwd
        mflops = 3 * mae_forward_flops(kw, mae_cfg.mae.mask_ratio, mae_cfg.mae.decoder_embed_dim,
                                       mae_cfg.mae.decoder_depth) * batch
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()),
                    None)
        if peak:
            out["sup_mfu"] = flops / t["engine_sup"] / (peak * 1e12)
            out["mae_mfu"] = mflops / t["engine_mae"] / (peak * 1e12)
    print(f"{label}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in out.items()), flush=True)
    return out


def new_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fmnist batch 32, ViT-S/16 depth 4 batch 4, 3 repeats (< 3 min)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default=None,
                    help="cpu: process CPU seconds, robust on a machine shared with other jobs "
                    "(exact with --threads 1; img/s then means per CPU-second). "
                    "Default: cpu with --quick (and 1 thread), else wall")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="fmnist model batch (preset: 128)")
    ap.add_argument("--vits-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--no-vits", action="store_true", help="skip ViT-S/16 @224 on CPU")
    ap.add_argument("--gpu-batch", type=int, default=128)
    args = ap.parse_args()
    if args.clock is None:
        args.clock = "cpu" if args.quick else "wall"
    if args.quick and args.clock == "cpu" and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    vits = {"name": "vit_small_patch16_224", "num_classes": 1000}
    if args.quick:
        args.repeats, args.steps, args.warmup = min(args.repeats, 3), min(args.steps, 2), 1
        args.vits_batch = min(args.vits_batch, 4)
        args.batch = args.batch or 32
        vits["depth"] = 4
    global CLOCK
    if args.clock == "cpu" and not torch.cuda.is_available():
        CLOCK = time.process_time
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.clock} clock", flush=True)
    result: dict = {}

    acc = new_accelerator("no")
    sup, mae = configs(None, args.batch or 128)
    fm = bench_model(f"cpu {sup.model.name}", acc, sup, mae, sup.data.batch_size, cpu, None, args)
    result.update({k: fm[k] for k in ("sup_img_s", "mae_img_s", "mae_over_sup_step",
                                      "engine_over_bare", "engine_over_bare_mae")})
    result.update(fmnist_model=sup.model.name, fmnist_batch=sup.data.batch_size, clock=args.clock,
                  threads=torch.get_num_threads())
    if not args.no_vits:
        sup_s, mae_s = configs(vits, args.vits_batch)
        vs = bench_model("cpu vit_small_patch16_224" + (" (depth 4)" if args.quick else ""),
                         acc, sup_s, mae_s, args.vits_batch, cpu, None, args)
        result["vits16"] = vs

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        acc = new_accelerator("bf16")
        over = {"name": "vit_base_patch16_224", "num_classes": 1000}
        sup_b, mae_b = configs(over, args.gpu_batch)
        result["gpu"] = {"device": torch.cuda.get_device_name(),
                         "vitb16_bf16": bench_model("cuda vit_base_patch16_224 bf16", acc,
                                                    sup_b, mae_b, args.gpu_batch, gpu,
                                                    torch.bfloat16, args)}
        acc = new_accelerator("bf16")
        sup_c, mae_c = configs(over, args.gpu_batch)
        result["gpu"]["vitb16_bf16_compile"] = bench_model(
            "cuda vit_base_patch16_224 bf16 compile", acc, sup_c, mae_c, args.gpu_batch, gpu,
            torch.bfloat16, args, wrap=torch.compile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
