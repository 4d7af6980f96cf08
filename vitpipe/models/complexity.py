"""Analytic cost of a ViT: exact parameter count, forward FLOPs, training activation memory.

FLOPs follow ``torch.utils.flop_counter``'s convention: 2 x multiply-accumulates of every
matmul and convolution (bias adds, norms, softmax and activations are not counted). Per block
with T tokens, width D and MLP width M:

    qkv 6 T D^2  +  scores QK^T 2 T^2 D  +  AV 2 T^2 D  +  proj 2 T D^2  +  MLP 4 T D M

The T^2 terms are what makes high resolution (or small patches) expensive.
"""

from __future__ import annotations

from typing import Any

from ..config.base import ConfigError, parse_value
from ..config.model import patch_factors
from .registry import resolve


def _grid(kw: dict[str, Any]) -> tuple[int, int, int]:
    g = kw["img_size"] // kw["patch_size"]
    return g, g, g * g


def _stem_stages(kw: dict[str, Any]) -> tuple[list[tuple[int, int]], int]:
    """The conv stem's 3x3 stages as (width, stride), and its projection's kernel r
    (see ``layers.ConvStem``: ``patch_size = 2^k * r``)."""
    n, r = patch_factors(kw["patch_size"])
    d = kw["embed_dim"]
    widths = kw.get("stem_widths")
    if widths is not None:
        return [(w, 2 if i >= len(widths) - n else 1) for i, w in enumerate(widths)], r
    if n == 0:
        return [(max(d // 4, 8), 1)], r
    return [(max(d // 2 ** (n - i), 8), 2) for i in range(n)], r


def count_params(kw: dict[str, Any]) -> int:
    """Exact trainable parameter count of ``VisionTransformer(**kw)``."""
    d, c, p, k = kw["embed_dim"], kw["in_chans"], kw["patch_size"], kw["num_classes"]
    gh, gw, n = _grid(kw)
    m = int(d * kw["mlp_ratio"])
    if kw["stem"] == "conv":
        total, cin = 0, c
        stages, r = _stem_stages(kw)
        for cout, _ in stages:
            total += cin * cout * 9 + 2 * cout  # conv (no bias) + BatchNorm affine
            cin = cout
        total += cin * r * r * d + d
    else:
        total = c * p * p * d + d
    total += d if kw["global_pool"] == "token" else 0  # class token
    total += {"learned": n * d, "factorized": (gh + gw) * d, "sincos": 0}[kw["pos_embed"]]
    block = (2 * d                                      # norm1
             + 3 * d * d + (3 * d if kw["qkv_bias"] else 0) + d * d + d  # qkv, proj
             + 2 * d                                    # norm2
             + d * m + m + m * d + d                    # fc1, fc2
             + (2 * d if kw["layer_scale_init"] else 0))
    total += kw["depth"] * block + 2 * d  # blocks + final norm (or fc_norm)
    total += d * k + k if k > 0 else 0
    return total


def block_flops(tokens: int, dim: int, mlp_dim: int) -> int:
    """Forward FLOPs of one transformer block over ``tokens`` tokens (one image)."""
    t, d = tokens, dim
    return 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * mlp_dim


def stem_flops(kw: dict[str, Any]) -> int:
    d, c, p = kw["embed_dim"], kw["in_chans"], kw["patch_size"]
    _, _, n = _grid(kw)
    if kw["stem"] != "conv":
        return 2 * n * d * c * p * p
    total, cin, size = 0, c, kw["img_size"]
    stages, r = _stem_stages(kw)
    for cout, stride in stages:
        size = (size - 1) // stride + 1  # 3x3, padding 1
        total += 2 * size * size * cout * cin * 9
        cin = cout
    return total + 2 * n * d * cin * r * r


def forward_flops(kw: dict[str, Any], tokens: int | None = None, head: bool = True) -> int:
    """Forward FLOPs per image; ``tokens`` overrides the patch tokens the blocks see (MAE)."""
    d = kw["embed_dim"]
    _, _, n = _grid(kw)
    prefix = 1 if kw["global_pool"] == "token" else 0
    t = prefix + (n if tokens is None else tokens)
    total = stem_flops(kw) + kw["depth"] * block_flops(t, d, int(d * kw["mlp_ratio"]))
    if head and kw["num_classes"] > 0:
        total += 2 * d * kw["num_classes"]
    return total


def attention_flops(kw: dict[str, Any]) -> int:
    """The ``4 T^2 D`` per block of ``forward_flops`` spent in QK^T and AV: what
    ``FlopCounterMode`` cannot see inside CPU's fused SDPA kernel
    (``_scaled_dot_product_flash_attention_for_cpu`` has no flop formula), so it counts
    ``forward_flops - attention_flops`` there and the full figure under the math backend."""
    _, _, n = _grid(kw)
    t = n + (1 if kw["global_pool"] == "token" else 0)
    return kw["depth"] * 4 * t * t * kw["embed_dim"]


def reference_params(kw: dict[str, Any]) -> int:
    """Parameters of the same ViT as the paper and timm build it: their class token has a
    row in the learned position table too (``pos_embed`` (1, 1 + N, D)). Here that row is
    folded into the class token (``cls + pos[0]`` is one constant either way), so the
    function is the same with D fewer parameters; ``timm_compat`` maps timm weights exactly."""
    extra = kw["embed_dim"] if kw["global_pool"] == "token" and kw["pos_embed"] == "learned" else 0
    return count_params(kw) + extra


def logits_flops(kw: dict[str, Any]) -> int:
    """Forward FLOPs per image of ``VisionTransformer.forward`` (what training executes).

    With class-token pooling the last block computes its queries, projection and MLP for
    the class token only (keys/values for all T tokens), see ``VisionTransformer.forward``.
    """
    full = forward_flops(kw)
    if kw["global_pool"] != "token" or kw["depth"] == 0:
        return full
    d, m = kw["embed_dim"], int(kw["embed_dim"] * kw["mlp_ratio"])
    _, _, n = _grid(kw)
    t = n + 1
    last = 2 * d * d + 4 * t * d * d + 4 * t * d + 2 * d * d + 4 * d * m  # q, kv, attn, proj, MLP
    return full - block_flops(t, d, m) + last


def mae_forward_flops(kw: dict[str, Any], mask_ratio: float, decoder_embed_dim: int,
                      decoder_depth: int) -> int:
    """Forward FLOPs per image of ``MaskedAutoencoder`` (the encoder sees visible tokens only)."""
    _, _, n = _grid(kw)
    prefix = 1 if kw["global_pool"] == "token" else 0
    keep = max(1, int(round(n * (1 - mask_ratio))))
    d, dd = kw["embed_dim"], decoder_embed_dim
    enc = forward_flops(kw, tokens=keep, head=False)
    dec = (2 * (prefix + keep) * d * dd
           + decoder_depth * block_flops(prefix + n, dd, 4 * dd)
           + 2 * (prefix + n) * dd * kw["patch_size"] ** 2 * kw["in_chans"])
    return enc + dec


def activation_bytes(kw: dict[str, Any], batch_size: int = 1, bytes_per_el: int = 4) -> int:
    """Estimate of the activations autograd keeps for backward in one training step.

    Per block (SDPA, so no T x T matrix is stored): the two LayerNorm inputs 2 TD, the qkv
    input TD, q/k/v 3 TD (one qkv buffer), the attention output TD (also the proj input),
    the fc1 input TD, GELU input and fc2 input 2 TM, plus layer-scale inputs 2 TD when
    enabled. Then the stem's inputs (conv, BatchNorm and GELU inputs per conv-stem stage)
    and the final norm's input. Within ~5% of autograd's saved storages (tested).
    """
    d, m = kw["embed_dim"], int(kw["embed_dim"] * kw["mlp_ratio"])
    _, _, n = _grid(kw)
    t = n + (1 if kw["global_pool"] == "token" else 0)
    per_block = 8 * t * d + 2 * t * m + (2 * t * d if kw["layer_scale_init"] else 0)
    stem = kw["in_chans"] * kw["img_size"] ** 2  # the input images (for the weight gradient)
    if kw["stem"] == "conv":
        size = kw["img_size"]
        for cout, stride in _stem_stages(kw)[0]:
            size = (size - 1) // stride + 1
            stem += 3 * cout * size * size  # BatchNorm input, GELU input, next conv input
    if kw["global_pool"] == "token" and kw["depth"]:
        # last block runs the class token only (see logits_flops): its LN1 input, qkv input,
        # k/v for all tokens, then single-token tensors; the final norm sees one token
        ls = 2 * d if kw["layer_scale_init"] else 0
        last = 4 * t * d + 6 * d + 2 * m + ls
        per_image = (kw["depth"] - 1) * per_block + last + d + stem
    else:
        per_image = kw["depth"] * per_block + t * d + stem
    return per_image * batch_size * bytes_per_el


def _parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"model override '{item}' is not of the form key=value "
                              "(e.g. depth=8 img_size=384)")
        key, raw = item.split("=", 1)
        out[key.strip().removeprefix("model.")] = parse_value(raw)
    return out


def model_info(name: str, overrides: dict[str, Any] | list[str] | None = None,
               batch_size: int = 1) -> dict[str, Any]:
    """Params, forward GFLOPs per image, training activation memory and token count."""
    kw = resolve(name, **_parse_overrides(overrides))
    gh, gw, n = _grid(kw)
    prefix = 1 if kw["global_pool"] == "token" else 0
    fwd = forward_flops(kw)
    return {
        "name": name,
        "params": count_params(kw),
        "reference_params": reference_params(kw),
        "gflops": fwd / 1e9,  # every token through every block: the figure usually quoted
        "attention_gflops": attention_flops(kw) / 1e9,
        "logits_gflops": logits_flops(kw) / 1e9,  # what forward() executes
        "train_gflops": 3 * logits_flops(kw) / 1e9,  # forward + backward (2x forward)
        "activation_bytes": activation_bytes(kw, batch_size),
        "batch_size": batch_size,
        "grid": (gh, gw),
        "tokens": n + prefix,
        "config": kw,
    }


def model_info_text(name: str, overrides: list[str] | None = None, batch_size: int = 1) -> str:
    """Human-readable ``model_info`` for ``vitpipe model-info``."""
    info = model_info(name, overrides, batch_size)
    kw = info["config"]
    gh, gw = info["grid"]
    return "\n".join([
        f"model        {name}",
        f"shape        img {kw['img_size']} patch {kw['patch_size']} chans {kw['in_chans']} "
        f"width {kw['embed_dim']} depth {kw['depth']} heads {kw['num_heads']} "
        f"mlp {kw['mlp_ratio']:g} pos {kw['pos_embed']} stem {kw['stem']} "
        f"pool {kw['global_pool']} classes {kw['num_classes']}",
        f"params       {info['params'] / 1e6:.2f}M ({info['params']:,})"
        + (f"; the paper's/timm's ViT: {info['reference_params']:,} (its class token also has"
           " a position row; here folded into the class token: same function)"
           if info["reference_params"] != info["params"] else ""),
        f"tokens       {info['tokens']} ({gh}x{gw} patches + {info['tokens'] - gh * gw} prefix)",
        f"GFLOPs       {info['gflops']:.3f} forward / image = {info['gflops'] / 2:.3f} GMACs "
        f"(logits only: {info['logits_gflops']:.3f}; "
        f"{info['train_gflops']:.3f} per training step / image)"
        + ("; eval runs 2 views (tta_hflip)" if kw.get("tta_hflip") else ""),
        "             counted as torch.utils.flop_counter.FlopCounterMode does under the math"
        " SDPA backend (2 per multiply-add of every matmul and conv);",
        f"             {info['attention_gflops']:.3f} of them are attention (QK^T, AV), which it"
        " does not count inside CPU's fused SDPA kernel: "
        f"{info['gflops'] - info['attention_gflops']:.3f} there",
        f"activations  {info['activation_bytes'] / 2**20:.1f} MiB fp32 for a training step "
        f"at batch {batch_size}",
    ])
