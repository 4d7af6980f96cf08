"""Fuzz: with a fixed seed, a few hundred damaged PNG and JPEG samples (byte flips, zeroed
ranges, truncated members, wrong extensions) among good ones in shards made by ``vitpipe shard``,
read by the loader with 2 workers and by ``vitpipe evaluate``, each in a subprocess: both exit
0, every damaged sample is counted and named (its key in the logs), every good sample is read.
A second loader pass with the per-sample checksum off sends the damaged bytes to the image
checks and decoders themselves: still no process death, and every sample accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_data_support import make_imagefolder, refresh_manifest, rewrite_tar
from tests.test_train_support import REPO, TINY, env
from vitpipe.config import ShardConfig
from vitpipe.data import read_manifest, shard

pytestmark = pytest.mark.timeout(120)
PER_CLASS = 150  # per format and class: 600 test samples, half of them damaged
KINDS = ("flip", "zero", "truncate", "ext")


def _mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    n = len(data)
    b = bytearray(data)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, n))] ^= int(rng.integers(1, 256))
    elif kind == "zero":
        lo = int(rng.integers(0, max(n - 8, 1)))
        span = len(b[lo:lo + int(rng.integers(8, 65))])
        b[lo:lo + span] = bytes(span)  # same size
    elif kind == "truncate":
        b = b[:int(rng.integers(0, n))]
    if kind != "ext" and bytes(b) == data:  # zeros over zeros: make sure something changed
        b[0] ^= 0xFF
    return bytes(b)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> tuple[str, set[str], set[str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    train = make_imagefolder(tmp / "train", {"a": 2, "b": 2}, size=(28, 28), mode="L")
    test = make_imagefolder(tmp / "test", {"a": PER_CLASS, "b": PER_CLASS}, size=(28, 28),
                            mode="L", seed=1)
    make_imagefolder(test, {"a": PER_CLASS, "b": PER_CLASS}, size=(28, 28), mode="L",
                     fmt="JPEG", seed=2)
    uri = shard(ShardConfig.model_validate({
        "source": {"kind": "imagefolder", "path": str(train), "test_path": str(test)},
        "output": str(tmp / "shards"), "image_format": "keep", "val_fraction": 0,
        "max_samples_per_shard": 100, "workers": 2}))
    m = read_manifest(uri)
    rng = np.random.default_rng(19)
    bad: set[str] = set()
    good: set[str] = set()
    for name in (s.name for s in m.splits["test"].shards):
        def edit(members):
            out = []
            for ti, data in members:
                key, ext = ti.name.rsplit(".", 1)
                if ext in ("png", "jpg"):
                    if rng.random() < 0.5:
                        kind = KINDS[len(bad) % len(KINDS)]
                        bad.add(key)
                        data = _mutate(data, kind, rng)
                        if kind == "ext":
                            ti.name = f"{key}.{'jpg' if ext == 'png' else 'png'}"
                    else:
                        good.add(key)
                out.append((ti, data))
            return out

        rewrite_tar(Path(uri).parent / name, edit)
    refresh_manifest(uri)  # sizes and hashes as sharded: only the samples are damaged
    assert len(bad) >= 250 and len(good) >= 250
    return uri, good, bad


_LOADER = """
import json, sys
from vitpipe.data import make_loader
out = {}
for verify in (True, False):
    ld = make_loader(sys.argv[1], "test", 32, num_workers=2, train=False, with_keys=True,
                     max_bad_fraction=1.0, verify_sample_crc=verify)
    read = [k for _, y, ks in ld for k, lab in zip(ks, y.tolist()) if lab >= 0]
    out[str(verify)] = {"read": read, "bad": [k for _, k in ld.bad_keys], "n_bad": ld.bad_samples}
print(json.dumps(out))
"""


def _named(log: str, keys: set[str]) -> set[str]:
    return {k for k in keys if f"skipping sample {k} in shard test-" in log}


def test_fuzzed_shards_loader_and_evaluate(fuzzed, tmp_path):
    uri, good, bad = fuzzed
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _LOADER, uri], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    checked = res["True"]
    assert sorted(checked["read"]) == sorted(good)  # every good sample, once
    assert sorted(checked["bad"]) == sorted(bad) and checked["n_bad"] == len(bad)
    assert _named(p.stderr, bad) == bad  # each damaged sample named with its shard
    unchecked = res["False"]  # the image checks / decoders see the damaged bytes themselves
    assert set(good) <= set(unchecked["read"])
    assert len(unchecked["read"]) + unchecked["n_bad"] == len(good) + len(bad)
    assert set(unchecked["bad"]) <= bad

    from vitpipe.config import ModelConfig
    from vitpipe.models import build_from_config
    from vitpipe.weights import save_safetensors

    opts = dict(o.removeprefix("model.").split("=") for o in TINY if o.startswith("model."))
    model = build_from_config(ModelConfig.model_validate({**opts, "num_classes": 2}))
    save_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    p = subprocess.run(
        [sys.executable, "-m", "vitpipe.cli", "evaluate", f"data.manifest={uri}", "split=test",
         f"weights={tmp_path / 'w.safetensors'}", f"output_dir={tmp_path / 'eval'}",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "data.num_workers=2",
         "data.max_bad_fraction=1.0", "data.eval_batch_size=64", "num_attention_images=0",
         *[o for o in TINY if o.startswith("model.")]],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-4000:]
    assert _named(p.stderr, bad) == bad
    payload = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert payload["metrics"]["test_num_samples"] == len(good)
    assert payload["metrics"]["skipped_samples_test"] == len(bad)
    assert sorted(s["key"] for s in payload["skipped_samples"]) == sorted(bad)
    assert time.monotonic() - t0 < 60
