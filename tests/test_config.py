"""Config loading, dotted overrides, clear errors, flat MLflow params and JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vitpipe import config as C
from vitpipe.cli import main as cli_main
from vitpipe.config import (
    ConfigError,
    MAEConfig,
    ModelConfig,
    PipelineConfig,
    StrictModel,
    TrainConfig,
    apply_overrides,
    flatten,
    json_schema,
    load,
    load_stage,
    validate,
)
from vitpipe.config.base import parse_value

ROOT = Path(__file__).parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict | str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_load_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, {"seed": 3, "model": {"name": "vit_tiny_patch7_28", "depth": 4},
                            "train": {"blr": 2e-3}})
    cfg = load(TrainConfig, path, ["model.depth=2", "train.lr=5e-4", "data.augment.hflip=0"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.seed, cfg.model.name, cfg.model.depth) == (3, "vit_tiny_patch7_28", 2)
    assert cfg.train.lr == 5e-4 and cfg.train.blr == 2e-3
    assert cfg.data.augment.hflip == 0.0
    assert load(TrainConfig).model.name == "vit_tiny_patch4_28"  # defaults need no file


def test_apply_overrides_is_a_copy_and_creates_sections() -> None:
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.lr=2", "a.b.c=[1, 2]", "init=null", "mode=mae"])
    assert data == {"train": {"lr": 1.0}}
    assert out == {"train": {"lr": 2}, "a": {"b": {"c": [1, 2]}}, "init": None, "mode": "mae"}


@pytest.mark.parametrize(("text", "value"), [
    ("3", 3), ("0.5", 0.5), ("1e-3", 1e-3), ("-2E+2", -200.0), ("true", True), ("null", None),
    ("[0.9, 0.95]", [0.9, 0.95]), ("s3://bucket/x", "s3://bucket/x"), ("a=b", "a=b"),
])
def test_parse_value(text: str, value: object) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=1"])


def test_unknown_key_names_closest_valid_key_and_source(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"lr": 1e-3, "wieght_decay": 0.1}})
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    msg = str(err.value)
    assert "unknown key 'train.wieght_decay'" in msg
    assert "did you mean 'train.weight_decay'" in msg
    assert str(path) in msg
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load(TrainConfig, None, ["modle.depth=2"])
    with pytest.raises(ConfigError, match=r"did you mean 'data\.augment\.hflip'"):
        load(TrainConfig, None, ["data.augment.hfilp=0.1"])


@pytest.mark.parametrize(("override", "message"), [
    ("model.patch_size=5", "model.patch_size=5 does not divide model.img_size=28"),
    ("model.num_heads=5", "model.num_heads=5 does not divide model.embed_dim=96"),
    ("train.lr=0", "'train.lr'.*greater than 0.*got 0"),
    ("train.lr=-1e-3", "'train.lr'.*greater than 0"),
    ("model.name=vit_tiny_patch4_82", "did you mean vit_tiny_patch4_28"),
    ("model.pos_embed=rope", "'model.pos_embed'.*'learned', 'factorized' or 'sincos'"),
    ("mae.decoder_num_heads=5", "mae.decoder_num_heads=5 does not divide"),
    ("data.batch_size=0", "'data.batch_size'"),
])
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(TrainConfig, None, [override])
    assert "defaults + overrides" in str(err.value)


def test_shape_checks_use_the_variant_values() -> None:
    """patch_size=8 divides nothing wrong by itself; with img_size from the 224 variant it does."""
    assert ModelConfig(name="vit_base_patch16_224", patch_size=8).resolved()["patch_size"] == 8
    with pytest.raises(ValueError, match="does not divide model.img_size=224"):
        ModelConfig(name="vit_base_patch16_224", patch_size=24)
    with pytest.raises(ValueError, match="img_size=30"):
        ModelConfig(img_size=30)  # default variant has patch 4


def test_model_config_resolved_and_overrides() -> None:
    cfg = ModelConfig(name="vit_small_patch7_28", depth=3, num_classes=4)
    assert cfg.overrides() == {"depth": 3, "num_classes": 4}
    kw = cfg.resolved()
    assert (kw["depth"], kw["embed_dim"], kw["patch_size"], kw["img_size"]) == (3, 192, 7, 28)
    assert MAEConfig().mask_ratio == 0.75


def test_secret_values_never_shown() -> None:
    class Creds(StrictModel):
        secret_key: int = 0
        password: str = ""
        region: str = "x"

    with pytest.raises(ConfigError) as err:
        validate(Creds, {"secret_key": "hunter2-not-an-int"}, "creds.yaml")
    assert "hunter2" not in str(err.value) and "<hidden>" in str(err.value)
    flat = flatten(Creds(secret_key=7, password="pw"))
    assert flat == {"secret_key": "<redacted>", "password": "<redacted>", "region": "x"}
    assert flatten(Creds())["password"] == ""  # empty stays visibly empty


def test_flatten_for_mlflow_params() -> None:
    cfg = load(TrainConfig, None, ["model.depth=3", "train.betas=[0.9, 0.95]"])
    flat = flatten(cfg)
    assert flat["model.depth"] == "3"
    assert flat["model.name"] == "vit_tiny_patch4_28"
    assert flat["model.img_size"] == "None"  # unset override, visible as such
    assert json.loads(flat["train.betas"]) == [0.9, 0.95]
    assert flat["data.augment.hflip"] == "0.5"
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values())
    assert flatten({"a": {"b": [1, {"c": 2}]}}, "p.") == {"p.a.b": '[1, {"c": 2}]'}


def test_json_schema_is_strict_and_serialisable() -> None:
    for model in C.STAGES.values():
        schema = json_schema(model)
        json.dumps(schema)
        assert schema["type"] == "object" and schema["additionalProperties"] is False
    schema = json_schema(TrainConfig)
    assert {"model", "train", "data", "mae"} <= set(schema["properties"])
    model_def = schema["$defs"]["ModelConfig"]
    assert model_def["properties"]["name"]["default"] == "vit_tiny_patch4_28"
    assert model_def["additionalProperties"] is False


def test_read_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found.*configs/"):
        load(TrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(TrainConfig, write(tmp_path, "train: [unclosed"))
    with pytest.raises(ConfigError, match="mapping"):
        load(TrainConfig, write(tmp_path, "- a\n- b\n"))
    assert load(TrainConfig, write(tmp_path, "")).mode == "supervised"  # empty file: defaults


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_are_valid_pipelines(preset: Path) -> None:
    cfg = load(PipelineConfig, preset)
    assert cfg.finetune.model.name == cfg.model.name  # shared sections are inherited


def test_load_stage_takes_a_section_of_a_pipeline_preset(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "seed": 5, "model": {"name": "vit_tiny_patch7_28", "num_classes": 10},
        "data": {"batch_size": 32},
        "pretrain": {"mode": "mae", "mae": {"mask_ratio": 0.6}},
        "finetune": {"mode": "finetune", "init": "enc.safetensors",
                     "model": {"drop_path_rate": 0.1}},
    })
    pre = load_stage("train", str(path), ["train.epochs=1"], section="pretrain")
    assert (pre.mode, pre.seed, pre.mae.mask_ratio, pre.data.batch_size) == ("mae", 5, 0.6, 32)
    assert pre.model.name == "vit_tiny_patch7_28" and pre.train.epochs == 1
    fine = load_stage("train", str(path), [], section="finetune")
    assert fine.model.drop_path_rate == 0.1 and fine.model.num_classes == 10  # deep merge
    with pytest.raises(ConfigError, match="train.lr"):
        load_stage("train", str(path), ["train.lr=0"], section="pretrain")
    plain = write(tmp_path, {"model": {"depth": 2}}, "train.yaml")
    assert load_stage("train", str(plain), section="pretrain").model.depth == 2


def test_cli_config_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # overrides directly after the action: argparse cannot take them after --stage
    assert cli_main(["config", "show", "model.depth=2", "--stage", "train"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["depth"] == 2
    assert cli_main(["config", "flat", "--stage", "train"]) == 0
    assert "model.name=vit_tiny_patch4_28" in capsys.readouterr().out.splitlines()
    assert cli_main(["config", "schema", "--stage", "evaluate"]) == 0
    assert "properties" in json.loads(capsys.readouterr().out)
    assert cli_main(["config", "show", "model.patch_size=5", "--stage", "train"]) == 2
    assert "does not divide" in capsys.readouterr().err


@pytest.mark.parametrize("typo, meant", [
    ("train.learning_rat", "train.lr"), ("train.learning_rate", "train.lr"),
    ("train.max_grad_norm", "train.clip_grad"), ("train.num_epoch", "train.epochs"),
    ("data.worker", "data.num_workers"),
])
def test_unknown_key_suggests_the_short_key_of_a_known_synonym(typo: str, meant: str) -> None:
    from vitpipe.config import load_stage

    with pytest.raises(ConfigError) as err:
        load_stage("train", None, [f"{typo}=1"])
    assert f"did you mean '{meant}'" in str(err.value)


PIPE = {"model": {"name": "vit_tiny_patch7_28", "num_classes": 10},
        "shard": {"output": "shards/x"},
        "pretrain": {"mode": "mae"}, "finetune": {"mode": "finetune", "init": "enc.safetensors"},
        "evaluate": {"split": "test"}, "register": {"model_name": "m"}}


@pytest.mark.parametrize("stage, section, short, full, read", [
    ("evaluate", None, "weights=w.safetensors", "evaluate.weights=w.safetensors",
     lambda c: c.weights),
    ("register", None, "run_id=abc", "register.run_id=abc", lambda c: c.run_id),
    ("shard", None, "source.limit_per_split=500", "shard.source.limit_per_split=500",
     lambda c: c.source.limit_per_split),
    ("train", None, "train.epochs=2.5", "finetune.train.epochs=2.5", lambda c: c.train.epochs),
    ("train", "pretrain", "train.epochs=2.5", "pretrain.train.epochs=2.5",
     lambda c: c.train.epochs),
])
@pytest.mark.parametrize("as_preset", [True, False], ids=["preset", "no-file"])
def test_stage_commands_take_short_and_full_keys_alike(tmp_path, stage, section, short, full,
                                                       read, as_preset) -> None:
    from vitpipe.config import load_stage

    path = str(write(tmp_path, PIPE)) if as_preset else None
    value = short.split("=", 1)[1]
    a = load_stage(stage, path, [short], section=section)
    b = load_stage(stage, path, [full], section=section)
    assert str(read(a)) == str(read(b)) == value
    assert a.model_dump() == b.model_dump()


def test_other_stages_keys_are_checked_and_reported_not_used(tmp_path, capsys) -> None:
    from vitpipe.config import load_stage

    path = str(write(tmp_path, PIPE))
    base = load_stage("evaluate", path)
    cfg = load_stage("evaluate", path, ["finetune.train.epochs=2", "launch.num_processes=2"])
    assert cfg == base  # the same overrides as `make run ARGS=...`, harmless here
    err = capsys.readouterr().err
    assert "not used by the evaluate stage" in err and "finetune.train.epochs" in err
    with pytest.raises(ConfigError, match="finetune.train.epocs"):  # still validated
        load_stage("evaluate", path, ["finetune.train.epocs=2"])
    with pytest.raises(ConfigError) as e:  # an unknown key: both forms of the right key named
        load_stage("evaluate", path, ["evaluate.wieghts=x"])
    assert "did you mean 'weights'" in str(e.value) and "evaluate.key=value" in str(e.value)
    with pytest.raises(ConfigError, match="reads section"):
        load_stage("evaluate", path, section="finetune")


def test_a_preset_gives_train_and_evaluate_its_shard_manifest(tmp_path) -> None:
    from vitpipe.config import load_stage

    path = str(write(tmp_path, PIPE))
    for stage, section in (("train", "finetune"), ("train", "pretrain"), ("evaluate", None)):
        cfg = load_stage(stage, path, section=section)
        assert cfg.data.manifest == "shards/x/manifest.json"
        given = load_stage(stage, path, ["data.manifest=s3://b/m.json"], section=section)
        assert given.data.manifest == "s3://b/m.json"
    assert load_stage("evaluate", None).data.manifest is None  # no preset: nothing guessed


def test_cli_config_show_of_a_stage_reads_its_preset_section(capsys) -> None:
    preset = str(ROOT / "configs" / "fmnist_smoke.yaml")
    for stage, key in (("train", "mode"), ("evaluate", "split"), ("shard", "output"),
                       ("register", "model_name")):
        assert cli_main(["config", "show", "--stage", stage, "--config", preset]) == 0, stage
        shown = json.loads(capsys.readouterr().out)
        assert key in shown, (stage, shown)
    assert cli_main(["config", "show", "--stage", "train", "--section", "pretrain",
                     "--config", preset]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "mae"


@pytest.mark.parametrize("name, overrides, message", [
    ("vit_tiny_patch4_28", {"patch_size": 5}, "model.patch_size=5 does not divide"),
    ("vit_tiny_patch4_28", {"num_heads": 5}, "model.num_heads=5 does not divide"),
    ("vit_tiny_conv7_28", {"patch_size": 1}, "model.stem=conv needs model.patch_size >= 2"),
    ("vit_tiny_patch7_28", {"stem_widths": (16, 32)}, "model.stem_widths needs model.stem=conv"),
    ("vit_tiny_conv4_28", {"stem_widths": (16,)}, "patch 4 needs at least 2 positive width"),
    ("vit_tiny_patch4_28", {"pos_embed": "sincos", "embed_dim": 90, "num_heads": 3},
     "model.pos_embed=sincos needs model.embed_dim divisible by 4"),
])
def test_each_shape_rule_is_checked_once_when_the_config_loads(name, overrides, message):
    """The model modules do not repeat these checks: the config is their one place."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(name=name, **overrides)
    ModelConfig(name=name)  # the variant itself is fine
