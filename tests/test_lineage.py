"""The inputs digest: what decides the weights changes it, where things go does not."""

from __future__ import annotations

from vitpipe.config import PipelineConfig
from vitpipe.lineage import inputs_digest


def _d(**over) -> str:
    return inputs_digest(PipelineConfig.model_validate(over), "data-v1", code="c1")


def test_the_digest_follows_what_is_trained_not_where_it_goes() -> None:
    base = _d()
    assert base == _d()  # deterministic
    # where things go: same digest
    assert _d(name="other") == base
    assert _d(finetune={"output_dir": "elsewhere", "checkpoint": {"dir": "x"}}) == base
    assert _d(launch={"max_retries": 5}) == base
    assert _d(orchestration={"stages": "subflows"}) == base
    # what is trained: another digest
    assert _d(model={"name": "vit_small_patch16_224"}) != base
    assert _d(finetune={"train": {"epochs": 3}}) != base
    assert _d(seed=1) != base
    assert _d(register={"margin": 0.01}) != base
    assert inputs_digest(PipelineConfig(), "data-v2", code="c1") != base
    assert inputs_digest(PipelineConfig(), "data-v1", code="c2") != base
