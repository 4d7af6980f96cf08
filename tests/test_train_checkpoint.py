"""Checkpoint manager: atomic layout, rotation, auto-resume, verification, clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from vitpipe.errors import CheckpointError
from vitpipe.models import build_model
from vitpipe.train.checkpoint import MARKER, CheckpointManager, check_architecture, rng_fingerprint
from vitpipe.train.ema import ModelEma


@pytest.fixture
def acc():
    a = Accelerator(cpu=True)
    yield a
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny(depth=2, dim=32):
    return build_model("vit_tiny_patch7_28", depth=depth, embed_dim=dim, num_heads=2,
                       num_classes=10)


def state(step):
    return {"step": step, "accum_steps": 1, "cursor": {"step": step, "epoch": 0,
                                                       "batch_in_epoch": step}}


def _one_step(model, opt):
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_save_rotate_auto_and_exact_restore(acc, tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    ema = ModelEma(model, 0.9)
    mgr = CheckpointManager(acc, str(tmp_path / "ckpt"), keep_last=2, staging=tmp_path / "stg")
    assert mgr.latest() is None
    for step in (1, 2, 3):
        _one_step(model, opt)
        acc.step = step
        ema.update(model)
        uri = mgr.save(step, state(step), ema)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_000000002", "step_000000003"]  # keep_last=2, no tmp left
    assert mgr.latest() == uri and (tmp_path / "ckpt" / "step_000000003" / MARKER).is_file()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ema_saved = {k: v.clone() for k, v in ema.state_dict().items()}
    fp = rng_fingerprint()
    torch.rand(5)
    random.random()
    _one_step(model, opt)
    got = mgr.load(mgr.resolve("auto"), model, ema)
    assert got["step"] == 3
    assert rng_fingerprint() == fp
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema_saved[k]), k


def test_incomplete_checkpoint_is_ignored_and_refused(acc, tmp_path):
    model = acc.prepare(tiny())
    mgr = CheckpointManager(acc, str(tmp_path), keep_last=3, staging=tmp_path / "stg")
    mgr.save(5, state(5))
    half = tmp_path / "step_000000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    assert mgr.latest().endswith("step_000000005")  # no marker -> not a candidate
    with pytest.raises(CheckpointError, match="incomplete"):
        mgr.load(str(half), model)
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.load(str(tmp_path / "nope"), model)


def test_rng_mismatch_stops_loudly(acc, tmp_path):
    model = acc.prepare(tiny())
    mgr = CheckpointManager(acc, str(tmp_path), keep_last=1, staging=tmp_path / "stg")
    uri = mgr.save(1, state(0))
    (tmp_path / "step_000000001" / "rng_check_0.json").write_text(
        json.dumps({"rank": 0, "rng": "0" * 64}))
    with pytest.raises(CheckpointError, match="RNG state"):
        mgr.load(uri, model)


def test_checkpoint_from_another_architecture(acc, tmp_path):
    mgr = CheckpointManager(acc, str(tmp_path), keep_last=1, staging=tmp_path / "stg")
    uri = mgr.save(1, state(1))  # no model registered: write one by hand
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny(depth=1, dim=48).state_dict().items()},
              f"{uri}/model.safetensors")
    with pytest.raises(CheckpointError, match="another architecture") as err:
        check_architecture(tmp_path / "step_000000001" / "model.safetensors", tiny(), uri)
    assert "missing" in str(err.value) and "shape" in str(err.value)
    assert uri in str(err.value)


@pytest.mark.parametrize("kind", ["vit_tiny_conv4_28", "mae", "avg_pool_factorized"])
def test_round_trip_per_model_config(acc, tmp_path, kind):
    """accelerate #2807: save_state/load_state must round-trip every model shape."""
    from vitpipe.config import MAEConfig, ModelConfig
    from vitpipe.models import build_mae

    small = dict(depth=1, embed_dim=32, num_heads=2)
    if kind == "mae":
        model = build_mae(ModelConfig(name="vit_tiny_patch7_28", **small),
                          MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))
    elif kind == "avg_pool_factorized":
        model = build_model("vit_tiny_patch7_28", global_pool="avg", pos_embed="factorized",
                            num_classes=10, **small)
    else:
        model = build_model(kind, num_classes=10, **small)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    out = model(torch.randn(2, 1, 28, 28))
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    opt.step()
    acc.step = 1
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(acc, str(tmp_path), keep_last=1, staging=tmp_path / "stg")
    uri = mgr.save(1, state(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.load(uri, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert opt.state_dict()["state"][0]["step"] == 1
