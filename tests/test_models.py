"""ViT layers, variants, position embeddings, attention paths and interpretability helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitpipe.config import ConfigError, ModelConfig
from vitpipe.config.model import MODEL_DEFAULTS
from vitpipe.models import VisionTransformer, build_from_config, build_model, list_models, resolve
from vitpipe.models.interpret import attention_rollout, cls_attention, overlay
from vitpipe.models.layers import Attention, Block, ConvStem, DropPath
from vitpipe.models.pos_embed import PosEmbed, sincos_2d

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
            num_heads=4)


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**MODEL_DEFAULTS, **TINY, **kw}).eval()


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_28")])
def test_small_image_variants_run(name: str) -> None:
    m = build_model(name).eval()
    assert (m.img_size, m.in_chans, m.num_classes) == (28, 1, 10)
    x = torch.randn(2, 1, 28, 28)
    gh, gw = m.grid_size
    assert gh * m.patch_size == 28 and gw * m.patch_size == 28
    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_prefix_tokens + gh * gw, m.embed_dim)
    assert m.forward_head(feats).shape == (2, 10)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.embed_dim)


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_224")])
def test_imagenet_variants_shapes_on_meta(name: str) -> None:
    """Big variants are built on the meta device: shapes without allocating weights."""
    with torch.device("meta"):
        m = build_model(name)
        out = m(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert m.grid_size == (224 // m.patch_size,) * 2


def test_named_variants_match_the_vit_paper() -> None:
    expect = {"vit_tiny_patch16_224": (192, 12, 3), "vit_small_patch16_224": (384, 12, 6),
              "vit_base_patch16_224": (768, 12, 12), "vit_large_patch16_224": (1024, 24, 16),
              "vit_huge_patch14_224": (1280, 32, 16), "vit_large_patch14_224": (1024, 24, 16)}
    for name, (d, depth, heads) in expect.items():
        kw = resolve(name)
        assert (kw["embed_dim"], kw["depth"], kw["num_heads"]) == (d, depth, heads), name
    assert ModelConfig().name == "vit_tiny_patch4_28"
    assert resolve("vit_tiny_conv4_28")["stem"] == "conv"


@pytest.mark.parametrize("kind", ["learned", "factorized", "sincos"])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_pos_embed_kinds_and_pooling(kind: str, pool: str) -> None:
    m = tiny(pos_embed=kind, global_pool=pool)
    x = torch.randn(3, 3, 16, 16)
    assert m.forward_features(x).shape == (3, (pool == "token") + 16, 32)
    assert m(x).shape == (3, 5)
    names = {n for n, _ in m.named_parameters()}
    assert {"learned": "pos_embed.weight" in names, "factorized": "pos_embed.row" in names,
            "sincos": not any(n.startswith("pos_embed") for n in names)}[kind]
    assert "pos_embed.weight" not in m.state_dict() or kind == "learned"


def test_factorized_is_row_plus_column() -> None:
    pe = PosEmbed("factorized", (2, 3), 4)
    torch.nn.init.normal_(pe.row)
    torch.nn.init.normal_(pe.col)
    table = pe.table()[0].reshape(2, 3, 4)
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(table[r, c], pe.row[0, r] + pe.col[0, c])


def test_sincos_table_is_fixed_and_distinct() -> None:
    t = sincos_2d((4, 5), 16)
    assert t.shape == (20, 16)
    assert torch.cdist(t, t).add(torch.eye(20)).min() > 0.1  # every position distinct
    assert t.abs().max() <= 1.0


@pytest.mark.parametrize("kind", ["learned", "factorized", "sincos"])
def test_set_img_size_resamples_pos_embed(kind: str) -> None:
    m = tiny(pos_embed=kind)
    before = m.pos_embed.table().detach().clone()
    m.set_img_size(24)
    assert m.grid_size == (6, 6)
    table = m.pos_embed.table()
    assert table.shape == (1, 36, 32)
    assert m(torch.randn(1, 3, 24, 24)).shape == (1, 5)
    if kind == "sincos":
        torch.testing.assert_close(table[0], sincos_2d((6, 6), 32))
    # back to the original grid: bicubic resampling of a smooth upsample is close to identity
    m.set_img_size(16)
    assert m.pos_embed.table().shape == before.shape
    if kind == "sincos":
        torch.testing.assert_close(m.pos_embed.table(), before)


def test_resample_keeps_a_constant_table_constant() -> None:
    pe = PosEmbed("learned", (4, 4), 8)
    with torch.no_grad():
        pe.weight.fill_(0.25)
    pe.set_grid((7, 7))
    torch.testing.assert_close(pe.weight, torch.full((1, 49, 8), 0.25))


def test_wrong_image_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="set_img_size"):
        tiny()(torch.randn(1, 3, 20, 20))


def test_conv_stem_grid_matches_patch_grid() -> None:
    stem = ConvStem(28, 4, 1, 96)
    assert stem(torch.randn(2, 1, 28, 28)).shape == (2, 49, 96)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in stem.modules()) == 2
    odd = ConvStem(28, 7, 1, 96)  # one stride-1 conv, then a 7x7/7 projection
    x = torch.randn(2, 1, 28, 28)
    assert odd(x).shape == (2, 16, 96)
    assert [c.stride for c in odd.modules() if isinstance(c, torch.nn.Conv2d)] == [(1, 1)]
    conv = torch.nn.Conv2d(24, 96, 7, stride=7)  # the projection is exactly this conv
    with torch.no_grad():
        conv.weight.copy_(odd.proj.weight.view(96, 24, 7, 7))
        conv.bias.copy_(odd.proj.bias)
    ref = conv(odd.stem(x)).flatten(2).transpose(1, 2)
    assert torch.allclose(odd(x), ref, atol=1e-5)
    assert ConvStem(56, 14, 1, 96)(torch.randn(1, 1, 56, 56)).shape == (1, 16, 96)  # 2 * 7
    assert build_model("vit_tiny_conv4_28").grid_size == (7, 7)
    assert build_model("vit_tiny_conv7_28").grid_size == (4, 4)


def test_conv_stem_widths_put_stride_1_stages_first() -> None:
    def convs(m):
        return [(c.out_channels, c.stride[0]) for c in m.modules()
                if isinstance(c, torch.nn.Conv2d)]

    deep = build_model("vit_tiny_conv7_28", stem_widths=(16, 32))
    assert convs(deep.patch_embed) == [(16, 1), (32, 1)]
    assert deep.patch_embed.proj.in_features == 32 * 7 * 7
    assert deep(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    four = build_model("vit_tiny_conv4_28", stem_widths=(8, 16, 32))
    assert convs(four.patch_embed) == [(8, 1), (16, 2), (32, 2)]
    assert four.patch_embed(torch.randn(1, 1, 28, 28)).shape == (1, 49, 96)


def test_sdpa_matches_explicit_attention_math() -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 9, 32)
    fast = attn(x)
    slow, probs = attn(x, return_attn=True)
    # independent reference: per-head softmax(q k^T / sqrt(d)) v written out by hand
    qkv = attn.qkv(x).reshape(2, 9, 3, 4, 8)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ref_p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    ref = attn.proj((ref_p @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, ref_p, atol=1e-6, rtol=1e-5)


def test_attention_maps_are_probabilities() -> None:
    m = tiny()
    maps = m.attention_maps(torch.randn(2, 3, 16, 16))
    assert len(maps) == m.depth
    for a in maps:
        assert a.shape == (2, 4, 17, 17)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 17))


def test_attention_maps_path_gives_same_features() -> None:
    m = tiny()
    x = torch.randn(2, 3, 16, 16)
    t = m._prepend_prefix(m.embed_patches(x))
    for blk in m.blocks:
        t, _ = blk(t, return_attn=True)
    torch.testing.assert_close(m.norm(t), m.forward_features(x), atol=1e-5, rtol=1e-5)


def test_drop_path_identity_in_eval_and_drops_in_train() -> None:
    dp = DropPath(0.5)
    x = torch.randn(64, 3, 4)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    dropped = (y == 0).flatten(1).all(1)
    assert 10 < dropped.sum() < 54  # about half the samples dropped
    torch.testing.assert_close(y[~dropped], x[~dropped] * 2)  # survivors rescaled by 1/keep
    m = tiny(drop_path_rate=0.3, drop_rate=0.1)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(m.eval()(x), m(x))  # deterministic in eval


def test_tta_hflip_averages_the_mirror_in_eval_only() -> None:
    plain, tta = tiny(), tiny(tta_hflip=True)
    tta.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = (plain(x) + plain(x.flip(-1))) / 2
        got = tta(x)
        assert not torch.allclose(plain(x), want)  # the mirror changes the logits
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(tta(x.flip(-1)), got)  # mirror-invariant by construction
        torch.testing.assert_close(tta.train()(x), plain.train()(x))  # training sees one view
    cfg = ModelConfig(name="vit_tiny_conv7_28", tta_hflip=True)
    assert build_from_config(cfg).tta_hflip and not build_model("vit_tiny_conv7_28").tta_hflip


def test_stochastic_depth_rate_grows_linearly() -> None:
    m = tiny(depth=3, drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, "p", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_layer_scale_starts_small() -> None:
    blk = Block(16, 2, layer_scale_init=1e-6).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(blk(x), x, atol=1e-4, rtol=0)
    assert {n for n, _ in blk.named_parameters()} >= {"ls1.gamma", "ls2.gamma"}


def test_embed_patches_forward_tokens_split() -> None:
    m = tiny()
    x = torch.randn(2, 3, 16, 16)
    tokens = m.embed_patches(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(m.forward_tokens(tokens), m.forward_features(x))
    assert m.forward_tokens(tokens[:, :5]).shape == (2, 6, 32)  # any subset of patches


def test_trainer_hooks() -> None:
    m = tiny(layer_scale_init=0.1)
    assert m.no_weight_decay() == {"pos_embed.weight", "cls_token"}
    assert tiny(pos_embed="factorized").no_weight_decay() == {
        "pos_embed.row", "pos_embed.col", "cls_token"}
    ids = {n: m.layer_id(n) for n, _ in m.named_parameters()}
    assert ids["patch_embed.proj.weight"] == ids["cls_token"] == ids["pos_embed.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    assert ids["norm.weight"] == ids["head.weight"] == m.depth + 1
    assert set(ids.values()) == set(range(m.depth + 2))


def test_reset_classifier() -> None:
    m = tiny()
    m.reset_classifier(7)
    assert m.num_classes == 7 and m(torch.randn(1, 3, 16, 16)).shape == (1, 7)
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 32)


def test_init_recipe() -> None:
    m = build_model("vit_small_patch4_28")
    assert m.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.blocks[0].attn.qkv.bias.abs().max() == 0
    assert m.cls_token.abs().max() < 1e-4
    z = build_model("vit_tiny_patch4_28", zero_head=True)
    assert z.head.weight.abs().max() == 0


def test_build_from_config_and_overrides() -> None:
    m = build_from_config(ModelConfig(name="vit_tiny_patch7_28", depth=2, num_classes=3))
    assert (m.depth, m.num_classes, m.grid_size) == (2, 3, (4, 4))


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(ConfigError, match="vit_tiny_patch4_28"):
        build_model("vit_tiny_patch4_82")


@pytest.mark.parametrize(("over", "msg"), [
    ({"patch_size": 5}, "patch_size=5 does not divide model.img_size=28"),
    ({"num_heads": 5}, "num_heads=5 does not divide model.embed_dim=96"),
    ({"depht": 3}, "did you mean 'depth'"),
    ({"pos_embed": "rope"}, "pos_embed"),
    ({"stem_widths": (16,)}, "stem_widths needs model.stem=conv"),
    ({"stem": "conv", "stem_widths": (16,)}, r"patch 4 needs at least 2 positive width\(s\)"),
])
def test_bad_overrides_are_config_errors(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        build_model("vit_tiny_patch4_28", **over)


def test_attention_rollout_and_cls_attention() -> None:
    m = tiny()
    x = torch.randn(2, 3, 16, 16)
    roll = attention_rollout(m, x)
    assert roll.shape == (2, 4, 4)
    torch.testing.assert_close(roll.sum((1, 2)), torch.ones(2))
    cls = cls_attention(m, x)
    assert cls.shape == (2, 4, 4, 4)
    last = m.attention_maps(x)[-1]
    torch.testing.assert_close(cls.flatten(2), last[:, :, 0, 1:])
    assert attention_rollout(tiny(global_pool="avg"), x).shape == (2, 4, 4)


def test_rollout_of_identity_attention_is_uniform_over_cls() -> None:
    """With uniform attention every token mixes equally: rollout is uniform over patches."""
    m = tiny()
    for blk in m.blocks:
        torch.nn.init.zeros_(blk.attn.qkv.weight)
        torch.nn.init.zeros_(blk.attn.qkv.bias)
    roll = attention_rollout(m, torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(roll, torch.full((1, 4, 4), 1 / 16))


def test_overlay_returns_rgb_uint8() -> None:
    img = torch.rand(1, 28, 28)
    heat = torch.zeros(7, 7)
    heat[0, 0] = 1.0
    out = overlay(img, heat, alpha=1.0)
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[27, 27])  # hot corner coloured differently
    assert overlay(np.random.rand(28, 28, 3), heat).shape == (28, 28, 3)
    with pytest.raises(ValueError, match="heat"):
        overlay(img, torch.zeros(2, 7, 7))


def test_gradients_reach_every_parameter() -> None:
    m = tiny(pos_embed="factorized", layer_scale_init=0.1).train()
    F.cross_entropy(m(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("over", [{}, {"layer_scale_init": 0.1, "qkv_bias": False},
                                  {"global_pool": "avg"}])
def test_forward_equals_full_features_path_with_gradients(over: dict) -> None:
    """forward() runs the last block for the class token only: same logits, same gradients."""
    m = tiny(**over).double().train()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    fast = m(x)
    fast.square().sum().backward()
    g_fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    full = m.forward_head(m.forward_features(x))
    full.square().sum().backward()
    torch.testing.assert_close(fast, full)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, msg=n)


def test_forward_queries_matches_full_block() -> None:
    blk = Block(32, 4, layer_scale_init=0.5).eval()
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(blk.forward_queries(x, 3), blk(x)[:, :3])
