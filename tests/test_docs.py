"""The documentation runs as written (no mocks).

Every code block of README.md and infra/README.md whose fence says ``runnable`` (```bash runnable,
```python runnable) runs in document order in one temporary workspace (the repository's files
linked in, outputs written there): the blocks use the smoke preset, and a block that starts the
local stack stops it again. A block fails the test if it exits non-zero. The README's JSON
request examples are posted to a real ``mlflow models serve`` of the model the blocks
registered. Blocks without ``runnable`` (Kubernetes, GPU, full-length runs) say so in the docs.

The docs may assume an image ``img.png`` in the working directory: the workspace gets a real
Fashion-MNIST test image there.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FMNIST_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason="Fashion-MNIST not installed (make system-deps)")]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = ("README.md", "infra/README.md")
LINKED = ("Makefile", "pyproject.toml", "prefect.yaml", "configs", "flows", "vitpipe", "infra",
          ".venv")
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
CLASSES = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"}


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    info: list[str]
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def doc_blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    return [Block(doc, text[:m.start()].count("\n") + 1, m.group(1), m.group(2).split(),
                  m.group(3)) for m in FENCE.finditer(text)]


RUNNABLE = [b for d in DOCS for b in doc_blocks(d)
            if b.lang in ("bash", "python") and "runnable" in b.info]


def _test_image(i: int, fmt: str) -> bytes:
    """The i-th official Fashion-MNIST test image, encoded as ``fmt``."""
    with gzip.open(FMNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    img = np.frombuffer(raw, np.uint8, 28 * 28, 16 + i * 28 * 28).reshape(28, 28)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Workspace:
    dir: Path
    env: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)

    def run(self, block: Block, timeout: float = 900) -> str:
        argv = (["bash", "-euo", "pipefail", "-c", block.code] if block.lang == "bash"
                else [str(BIN / "python"), "-c", block.code])
        t0 = time.monotonic()
        res = subprocess.run(argv, cwd=self.dir, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        out = res.stdout + res.stderr
        self.outputs[block.id] = out
        first = block.code.strip().splitlines()[0]
        last = (out.strip().splitlines() or [""])[-1][-500:]
        assert res.returncode == 0, (
            f"{block.id} ({block.lang} block starting `{first}`) exited {res.returncode} "
            f"after {time.monotonic() - t0:.0f}s with: {last}\nits output ends:\n{out[-3000:]}")
        print(f"{block.id}: ok in {time.monotonic() - t0:.0f}s")
        return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    d = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (d / name).symlink_to(ROOT / name)
    (d / "img.png").write_bytes(_test_image(0, "PNG"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    # the system PATH only: a block must activate .venv itself, as a user in a new shell would
    path = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != BIN.resolve())
    env.update({"PATH": path, "HOME": str(d), "PREFECT_HOME": str(d / ".prefect")})
    env.pop("VIRTUAL_ENV", None)
    ws = Workspace(d, env)
    try:
        yield ws
    finally:
        for state in d.glob("*/stack.json"):  # a block that failed before `stack down`
            subprocess.run([str(BIN / "vitpipe"), "stack", "down", "--dir", str(state.parent)],
                           cwd=d, env=env, capture_output=True, timeout=120)


def test_docs_have_runnable_blocks_and_mark_the_others() -> None:
    """Both guides have runnable blocks; the smoke preset is what they run."""
    for doc in DOCS:
        runnable = [b for b in RUNNABLE if b.doc == doc]
        assert runnable, f"{doc} has no ```bash runnable block"
        assert any("configs/fmnist_smoke.yaml" in b.code for b in runnable), doc
    for b in (b for d in DOCS for b in doc_blocks(d)):
        if b.lang == "bash" and "runnable" not in b.info:
            assert "not run by tests/test_docs.py" in b.code, (
                f"{b.id}: a bash block that is not runnable must say why "
                "(`# not run by tests/test_docs.py: ...`)")


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_runnable_block_exits_zero(workspace: Workspace, block: Block) -> None:
    workspace.run(block)


def test_smoke_run_logs_no_error(workspace: Workspace) -> None:
    """A clean embedded run prints no ERROR line (prefect #18934: the telemetry heartbeat's
    "database is locked" traceback at start-up)."""
    runs = {k: v for k, v in workspace.outputs.items() if "== vitpipe: fmnist-smoke done" in v}
    assert runs, "no runnable block ran the smoke pipeline in the embedded mode"
    for block_id, out in runs.items():
        bad = [ln for ln in out.splitlines() if "ERROR" in ln or "database is locked" in ln]
        assert not bad, f"{block_id} logged:\n" + "\n".join(bad[:10])


def _json_examples() -> list[dict]:
    blocks = [b for b in doc_blocks("README.md") if b.lang == "json"]
    docs = [json.loads(ln) for b in blocks for ln in b.code.splitlines() if ln.strip()]
    assert docs, "README.md has no JSON request example"
    return docs


def _fill(value, images: Iterator[str]):
    """Replace the docs' ``"<base64 ...>"`` / ``"..."`` placeholders by real encoded images."""
    if isinstance(value, dict):
        return {k: v if k == "params" else _fill(v, images) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, images) for v in value]
    if isinstance(value, str) and (value.startswith("<base64") or value == "..."):
        return next(images)
    return value


def test_json_examples_answer_from_mlflow_models_serve(workspace: Workspace) -> None:
    from vitpipe.stack.mlflow_server import start_model_server

    readme = (ROOT / "README.md").read_text()
    m = re.search(r"mlflow models serve -m (\S+)", readme)
    assert m, "README.md shows no `mlflow models serve -m <uri>` command"
    db = workspace.dir / "mlflow.db"
    assert db.exists(), "the runnable blocks registered no model in ./mlflow.db"
    images = iter([base64.b64encode(_test_image(i, "JPEG" if i % 2 else "PNG")).decode()
                   for i in range(100)])
    with start_model_server(m.group(1).strip("`"), f"sqlite:///{db}", workspace.dir,
                            env={"PATH": os.pathsep.join([str(BIN), workspace.env["PATH"]])}
                            ) as server:
        for example in _json_examples():
            body = _fill(example, images)
            rows = (body.get("dataframe_split", {}).get("data") or body.get("inputs"))
            req = urllib.request.Request(server.invocations_url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 200
                preds = json.loads(r.read())["predictions"]
            assert len(preds) == len(rows), (example, preds)
            k = body.get("params", {}).get("top_k")
            for p in preds:
                assert p["error"] in (None, ""), p
                assert p["label"] in CLASSES and p["top_k_labels"][0] == p["label"]
                if k:
                    assert len(p["top_k_probs"]) == k

