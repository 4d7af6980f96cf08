"""safetensors files and load_pretrained: resampling, head re-init, architecture mismatches;
the one wrapper-prefix stripper, the strict classifier load, and the train/evaluate boundary."""

from __future__ import annotations

import ast
import io
import os
import pickle
import tokenize
from pathlib import Path

import pytest
import torch

from vitpipe.config.model import MODEL_DEFAULTS
from vitpipe.errors import CheckpointError
from vitpipe.models import MaskedAutoencoder, VisionTransformer
from vitpipe.weights import (
    fetch_weights,
    load_classifier_weights,
    load_pretrained,
    load_safetensors,
    load_state_file,
    save_safetensors,
    strip_wrapper_prefix,
    strip_wrappers,
    unwrap_module,
)

PACKAGE = Path(__file__).resolve().parents[1] / "vitpipe"

SHAPE = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2,
             num_heads=4)


def vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{**MODEL_DEFAULTS, **SHAPE, **kw}).eval()


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


# ---- wrapper prefixes ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "bare"), [
    ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.weight"),
    ("module.blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.weight"),
    ("_orig_mod.head.bias", "head.bias"),
    ("module._orig_mod.head.bias", "head.bias"),      # DDP(compile(model))
    ("_orig_mod.module.head.bias", "head.bias"),      # compile(DDP(model))
    ("module.module._orig_mod.cls_token", "cls_token"),
    ("encoder.module.x", "encoder.module.x"),         # only leading prefixes
    ("modules.x", "modules.x"),
    ("module", "module"),
])
def test_strip_wrapper_prefix(name: str, bare: str) -> None:
    assert strip_wrapper_prefix(name) == bare


def test_strip_wrappers_applies_to_every_key() -> None:
    t = torch.zeros(1)
    assert strip_wrappers({"module.a": t, "_orig_mod.module.b": t, "c": t}) == \
        {"a": t, "b": t, "c": t}


def test_unwrap_module_sees_through_wrappers() -> None:
    class Wrap(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, attr: str) -> None:
            super().__init__()
            setattr(self, attr, inner)

    m = vit()
    assert unwrap_module(m) is m
    assert unwrap_module(Wrap(Wrap(m, "_orig_mod"), "module")) is m
    assert unwrap_module(Wrap(Wrap(m, "module"), "_orig_mod")) is m


# ---- the strict classifier load --------------------------------------------------------------
def test_load_classifier_weights_strips_prefixes_from_file_or_dir(tmp_path: Path) -> None:
    src = vit(seed=1)
    path = save_safetensors({f"module._orig_mod.{k}": v for k, v in src.state_dict().items()},
                            tmp_path / "run" / "model.safetensors")
    for where in (path, path.parent):  # the file, or a directory holding model.safetensors
        dst = vit(seed=2)
        assert load_classifier_weights(dst, where, "runs:/abc/weights") is dst
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k


def test_load_classifier_weights_refuses_another_architecture(tmp_path: Path) -> None:
    path = save_safetensors(vit(depth=3).state_dict(), tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match="another architecture") as err:
        load_classifier_weights(vit(), path, f"s3://bucket/{path.name}")
    msg = str(err.value)
    assert "s3://bucket/deep.safetensors" in msg and "unexpected: blocks.2." in msg
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*head\.weight"):
        load_classifier_weights(vit(num_classes=3), tmp_path / "deep.safetensors", str(path))
    with pytest.raises(CheckpointError, match=r"weights runs:/x .*holds none of \['model"):
        load_classifier_weights(vit(), tmp_path, "runs:/x")  # a dir without model.safetensors
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_classifier_weights(vit(), bad, str(bad))


def test_fetch_weights_local_paths(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert fetch_weights(str(f), tmp_path / "cache") == f
    assert fetch_weights(f"file://{f}", tmp_path / "cache") == f
    with pytest.raises(CheckpointError, match="does not exist"):
        fetch_weights(str(tmp_path / "nope"), tmp_path / "cache")


def test_fetch_weights_downloads_an_s3_prefix(tmp_path: Path, monkeypatch) -> None:
    """An s3:// prefix (not an object) comes down as a directory of its files."""
    from vitpipe import storage

    remote = tmp_path / "bucket" / "run" / "weights"
    (remote / "sub").mkdir(parents=True)
    (remote / "model.safetensors").write_bytes(b"m")
    (remote / "sub" / "x.json").write_bytes(b"{}")
    to_local = {"s3://b/run/weights": str(remote)}
    monkeypatch.setattr(storage, "exists", lambda uri, s3=None: False)
    monkeypatch.setattr(storage, "list_uris", lambda uri, s3=None: [
        "s3://b/run/weights/" + p.relative_to(remote).as_posix()
        for p in sorted(remote.rglob("*")) if p.is_file()] if uri in to_local else [])

    def download_file(uri: str, path: str, s3=None) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes((remote / uri[len("s3://b/run/weights/"):]).read_bytes())
        return Path(path)

    monkeypatch.setattr(storage, "download_file", download_file)
    local = fetch_weights("s3://b/run/weights", tmp_path / "cache")
    assert local == tmp_path / "cache" / "weights"
    assert (local / "model.safetensors").read_bytes() == b"m"
    assert (local / "sub" / "x.json").read_bytes() == b"{}"
    with pytest.raises(CheckpointError, match="s3://b/other does not exist"):
        fetch_weights("s3://b/other", tmp_path / "cache")


# ---- one place for the wrappers, no train <-> evaluate imports -------------------------------
# artifacts.py (owned by the engine rewrite) still imports vitpipe.evaluate.plots, which now
# re-exports vitpipe.plots; drop this entry once it imports ``from ..plots`` instead.
_PENDING: set[tuple[str, str]] = set()


def _imports(source: str, pkg: list[str]) -> set[str]:
    """Absolute names of the modules a module of package ``pkg`` imports (relative imports
    resolved; ``from a import b`` gives ``a`` and ``a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _hits(sub: str, other: str) -> list[tuple[str, str]]:
    """``(file, imported name)`` of every import of ``other`` by a module under ``sub``."""
    hits = []
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        pkg = ["vitpipe", *path.relative_to(PACKAGE).parent.parts]
        hits += [(rel, m) for m in sorted(_imports(path.read_text(), pkg)) if _within(m, other)
                 and not any(rel == f and _within(m, mod) for f, mod in _PENDING)]
    return hits


def test_import_resolution_sees_every_form() -> None:
    pkg = ["vitpipe", "evaluate"]
    for line in ("from ..train.remote import x", "from ..train import remote",
                 "from .. import train", "import vitpipe.train.engine",
                 "from vitpipe.train import train", "def f():\n    from ..train import y\n"):
        assert any(_within(m, "vitpipe.train") for m in _imports(line, pkg)), line
    for line in ("from .train import x", "from ..training import x", "from ..weights import x"):
        assert not any(_within(m, "vitpipe.train") for m in _imports(line, pkg)), line


def test_evaluate_and_train_do_not_import_each_other() -> None:
    assert _hits("evaluate", "vitpipe.train") == []
    assert _hits("train", "vitpipe.evaluate") == []


def _code_tokens(path: Path) -> list[str]:
    """Every token of ``path`` but comments."""
    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.string for t in toks if t.type != tokenize.COMMENT]


def test_only_weights_py_knows_the_wrapper_prefixes() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "weights.py":
            continue
        for tok in _code_tokens(path):
            if "_orig_mod" in tok or tok.strip("\"'").startswith("module."):
                found.append(f"{path.relative_to(PACKAGE)}: {tok}")
    assert found == [], "wrapper prefixes are vitpipe.weights' business"
    assert any("_orig_mod" in t for t in _code_tokens(PACKAGE / "weights.py"))



def test_relative_imports_resolve() -> None:
    """Every relative import in vitpipe/ (lazy ones too) names a module that exists: moving a
    module (as plots.py moved out of evaluate/) must not leave a dangling ``from ..x``."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        pkg = ["vitpipe", *path.relative_to(PACKAGE).parent.parts]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level > len(pkg):
                    bad.append(f"{path.relative_to(PACKAGE)}: beyond the package")
                    continue
                parts = pkg[1:len(pkg) - node.level + 1] + (node.module or "").split(".")
                target = PACKAGE.joinpath(*[p for p in parts if p])
                if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()):
                    bad.append(f"{path.relative_to(PACKAGE)}: {node.module} (level {node.level})")
    assert bad == []


def test_weights_file_finds_the_file_a_fetched_uri_stands_for(tmp_path) -> None:
    from vitpipe.weights import weights_file

    run = tmp_path / "run"
    (run / "artifacts" / "weights").mkdir(parents=True)
    model = run / "artifacts" / "weights" / "model.safetensors"
    model.write_bytes(b"x")
    assert weights_file(model, "w") == model  # a file is itself
    assert weights_file(run, "w") == model  # found below a downloaded folder
    enc = run / "encoder.safetensors"
    enc.write_bytes(b"x")
    assert weights_file(run, "w", ("encoder.safetensors", "model.safetensors")) == enc
    with pytest.raises(CheckpointError, match=r"teacher models:/x@champion .*none of"):
        weights_file(tmp_path / "run" / "artifacts", "teacher models:/x@champion",
                     ("other.safetensors",))
    with pytest.raises(CheckpointError, match="not found"):
        weights_file(tmp_path / "missing", "weights runs:/abc/weights")
