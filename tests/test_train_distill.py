"""The ``distill`` task: the student learns the teacher's labels (DeiT hard distillation), the
teacher loads from a file or a registered model, and the run registers like any other."""

from __future__ import annotations

import mlflow
import pytest
import torch
import torch.nn.functional as F

from tests.test_train_support import TINY, make_shards, train_cfg, train_overrides
from vitpipe.config import ModelConfig, RegisterConfig, TrackingConfig, load
from vitpipe.config.train import TrainConfig
from vitpipe.errors import CheckpointError
from vitpipe.models import build_from_config
from vitpipe.train import train
from vitpipe.train.result_file import read_result
from vitpipe.train.tasks import get_task
from vitpipe.train.tasks.base import Setup
from vitpipe.weights import save_safetensors

MODEL = ModelConfig(name="vit_tiny_patch7_28", depth=2, embed_dim=32, num_heads=2)
FAVOURITE = 3


def _always(cls: int, path, num_classes: int = 10):
    """A teacher that predicts ``cls`` for every image: zero head weights, one large bias."""
    net = build_from_config(MODEL.model_copy(update={"num_classes": num_classes}))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(-10.0)
        net.head.bias[cls] = 10.0
    save_safetensors(net.state_dict(), path, metadata={
        "model": MODEL.model_dump_json(), "num_classes": str(num_classes), "mode": "supervised"})
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 240, 60)


def _task(tmp_path, teacher: str, alpha: float):
    from accelerate import Accelerator

    cfg = load(TrainConfig, None, ["mode=distill", f"distill.teacher={teacher}",
                                   f"distill.alpha={alpha}", "train.label_smoothing=0", *TINY])
    task = get_task(cfg)
    student = task.build_model(10)
    task.setup(student, Setup(Accelerator(cpu=True), tmp_path, None))
    return task, student


def test_the_loss_is_the_teachers_labels_blended_with_the_true_ones(tmp_path):
    teacher = _always(FAVOURITE, tmp_path / "t.safetensors")
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 4, 5, 6])
    for alpha in (0.0, 0.3, 1.0):
        task, student = _task(tmp_path, teacher, alpha)
        out = student(x).float()
        want = ((1 - alpha) * F.cross_entropy(out, y)
                + alpha * F.cross_entropy(out, torch.full_like(y, FAVOURITE)))
        torch.testing.assert_close(task.loss(student, x, y), want)
    assert not any(p.requires_grad for p in task.teacher.parameters())  # frozen


def test_a_teacher_of_other_classes_or_without_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="predicts 5 classes"):
        _task(tmp_path, _always(1, tmp_path / "five.safetensors", num_classes=5), 0.5)
    bare = tmp_path / "bare.safetensors"
    save_safetensors({"w": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match="no vitpipe model metadata"):
        _task(tmp_path, str(bare), 0.5)
    with pytest.raises(ValueError, match="needs 'distill.teacher'"):
        load(TrainConfig, None, ["mode=distill"])


def _share_of(model_path: str, shards: str, cls: int) -> float:
    """Share of the official test images (of the shard set) the weights predict as ``cls``."""
    from vitpipe.config import AugmentConfig
    from vitpipe.data import make_loader, read_manifest
    from vitpipe.data.transforms import build_eval_transform
    from vitpipe.weights import load_safetensors

    net = build_from_config(MODEL.model_copy(update={"num_classes": 10})).eval()
    net.load_state_dict(load_safetensors(model_path)[0])
    hits = n = 0
    with torch.no_grad():
        tf = build_eval_transform(AugmentConfig(), read_manifest(shards), 28)
        for x, _ in make_loader(shards, "test", 120, rank=0, world_size=1, num_workers=0,
                                transform=tf, train=False):
            hits += int((net(x).argmax(-1) == cls).sum())
            n += len(x)
    return hits / n


def test_a_teacher_that_always_says_3_pulls_the_student_to_3_then_it_registers(tmp_path,
                                                                              shards):
    from vitpipe.cli import main as cli_main
    from vitpipe.registry import register

    teacher = _always(FAVOURITE, tmp_path / "t.safetensors")
    common = ["train.epochs=3", "train.lr=3e-3", "data.batch_size=32", "train.warmup_epochs=0"]
    runs = {}
    for alpha in (1.0, 0.0):
        res = train(train_cfg(tmp_path / f"a{alpha}", shards, "mode=distill", *common,
                              f"distill.teacher={teacher}", f"distill.alpha={alpha}"))
        runs[alpha] = res
    pulled = _share_of(runs[1.0]["weights"], shards, FAVOURITE)
    free = _share_of(runs[0.0]["weights"], shards, FAVOURITE)
    assert pulled > 0.9 and free < 0.5, (pulled, free)

    store = f"sqlite:///{tmp_path / 'a0.0'}/mlflow.db"  # the alpha=0 run's own store
    tracking = TrackingConfig(uri=store, experiment="test")
    # a distill run is a classifier's run: `vitpipe evaluate --run` takes it like any other
    assert cli_main(["evaluate", "--run", runs[0.0]["run_id"], f"tracking.uri={store}",
                     "tracking.experiment=test", f"output_dir={tmp_path / 'eval'}",
                     "num_attention_images=0", "data.num_workers=0"]) == 0
    reg = register(RegisterConfig(model_name="distilled", run_id=runs[0.0]["run_id"],
                                  tracking=tracking))
    assert reg["promoted"] and reg["version"] == "1"
    # the registered champion as a teacher (the models:/ URI loads like a file), from the CLI
    result_file = tmp_path / "result.json"
    assert cli_main(["train", "--mode", "distill", "--result-file", str(result_file),
                     *train_overrides(tmp_path / "again", shards, "train.max_steps=2",
                                      f"tracking.uri={store}",
                                      "distill.teacher=models:/distilled@champion")]) == 0
    got = read_result(result_file)
    assert got["steps"] == 2
    # its MLflow run is named <stage>/<task>, the same words as the pipeline's
    run = mlflow.MlflowClient(store).get_run(got["run_id"])
    assert run.info.run_name == "finetune/distill", run.info.run_name
