"""The `tensoryard models ...` arguments (kept free of heavy imports: `tensoryard --help` loads it)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

TASKS = ("embedding", "generation", "tensor")
ROLLOUT_MODULE = "services.rollout.cli"


def add_models_commands(subparsers, add_admin_token_flag) -> None:
    """Adds `models` and its subcommands to the top-level `subparsers`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default="127.0.0.1:7070", help="the registry's address")
    common.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    add_admin_token_flag(common)
    from services.common.tls import add_client_tls_flags

    add_client_tls_flags(common)

    models = subparsers.add_parser("models", help="manage models in the registry")
    sub = models.add_subparsers(dest="models_command", required=True)

    push = sub.add_parser("push", aliases=["register"], parents=[common],
                          help="upload a model folder as a new version (resumes an interrupted push)")
    push.add_argument("name", metavar="MODEL")
    push.add_argument("folder", type=Path, metavar="FOLDER")
    push.add_argument("--task", required=True, choices=TASKS)
    _add_version_flags(push)
    push.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes per upload message")
    push.add_argument("--max-bytes-per-s", type=float, default=0.0,
                      help="limit the upload rate (0: none), e.g. on a shared link")

    importing = sub.add_parser(
        "import", parents=[common],
        help="import a Hugging Face folder or cache snapshot, a GGUF or ONNX file, or an MLflow model version",
        description="SOURCE is told apart by what it is: a folder with config.json, a Hugging Face cache "
                    "snapshot (.../models--org--name/snapshots/REV, read offline), a GGUF file, an .onnx "
                    "file, or models:/NAME/VERSION (with --mlflow-tracking-uri).",
    )
    importing.add_argument("source", metavar="SOURCE")
    importing.add_argument("--name", help="model name (default: from the source)")
    importing.add_argument("--task", choices=TASKS, help="default: from the source where it is plain")
    _add_version_flags(importing)
    importing.add_argument("--mlflow-tracking-uri", default="", help="e.g. sqlite:///mlflow.db")
    importing.add_argument("--quantize", choices=("int8",), default="",
                           help="ONNX sources: push the int8 dynamic quantization (onnxruntime.quantization), "
                                "recorded in the lineage")
    importing.add_argument("--work-dir", type=Path, default=Path(".tensoryard/imports"),
                           help="where converted folders and downloads are kept")

    sub.add_parser("list", parents=[common], help="models, versions, aliases and traffic policy")

    show = sub.add_parser("show", parents=[common],
                          help="a version's metadata, lineage, aliases and files, and the model's audit log")
    show.add_argument("target", metavar="MODEL[:REF]", help="REF: a version number or alias (default: latest)")

    alias = sub.add_parser("alias", parents=[common], help="point an alias at a version, or delete it")
    alias.add_argument("name", metavar="MODEL")
    alias.add_argument("alias", metavar="NAME")
    alias.add_argument("version", metavar="VERSION", nargs="?", type=int)
    alias.add_argument("--delete", action="store_true")
    alias.add_argument("--reason", default="", help="recorded in the audit log")

    diff = sub.add_parser("diff", parents=[common], help="two versions' metadata, files and config")
    diff.add_argument("name", metavar="MODEL")
    diff.add_argument("a", metavar="A", help="version number or alias")
    diff.add_argument("b", metavar="B", help="version number or alias")

    rm = sub.add_parser("rm", parents=[common],
                        help="delete a version (refused while an alias, the traffic policy or a deployment uses it)")
    rm.add_argument("name", metavar="MODEL")
    rm.add_argument("version", metavar="VERSION", type=int)

    from services.models_cli.traffic import add_traffic_command

    add_traffic_command(sub, common)

    from services.models_cli.export_onnx import add_export_onnx_command

    add_export_onnx_command(sub, common, _add_version_flags)
    from services.models_cli.optimize import add_optimize_command

    add_optimize_command(sub, common, _add_version_flags)

    # promote, gate and rollback belong to services/rollout/, present once it is written.
    if rollout_commands_present():
        from services.rollout.cli import add_rollout_commands

        add_rollout_commands(sub)


def rollout_commands_present() -> bool:
    # find_spec of a submodule imports its parent package, so ask about the package first.
    return (importlib.util.find_spec("services.rollout") is not None
            and importlib.util.find_spec(ROLLOUT_MODULE) is not None)


def _add_version_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "--config-json", dest="config_json", default="{}",
                        help="serving config as JSON, e.g. '{\"max_batch_size\": 32}'")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--parent", type=int, default=0, metavar="VERSION", help="lineage: the version this derives from")
    parser.add_argument("--description", default="", help="the model's, when this creates it")
    parser.add_argument("--gate", type=Path, dest="gate_file", metavar="FILE",
                        help="JSON: golden prompts, golden embeddings and a latency budget the version must "
                             "pass before it takes traffic (see README, Rollouts)")
