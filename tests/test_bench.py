"""Every benchmark runs end to end in a tiny mode and ends with its JSON line.

The benches build their models and configs from the committed presets (``bench/train_speed.py``
reads ``configs/fmnist_cpu.yaml``), so a preset change can break one without any library test
noticing. These runs take the same argument parsing and config building as a run with no
arguments, on sizes that take seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FMNIST_DIR

ROOT = Path(__file__).resolve().parents[1]

BENCHES = {
    "model_speed.py": (["--quick", "--depth", "1", "--batch", "2", "--warmup", "0"],
                       {"ours_img_s", "timm_img_s", "ours_over_timm", "mae_over_supervised"}),
    "train_speed.py": (["--quick", "--repeats", "1", "--steps", "1", "--warmup", "0"],
                       {"sup_img_s", "mae_img_s", "engine_over_bare", "mae_over_sup_step",
                        "vits16"}),
    "serve_speed.py": (["--quick", "--batch", "4"], {"pyfunc_over_bare", "serve_req_s",
                                                        "onnx_over_pyfunc"}),
    "score_speed.py": (["--quick"], {"flow_img_s", "bare_img_s", "flow_over_bare"}),
    "data_speed.py": (["--fmnist-count", "1000", "--color-count", "200"],
                      {"wds_over_imagefolder", "wds_over_decode_ceiling",
                       "color_wds_over_decode_ceiling", "crc_cost", "color_crc_cost",
                       "tar_parse_tario_over_tarfile", "resume_skip_tario_over_tarfile"}),
}


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (make system-deps)")
@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_bench_runs_and_ends_with_its_json_line(bench: str, tmp_path: Path) -> None:
    args, keys = BENCHES[bench]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / bench), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{bench} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert keys <= result.keys(), f"{bench}: missing {keys - result.keys()} in {last}"
    ratios = [v for k, v in result.items() if "_over_" in k and isinstance(v, int | float)]
    assert ratios and all(v > 0 for v in ratios)
