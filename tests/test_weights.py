"""safetensors files and load_pretrained: resampling, head re-init, architecture mismatches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from vitpipe.errors import CheckpointError
from vitpipe.models import MaskedAutoencoder, VisionTransformer
from vitpipe.weights import (
    load_pretrained,
    load_safetensors,
    load_state_file,
    save_safetensors,
)

SHAPE = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2,
             num_heads=4)


def vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{**SHAPE, **kw}).eval()


def test_safetensors_round_trip(tmp_path: Path) -> None:
    m = vit()
    path = save_safetensors(m.state_dict(), tmp_path / "sub" / "model.safetensors",
                            metadata={"model": "tiny", "step": 12, "classes": ["a", "b"]})
    sd, meta = load_safetensors(path)
    assert meta == {"model": "tiny", "step": "12", "classes": '["a", "b"]'}
    assert sd.keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert not list(path.parent.glob(".*"))  # no temp files left behind


def test_save_handles_shared_and_non_contiguous(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    sd = {"a": w, "b": w, "t": w.t(), "row0": w[0], "row1": w[1]}
    out, _ = load_safetensors(save_safetensors(sd, tmp_path / "x.safetensors"))
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def test_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_safetensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_safetensors(bad)


def test_pickles_are_read_weights_only(tmp_path: Path) -> None:
    m = vit()
    good = tmp_path / "ckpt.pth"
    torch.save({"model": m.state_dict(), "step": 3}, good)
    assert load_state_file(good).keys() == m.state_dict().keys()

    marker = tmp_path / "code_ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for i, write in enumerate((lambda p: torch.save({"w": Evil()}, p),
                               lambda p: p.write_bytes(pickle.dumps({"w": Evil()}, protocol=2)))):
        evil = tmp_path / f"evil{i}.bin"
        write(evil)
        with pytest.raises(CheckpointError, match="weights_only"):
            load_state_file(evil)
        assert not marker.exists()


def test_load_pretrained_same_shape_is_exact() -> None:
    src, dst = vit(0), vit(1)
    report = load_pretrained(dst, src.state_dict())
    assert report["loaded"] == len(src.state_dict()) and not report["reinitialized"]
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("kind", ["learned", "factorized"])
def test_load_pretrained_resamples_pos_embed(kind: str) -> None:
    src = vit(pos_embed=kind)
    dst = vit(1, pos_embed=kind, img_size=24)
    report = load_pretrained(dst, src.state_dict())
    assert len(report["resampled"]) == (1 if kind == "learned" else 2)
    assert dst.pos_embed.table().shape == (1, 36, 32)
    assert dst(torch.randn(1, 1, 24, 24)).shape == (1, 5)
    # resampling follows the source table: a corner stays near the source's corner
    src_t = src.pos_embed.table()[0].reshape(4, 4, 32)
    dst_t = dst.pos_embed.table()[0].reshape(6, 6, 32)
    corner_err = (dst_t[0, 0] - src_t[0, 0]).norm()
    other_err = (dst_t[0, 0] - src_t[3, 3]).norm()
    assert corner_err < other_err


def test_load_pretrained_sincos_needs_no_resampling() -> None:
    src = vit(pos_embed="sincos")
    dst = vit(1, pos_embed="sincos", img_size=32)
    assert load_pretrained(dst, src.state_dict())["resampled"] == []


def test_load_pretrained_reinitializes_head_on_class_mismatch() -> None:
    src = vit(num_classes=5)
    dst = vit(1, num_classes=3)
    report = load_pretrained(dst, src.state_dict())
    assert report["reinitialized"] == ["head.weight", "head.bias"]
    assert dst.head.weight.shape == (3, 32)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_load_pretrained_from_mae_encoder_and_whole_mae() -> None:
    enc = vit(num_classes=0)
    mae = MaskedAutoencoder(enc, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    clf = vit(1, num_classes=5)
    report = load_pretrained(clf, mae.encoder_state_dict())
    assert report["reinitialized"] == ["head.weight", "head.bias"]
    clf2 = vit(2, num_classes=5)
    report = load_pretrained(clf2, {f"module.{k}": v for k, v in mae.state_dict().items()})
    assert "mask_token" in report["ignored"]
    assert any(k.startswith("decoder_blocks.") for k in report["ignored"])
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(clf2.forward_features(x), enc.forward_features(x))


def test_load_pretrained_maps_final_norm_across_pooling() -> None:
    src = vit()  # token pooling: `norm`
    dst = vit(1, global_pool="avg")  # avg pooling: `fc_norm`
    with pytest.raises(CheckpointError, match="cls_token"):  # avg model has no class token
        load_pretrained(dst, src.state_dict())
    sd = {k: v for k, v in src.state_dict().items() if k != "cls_token"}
    report = load_pretrained(dst, sd)
    assert report["mapped"] == ["norm -> fc_norm"]
    torch.testing.assert_close(dst.fc_norm.weight, src.norm.weight)


def test_load_pretrained_names_mismatched_keys() -> None:
    dst = vit()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, vit(embed_dim=48, num_heads=4).state_dict())
    msg = str(err.value)
    assert "shape mismatch" in msg and "blocks.0.attn.qkv.weight" in msg and "(144, 48)" in msg
    with pytest.raises(CheckpointError, match=r"missing: blocks\.2\."):
        load_pretrained(vit(depth=3), dst.state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.2\."):
        load_pretrained(dst, vit(depth=3).state_dict())
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_pretrained(vit(pos_embed="sincos"), dst.state_dict())
