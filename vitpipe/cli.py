"""The ``vitpipe`` command line: one subcommand per stage, each a thin call into the library.

Heavy modules are imported inside each handler so ``vitpipe --help`` stays fast and a stage's
dependencies are only loaded when that stage runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .config import ConfigError
from .errors import VitpipeError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML preset (a stage config or a pipeline preset)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-4")


def cmd_model_info(args: argparse.Namespace) -> int:
    from .models.complexity import model_info_text

    print(model_info_text(args.name, args.overrides, batch_size=args.batch_size))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from . import config as C

    if args.action == "schema":
        print(json.dumps(C.json_schema(C.STAGES[args.stage]), indent=2))
        return 0
    cfg = C.load_stage(args.stage, args.config, args.overrides, section=args.section)
    if args.action == "flat":
        for k, v in C.flatten(cfg).items():
            print(f"{k}={v}")
    else:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from .config import load_stage
    from .data import shard

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    cfg = load_stage("shard", args.config, overrides)
    print(shard(cfg))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if not args.result_file:
        return _train(args)
    from .train.result_file import write_error, write_result

    try:
        code = _train(args, on_result=lambda r: write_result(args.result_file, r))
    except BaseException as err:  # the supervisor reads this file, not our stdout
        write_error(args.result_file, err)
        raise
    return code


def _train(args: argparse.Namespace, on_result=None) -> int:
    from .config import load_stage
    from .train import TrainingInterrupted, train
    from .train.tasks import task_class

    # the pipeline stage whose section to read: --stage, else the mode's own stage
    section = stage = args.stage or ("pretrain" if args.mode and task_class(args.mode).pretraining
                                     else "finetune")
    if section == "pretrain" and not _has_section(args.config, "pretrain"):
        # e.g. configs/fmnist_cpu.yaml has no MAE stage: pretrain with its model and data
        print(f"vitpipe train: {args.config} has no 'pretrain' section; using its 'finetune' "
              f"section with mode={args.mode}", file=sys.stderr)
        section = "finetune"
    overrides = list(args.overrides)
    if args.mode:
        overrides.append(f"mode={args.mode}")
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_stage("train", args.config, overrides, section=section).as_stage(stage)
    try:
        result = train(cfg)
    except TrainingInterrupted as err:  # SIGTERM: checkpoint written; tell supervisors apart
        print(f"vitpipe train: {err}", file=sys.stderr)
        return 143
    if on_result is not None:
        on_result(result)
    if int(os.environ.get("RANK", "0")) == 0:  # one result line, from the main process
        print(json.dumps(result, default=str))
        if task_class(cfg.mode).classifier and result.get("run_id"):
            preset = f" --config {args.config}" if args.config else ""
            print(f"next: vitpipe evaluate{preset} --run {result['run_id']}", file=sys.stderr)
    return 0


def _has_section(path: str | None, name: str) -> bool:
    from .config import read_yaml

    if not path:
        return True  # stage defaults: no sections to choose between
    data = read_yaml(path)
    return name in data or not any(k in data for k in ("shard", "finetune", "register"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import load_stage
    from .evaluate import evaluate

    cfg = load_stage("evaluate", args.config, args.overrides)
    if args.run:
        from .runs import evaluation_layer, find_training_run

        layer = evaluation_layer(cfg.tracking, find_training_run(cfg.tracking, args.run))
        cfg = load_stage("evaluate", args.config, args.overrides, layer=layer)
    print(json.dumps(evaluate(cfg), default=str, indent=2))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .config import load_stage
    from .registry import register

    cfg = load_stage("register", args.config, args.overrides)
    if args.run:
        from .runs import find_training_run

        layer = {"run_id": find_training_run(cfg.tracking, args.run)}
        cfg = load_stage("register", args.config, args.overrides, layer=layer)
    print(json.dumps(register(cfg), default=str, indent=2))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from .config import TrackingConfig
    from .registry import rollback

    tracking = TrackingConfig(uri=args.tracking_uri) if args.tracking_uri else None
    print(json.dumps(rollback(args.model_name, tracking), indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .registry.predict import predict_cli

    return predict_cli(args.model_uri, args.images, top_k=args.top_k, as_json=args.json)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .config import TrackingConfig
    from .registry.onnx_export import check_against_pyfunc, export_onnx

    tracking = TrackingConfig(uri=args.tracking_uri) if args.tracking_uri else None
    out = export_onnx(args.model_uri, args.out, tracking)
    if args.check:
        out["max_abs_logit_diff_vs_pyfunc"] = check_against_pyfunc(
            args.model_uri, args.out, args.check, tracking)
    print(json.dumps(out))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .config import ScoreConfig, load
    from .score import score

    overrides = [f"model={args.model_uri}", f"input={args.input}", f"output={args.output}",
                 *args.overrides]
    print(json.dumps(score(load(ScoreConfig, args.config, overrides))))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the Prefect pipeline flow (in its own process: this library imports no Prefect)."""
    cmd = [sys.executable, "-m", "flows.pipeline"]
    if args.config:
        cmd += ["--config", args.config]
    return subprocess.call(cmd + list(args.overrides))


def cmd_stack(args: argparse.Namespace) -> int:
    from .stack import stack_cli

    return stack_cli(args.action, args.dir, docker=args.docker, docker_volume=args.docker_volume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="Train Vision Transformers end to end: shard -> train -> evaluate -> register.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="params, GFLOPs, activation memory, tokens of a model")
    p.add_argument("name", help="a registered variant, e.g. vit_base_patch16_224")
    p.add_argument("overrides", nargs="*", help="model overrides, e.g. depth=8 img_size=384")
    p.add_argument("--batch-size", type=int, default=1, help="batch for activation memory")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("config", help="show a resolved config, flat params, or JSON schema")
    p.add_argument("action", choices=["show", "flat", "schema"])
    p.add_argument("--stage", default="pipeline", choices=["shard", "train", "evaluate",
                                                          "register", "pipeline"])
    p.add_argument("--section", help="section of a pipeline preset (e.g. pretrain)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("shard", help="write WebDataset shards + manifest.json from a dataset")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if a manifest exists")
    _add_config_args(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="a training task: supervised, mae, finetune or distill "
                       "(Accelerate)")
    p.add_argument("--mode", choices=["supervised", "mae", "finetune", "distill"],
                   help="the task (default: the section's mode)")
    p.add_argument("--stage", choices=["pretrain", "finetune"],
                   help="pipeline preset section to read (default: pretrain for --mode mae, "
                        "else finetune)")
    p.add_argument("--resume", help="'auto' (newest checkpoint), a checkpoint URI, or 'none'")
    p.add_argument("--result-file", help="write the result JSON here (and each failing rank's"
                   " error to <file>.rank<N>.error): how a supervisor learns the outcome")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    run_help = ("a training run id, or 'latest' (the newest finished supervised/finetune run "
                "of tracking.experiment): %s; explicit keys still override")
    p = sub.add_parser("evaluate", help="metrics + plots for trained weights on a split")
    p.add_argument("--run", help=run_help % "its model, data (manifest) and weights")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register a run's model in MLflow; gate to champion")
    p.add_argument("--run", help=run_help % "the run to register")
    _add_config_args(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("rollback", help="move a registered model's champion back one step")
    p.add_argument("model_name", help="e.g. vitpipe-fmnist")
    p.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("predict", help="top-k predictions of a registered model on images")
    p.add_argument("model_uri", help="e.g. models:/vitpipe-fmnist@champion")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-onnx", help="a registered model's network as ONNX (dynamic batch; "
                       "preprocessing in its metadata)")
    p.add_argument("model_uri", help="e.g. models:/vitpipe-fmnist@champion")
    p.add_argument("out", help="where to write the .onnx file")
    p.add_argument("--check", nargs="*", metavar="IMAGE", default=[],
                   help="images to compare onnxruntime's logits with the pyfunc's on (1e-4)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("score", help="score a folder, s3:// prefix or shard set with a model, "
                       "predictions to Parquet")
    p.add_argument("model_uri", help="e.g. models:/vitpipe-fmnist@champion")
    p.add_argument("input", help="an image folder, an s3:// prefix or a manifest.json")
    p.add_argument("output", help="a .parquet path or s3:// URI")
    p.add_argument("--config", "-c", help="YAML with ScoreConfig fields")
    p.add_argument("overrides", nargs="*", help="e.g. batch_size=128 top_k=3 tracking.uri=...")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("run", help="run the whole pipeline flow (Prefect, ephemeral if no server)")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stack", help="local Prefect + MLflow + S3 stack (processes; --docker: "
                       "also Docker work pools)")
    p.add_argument("action", choices=["up", "down", "status", "env"],
                   help="env: print the `export` lines (eval \"$(vitpipe stack env)\")")
    p.add_argument("--dir", default=".stack", help="where the stack keeps its data and env file")
    p.add_argument("--docker", action="store_true",
                   help="up: also docker workers on vitpipe-docker(-gpu): each flow run in its "
                        "own container of vitpipe:0.1.0 (infra/docker/build-local.sh builds it)")
    p.add_argument("--docker-volume", default="vitpipe-work",
                   help="up --docker: the named volume the containers share (/var/lib/vitpipe)")
    p.set_defaults(func=cmd_stack)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`--config x.yaml train.lr=1e-3 --mode mae`): argparse
    # stops collecting a positional list at the first option, so route stray k=v items back.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" in e and not e.startswith("-")]
    if len(stray) != len(extra) or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if e not in stray)}")
    if stray:
        args.overrides = list(args.overrides) + stray
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"vitpipe {args.command}: config error:\n{err}", file=sys.stderr)
        return 2
    except VitpipeError as err:
        print(f"vitpipe {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
