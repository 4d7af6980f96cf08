"""Masked autoencoder: masking invariants, visible-only encoding, masked-only loss, export."""

from __future__ import annotations

import pytest
import torch

from vitpipe.config import MAEConfig, ModelConfig
from vitpipe.config.model import MODEL_DEFAULTS
from vitpipe.models import MaskedAutoencoder, VisionTransformer, build_mae
from vitpipe.models.mae import random_masking


def small_mae(ratio: float = 0.75, pool: str = "token", norm_pix: bool = False
              ) -> MaskedAutoencoder:
    torch.manual_seed(0)
    enc = VisionTransformer(**{**MODEL_DEFAULTS, **dict(
        img_size=16, patch_size=4, in_chans=2, num_classes=0, embed_dim=32, depth=2,
        num_heads=4, global_pool=pool)})
    return MaskedAutoencoder(enc, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                             mask_ratio=ratio, norm_pix_loss=norm_pix)


def test_random_masking_invariants() -> None:
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(16, 4, batch=8)
    assert ids_keep.shape == (8, 4) and ids_restore.shape == (8, 16) and mask.shape == (8, 16)
    assert (mask.sum(1) == 12).all()  # exact masked count in every sample
    for b in range(8):
        assert len(set(ids_keep[b].tolist())) == 4
        assert (mask[b, ids_keep[b]] == 0).all()  # kept patches are the unmasked ones
    # masks differ between samples (per-sample randomness)
    assert len({tuple(m.tolist()) for m in mask}) > 1


def test_restore_indices_invert_the_shuffle() -> None:
    torch.manual_seed(1)
    n = 10
    ids_keep, ids_restore, _ = random_masking(n, 3, batch=4)
    # rebuild ids_shuffle as the inverse of ids_restore and check both directions
    ids_shuffle = ids_restore.argsort(1)
    assert torch.equal(ids_shuffle[:, :3], ids_keep)
    grid = torch.arange(n).expand(4, n)
    shuffled = grid.gather(1, ids_shuffle)
    assert torch.equal(shuffled.gather(1, ids_restore), grid)


def test_forward_shapes_and_mask_counts() -> None:
    mae = small_mae(0.75)
    x = torch.randn(3, 2, 16, 16)
    loss, pred, mask = mae(x)
    assert pred.shape == (3, 16, 4 * 4 * 2) and mask.shape == (3, 16)
    assert (mask.sum(1) == 12).all()
    assert loss.ndim == 0 and torch.isfinite(loss)
    _, _, mask = mae(x, mask_ratio=0.5)
    assert (mask.sum(1) == 8).all()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_encoder_receives_only_visible_tokens(pool: str) -> None:
    mae = small_mae(0.75, pool)
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    mae(torch.randn(3, 2, 16, 16))
    assert seen == [torch.Size([3, mae.encoder.num_prefix_tokens + 4, 32])]


def test_patchify_unpatchify_roundtrip() -> None:
    mae = small_mae()
    x = torch.randn(2, 2, 16, 16)
    p = mae.patchify(x)
    assert p.shape == (2, 16, 32)
    torch.testing.assert_close(mae.unpatchify(p), x)
    # patch 1 (row 0, col 1) holds pixels [0:4, 4:8]; channels last within a pixel
    torch.testing.assert_close(p[0, 1].reshape(4, 4, 2), x[0, :, 0:4, 4:8].permute(1, 2, 0))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_counts_masked_patches_only(norm_pix: bool) -> None:
    mae = small_mae(0.5, norm_pix=norm_pix)
    x = torch.randn(2, 2, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1
    target = mae.patchify(x)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                               + 1e-6) ** 0.5
    pred = target.clone().requires_grad_(True)
    with torch.no_grad():
        pred[:, 1::2] += 100.0  # garbage on visible patches: must not matter
        pred[:, ::2] += 1.0  # error of exactly 1 on every masked pixel
    loss = mae.loss(x, pred, mask)
    assert loss.item() == pytest.approx(1.0, rel=1e-4)
    loss.backward()
    assert pred.grad[:, 1::2].abs().max() == 0
    assert pred.grad[:, ::2].abs().min() > 0


def test_training_step_updates_encoder_and_decoder() -> None:
    mae = small_mae()
    loss, _, _ = mae(torch.randn(2, 2, 16, 16))
    loss.backward()
    for name in ("encoder.blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.fc1.weight",
                 "mask_token", "decoder_pred.weight", "encoder.pos_embed.weight"):
        assert dict(mae.named_parameters())[name].grad.abs().sum() > 0, name


def test_encoder_state_dict_loads_into_classifier() -> None:
    mae = build_mae(ModelConfig(name="vit_tiny_patch7_28", depth=2),
                    MAEConfig(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2))
    assert mae.encoder.num_classes == 0
    sd = mae.encoder_state_dict()
    assert not any(k.startswith(("head.", "decoder", "mask_token")) for k in sd)
    clf = VisionTransformer(**{**MODEL_DEFAULTS, **dict(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=2,
        num_heads=3)})
    missing, unexpected = clf.load_state_dict(sd, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(clf.eval().forward_features(x),
                               mae.encoder.eval().forward_features(x))


def test_mae_config_is_used() -> None:
    mae = build_mae(ModelConfig(name="vit_tiny_patch4_28", depth=1),
                    MAEConfig(mask_ratio=0.5, decoder_embed_dim=24, decoder_depth=3,
                              decoder_num_heads=3, norm_pix_loss=False))
    assert (mae.mask_ratio, len(mae.decoder_blocks), mae.norm_pix_loss) == (0.5, 3, False)
    assert mae.decoder_embed.out_features == 24
    assert "mask_token" in mae.no_weight_decay()
    assert "encoder.cls_token" in mae.no_weight_decay()


def test_bad_mask_ratio() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoder(small_mae().encoder, mask_ratio=1.0)
