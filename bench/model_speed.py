"""Training-step speed: vitpipe's ViT vs timm's, and MAE vs supervised, same process.

One training step = forward + cross-entropy (or MAE loss) + backward + fused AdamW step.
The models under test run in interleaved repeats (ours, timm, MAE, MAE, timm, ours, ...) so
that a noisy neighbour slows all of them alike. Throughput uses each model's fastest repeat
(the least disturbed one; on a shared machine medians mostly measure the neighbours);
``ours_over_timm_median`` is the median of the per-repeat ratios, for comparison.

    nice python bench/model_speed.py                      # CPU: ViT-S/16 @224, batch 16
    nice python bench/model_speed.py --quick              # < 2 min smoke run
    nice python bench/model_speed.py --threads 1 --clock cpu   # on a busy shared machine
    python bench/model_speed.py --device cuda             # GPU: ViT-B/16, bf16, MFU

The last line printed is one JSON object (ours_img_s, timm_img_s, ours_over_timm,
mae_over_supervised, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import time_steps

from vitpipe.config import MAEConfig
from vitpipe.models import MaskedAutoencoder, build_model, resolve
from vitpipe.models.complexity import forward_flops, logits_flops, mae_forward_flops

# dense bf16 peak, for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def timm_twin(kw: dict) -> torch.nn.Module:
    """timm's VisionTransformer with the same shape as ours."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT(
        img_size=kw["img_size"], patch_size=kw["patch_size"], in_chans=kw["in_chans"],
        num_classes=kw["num_classes"], embed_dim=kw["embed_dim"], depth=kw["depth"],
        num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"], qkv_bias=kw["qkv_bias"],
        global_pool=kw["global_pool"], class_token=kw["global_pool"] == "token",
        init_values=kw["layer_scale_init"],
    )


def make_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], mae: bool,
              amp: torch.dtype | None) -> Callable[[], None]:
    # the same optimizer for every model; fused keeps its (model-independent) cost small
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    x, y = batch
    device_type = x.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x)[0] if mae else F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--model", default=None, help="default: vit_small_patch16_224 on CPU, "
                    "vit_base_patch16_224 on GPU")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks for a quicker run")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 CPU, 128 GPU")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--decoder-dim", type=int, default=MAEConfig().decoder_embed_dim)
    ap.add_argument("--decoder-depth", type=int, default=MAEConfig().decoder_depth)
    ap.add_argument("--decoder-heads", type=int, default=MAEConfig().decoder_num_heads)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU seconds, robust on a machine shared with other jobs "
                    "(exact with --threads 1; 'img/s' then means per CPU-second)")
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--quick", action="store_true", help="depth 4, batch 8, 3 repeats")
    args = ap.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1) and args.clock == "wall":
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: wall-clock times "
              "mostly measure other jobs (multi-threaded steps wait on descheduled threads); "
              "--threads 1 --clock cpu compares the models' own cost", file=sys.stderr)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or ("vit_base_patch16_224" if gpu else "vit_small_patch16_224")
    batch = args.batch or (128 if gpu else 16)
    depth = args.depth
    if args.quick:
        depth, batch, args.repeats = depth or 4, args.batch or (32 if gpu else 8), 3
    overrides = {k: v for k, v in (("img_size", args.img_size), ("depth", depth)) if v}
    kw = resolve(name, **overrides)
    amp = torch.bfloat16 if gpu else None
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(0)
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device=device)
    y = torch.randint(0, kw["num_classes"], (batch,), device=device)
    ours = build_model(name, **overrides).to(device).train()
    encoder = build_model(name, **{**overrides, "num_classes": 0})
    mae = MaskedAutoencoder(encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads,
                            args.mask_ratio, norm_pix_loss=True).to(device).train()
    steps = {"ours": make_step(ours, (x, y), False, amp),
             "mae": make_step(mae, (x, y), True, amp)}
    if not args.no_timm:
        steps["timm"] = make_step(timm_twin(kw).to(device).train(), (x, y), False, amp)

    for _ in range(args.warmup):
        for s in steps.values():
            s()
    clock = time.process_time if args.clock == "cpu" and not gpu else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.repeats):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # no fixed position bias
        for k in order:
            times[k].append(time_steps(steps[k], args.steps, device, clock))
    best = {k: min(v) for k, v in times.items()}

    # per image, forward + backward (2x forward), counting what each model executes: timm runs
    # every token through the last block, ours only the class token there (same logits)
    train_flops = 3 * logits_flops(kw)
    timm_flops = 3 * forward_flops(kw)
    mae_flops = 3 * mae_forward_flops(kw, args.mask_ratio, args.decoder_dim, args.decoder_depth)
    out = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}",
        "model": name, "img_size": kw["img_size"], "depth": kw["depth"], "batch": batch,
        "dtype": "bf16" if amp else "fp32", "repeats": args.repeats, "steps": args.steps,
        "clock": "cpu" if clock is time.process_time else "wall", "load_avg": round(load, 1),
        "ours_step_s": round(best["ours"], 4),
        "ours_img_s": round(batch / best["ours"], 2),
        "mae_step_s": round(best["mae"], 4),
        "mae_over_supervised": round(best["mae"] / best["ours"], 3),
        "mae_flops_over_supervised": round(mae_flops / train_flops, 3),
        "ours_flops_over_timm": round(train_flops / timm_flops, 3),
        "decoder": f"{args.decoder_depth}x{args.decoder_dim}",
        "ours_tflops": round(train_flops * batch / best["ours"] / 1e12, 3),
    }
    if "timm" in best:
        pairs = [t / o for o, t in zip(times["ours"], times["timm"], strict=True)]
        out.update(timm_step_s=round(best["timm"], 4), timm_img_s=round(batch / best["timm"], 2),
                   ours_over_timm=round(best["timm"] / best["ours"], 3),
                   ours_over_timm_median=round(statistics.median(pairs), 3))
    if gpu:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in out["device"]), None)
        if peak:
            out["mfu"] = round(out["ours_tflops"] / peak, 4)
            if "timm" in best:
                out["timm_mfu"] = round(timm_flops * batch / best["timm"] / 1e12 / peak, 4)
    for k, v in times.items():
        print(f"{k:>5}: " + " ".join(f"{t:.3f}" for t in v) + f"  s/step (best {best[k]:.3f})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
