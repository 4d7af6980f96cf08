"""timm ViT weights -> ours: identical logits against timm's own (randomly initialised) model."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from vitpipe.config.model import MODEL_DEFAULTS
from vitpipe.errors import CheckpointError
from vitpipe.models import VisionTransformer, build_model
from vitpipe.models.timm_compat import convert_timm_state_dict, is_timm_state_dict
from vitpipe.weights import load_pretrained, load_timm_file, save_safetensors

SHAPE = dict(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=64, depth=2,
             num_heads=4)


def timm_vit(pool: str = "token", init_values: float | None = None, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        **{**SHAPE, **kw}, global_pool=pool, class_token=pool == "token",
        init_values=init_values)
    with torch.no_grad():  # make the class token and position rows matter
        for p in (m.cls_token, m.pos_embed):
            if p is not None:
                p.normal_(std=0.5)
    return m.eval()


def ours_like(pool: str = "token", init_values: float | None = None, **kw) -> VisionTransformer:
    torch.manual_seed(1)
    return VisionTransformer(**{**MODEL_DEFAULTS, **SHAPE, **kw, "global_pool": pool,
                                "layer_scale_init": init_values}).eval()


@pytest.mark.parametrize(("pool", "init_values"), [("token", None), ("avg", None),
                                                   ("token", 0.1)])
def test_converted_weights_give_identical_logits(pool: str, init_values: float | None) -> None:
    ref = timm_vit(pool, init_values)
    ours = ours_like(pool, init_values)
    x = torch.randn(4, 3, 32, 32)
    before = ours(x)
    sd = convert_timm_state_dict(ref.state_dict())
    ours.load_state_dict(sd, strict=True)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.std() > 0.05  # non-trivial logits
    assert (got - want).abs().max() < 1e-4
    assert (before - want).abs().max() > 1e-2  # the load actually changed something


def test_features_match_too() -> None:
    ref, ours = timm_vit(), ours_like()
    ours.load_state_dict(convert_timm_state_dict(ref.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4,
                               rtol=1e-4)


def test_class_position_is_folded_into_class_token() -> None:
    sd = timm_vit().state_dict()
    out = convert_timm_state_dict(sd)
    assert is_timm_state_dict(sd) and not is_timm_state_dict(out)
    assert out["pos_embed.weight"].shape == (1, 16, 64)
    torch.testing.assert_close(out["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    assert sd["pos_embed"].shape == (1, 17, 64)  # input untouched


def test_no_embed_class_variant() -> None:
    ref = timm_vit(no_embed_class=True)
    ours = ours_like()
    ours.load_state_dict(convert_timm_state_dict(ref.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    assert (ours(x) - ref(x)).abs().max() < 1e-4


def test_unsupported_timm_features_are_named() -> None:
    sd = timm_vit(reg_tokens=2).state_dict()
    with pytest.raises(CheckpointError, match="reg_token"):
        convert_timm_state_dict(sd)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_local_timm_file(tmp_path: Path, suffix: str) -> None:
    ref = timm_vit()
    path = tmp_path / f"timm_vit{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        save_safetensors(ref.state_dict(), path)
    ours = ours_like()
    ours.load_state_dict(load_timm_file(path))
    x = torch.randn(2, 3, 32, 32)
    assert (ours(x) - ref(x)).abs().max() < 1e-4


def test_load_pretrained_accepts_timm_and_resamples() -> None:
    """A timm checkpoint at 32px into our model at 48px: resampled pos embed, new head."""
    ref = timm_vit()
    ours = ours_like(img_size=48, num_classes=3)
    report = load_pretrained(ours, ref.state_dict())
    assert report["resampled"] == ["pos_embed.weight 4x4 -> 6x6"]
    assert report["reinitialized"] == ["head.weight", "head.bias"]
    torch.testing.assert_close(ours.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)


SHARED_NAMES = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                "vit_base_patch32_224", "vit_large_patch16_224", "vit_large_patch14_224",
                "vit_huge_patch14_224"]


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_named_variants_have_timms_architecture(name: str) -> None:
    """Same name, same network: every converted timm tensor has our key and shape (meta)."""
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, num_classes=1000)
        ours = build_model(name)
    converted = {k: tuple(v.shape) for k, v in convert_timm_state_dict(ref.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_create_model_logits_match() -> None:
    kw = dict(img_size=32, patch_size=8, depth=2, num_classes=7)
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, **kw).eval()
    ours = build_model("vit_small_patch16_224", **kw).eval()
    ours.load_state_dict(convert_timm_state_dict(ref.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4
