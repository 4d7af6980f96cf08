"""Analytic params / FLOPs / activation memory against what torch actually does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitpipe.cli import main as cli_main
from vitpipe.config import ConfigError
from vitpipe.models import MaskedAutoencoder, build_model, resolve
from vitpipe.models.complexity import (
    activation_bytes,
    count_params,
    forward_flops,
    logits_flops,
    mae_forward_flops,
    model_info,
    model_info_text,
)

CONFIGS = [
    ("vit_tiny_patch4_28", {}),
    ("vit_tiny_conv4_28", {}),
    ("vit_tiny_conv7_28", {}),
    ("vit_tiny_conv7_28", {"stem_widths": (16, 32), "depth": 4}),
    ("vit_tiny_conv4_28", {"stem_widths": (8, 16, 32)}),
    ("vit_small_patch7_28", {"global_pool": "avg", "pos_embed": "factorized",
                             "layer_scale_init": 1e-4, "qkv_bias": False}),
    ("vit_tiny_patch4_28", {"img_size": 56, "pos_embed": "sincos", "mlp_ratio": 3.0}),
    ("vit_base_patch16_224", {}),
    ("vit_huge_patch14_224", {}),
]


def counted_flops(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """FlopCounterMode total, with the math SDPA backend so attention matmuls are visible."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(("name", "over"), CONFIGS)
def test_forward_flops_match_flop_counter(name: str, over: dict) -> None:
    kw = resolve(name, **over)
    with torch.device("meta"):  # no allocation even for ViT-H
        model = build_model(name, **over)
        x = torch.empty(2, kw["in_chans"], kw["img_size"], kw["img_size"])
    every_token = counted_flops(lambda t: model.forward_head(model.forward_features(t)), x) / 2
    assert forward_flops(kw) == pytest.approx(every_token, rel=0.01)
    assert logits_flops(kw) == pytest.approx(counted_flops(model, x) / 2, rel=0.01)
    assert (logits_flops(kw) < forward_flops(kw)) == (kw["global_pool"] == "token")


@pytest.mark.parametrize(("name", "over"), CONFIGS)
def test_param_count_is_exact(name: str, over: dict) -> None:
    kw = resolve(name, **over)
    with torch.device("meta"):
        model = build_model(name, **over)
    assert count_params(kw) == sum(p.numel() for p in model.parameters())


def test_attention_quadratic_term_is_counted() -> None:
    """Doubling the image side quadruples N: the T^2 part grows 16x, so FLOPs grow > 4x."""
    small = forward_flops(resolve("vit_tiny_patch4_28"))
    big = forward_flops(resolve("vit_tiny_patch4_28", img_size=56))
    assert big / small > 4.1


def test_mae_flops_match_flop_counter() -> None:
    kw = resolve("vit_small_patch4_28")
    with torch.device("meta"):
        enc = build_model("vit_small_patch4_28", num_classes=0)
        mae = MaskedAutoencoder(enc, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                                mask_ratio=0.75)
        x = torch.empty(2, 1, 28, 28)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        mae.forward_decoder(*mae.forward_encoder(x, 0.75)[::2])
    analytic = mae_forward_flops({**kw, "num_classes": 0}, 0.75, 64, 2)
    assert analytic == pytest.approx(counter.get_total_flops() / 2, rel=0.01)
    assert analytic < 0.4 * forward_flops(kw)  # the point of MAE: the encoder sees 25%


@pytest.mark.parametrize(("name", "over"), CONFIGS[:3])
def test_activation_estimate_matches_saved_tensors(name: str, over: dict) -> None:
    """Bytes of every distinct storage autograd saves (parameters excluded), vs the estimate."""
    kw = resolve(name, **over)
    torch.manual_seed(0)
    model = build_model(name, **over).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(4, kw["in_chans"], kw["img_size"], kw["img_size"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long))
    assert activation_bytes(kw, batch_size=4) == pytest.approx(sum(saved.values()), rel=0.05)


def test_model_info_vit_base() -> None:
    info = model_info("vit_base_patch16_224", batch_size=8)
    assert info["params"] == 86_566_888  # timm's 86,567,656 minus the folded cls position
    assert info["tokens"] == 197 and info["grid"] == (14, 14)
    assert info["gflops"] == pytest.approx(35.1, abs=0.1)  # 17.6 GMACs, as usually quoted
    assert info["activation_bytes"] == 8 * model_info("vit_base_patch16_224")["activation_bytes"]
    text = model_info_text("vit_base_patch16_224")
    assert "86.57M" in text and "197" in text and "GFLOPs" in text


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_small_patch16_224"])
def test_model_info_figures_against_timm_and_flop_counter(name: str) -> None:
    """The reference figures themselves: timm's model of the same name, one 224x224 image,
    FlopCounterMode under the default CPU SDPA kernel (no attention flops) and the math one."""
    import timm

    info = model_info(name)
    ref = timm.create_model(name, pretrained=False).eval()
    ours = build_model(name).eval()
    assert info["reference_params"] == sum(p.numel() for p in ref.parameters())
    assert info["params"] == sum(p.numel() for p in ours.parameters())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fused:
            ref(x)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math:
            ref(x)
    assert info["gflops"] * 1e9 == math.get_total_flops()
    assert (info["gflops"] - info["attention_gflops"]) * 1e9 == pytest.approx(
        fused.get_total_flops(), rel=1e-9)
    text = model_info_text(name)
    assert f"{info['reference_params']:,}" in text and "FlopCounterMode" in text
    assert f"{fused.get_total_flops() / 1e9:.3f} there" in text


def test_model_info_overrides_as_strings() -> None:
    info = model_info("vit_tiny_patch4_28", ["depth=2", "model.img_size=56"])
    assert info["config"]["depth"] == 2 and info["tokens"] == 197
    with pytest.raises(ConfigError, match="key=value"):
        model_info("vit_tiny_patch4_28", ["depth"])
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        model_info("vit_tiny_patch4_28", ["detph=2"])


def test_cli_model_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model-info", "vit_base_patch16_224"]) == 0
    assert "86.57M" in capsys.readouterr().out
    assert cli_main(["model-info", "vit_tiny_patch4_28", "depth=3", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "depth 3" in out and "batch 4" in out
    assert cli_main(["model-info", "vit_bsae_patch16_224"]) == 2
    assert "vit_base_patch16_224" in capsys.readouterr().err
