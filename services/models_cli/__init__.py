"""`tensoryard models ...`: push, import, list, show, alias, diff, rm (promote, gate and rollback
come from services/rollout/cli.py when it is present).

Human output by default, one JSON object with `--json`. Exit codes: 0 done; 1 refused or failed,
with one line on stderr that names the gRPC status when the registry said no; 130 interrupted
(Ctrl-C); argparse's 2 for bad flags.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from services.models_cli.parser import add_models_commands, rollout_commands_present

__all__ = ["add_models_commands", "run_models_command"]

ROLLOUT_COMMANDS = ("promote", "gate", "rollback")


def run_models_command(args: argparse.Namespace, env: dict[str, str]) -> int:
    if args.models_command in ROLLOUT_COMMANDS and rollout_commands_present():
        from services.rollout.cli import run_rollout_command

        return run_rollout_command(args, env)
    import grpc

    from services.common.admin_auth import admin_channel, client_admin_token
    from services.common.errors import TensoryardError
    from services.common.tls import client_security
    from services.models_cli.context import Context

    command = f"tensoryard models {args.models_command}"
    try:
        token = client_admin_token(env, getattr(args, "admin_token_file", None))
        with client_security(args, env).channel(args.registry) as plain_channel:
            ctx = Context(admin_channel(plain_channel, token), args.json, sys.stdout, sys.stderr, _user(env))
            return _command(args.models_command)(args, ctx)
    except grpc.RpcError as error:
        print(f"{command}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except TensoryardError as error:  # refused here before any call: a bad path or link
        print(f"{command}: {error.code.name}: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # gRPC cancels the upload, and the registry keeps what it received for the rerun.
        resume = " (run it again to resume)" if args.models_command in ("push", "register", "import") else ""
        print(f"{command}: interrupted{resume}", file=sys.stderr)
        return 130


def _command(name: str):
    from services.models_cli import diff, export_onnx, listing, manage, optimize, push, traffic

    return {
        "push": push.run_push, "register": push.run_push, "import": push.run_import,
        "list": listing.run_list, "show": listing.run_show, "diff": diff.run_diff,
        "alias": manage.run_alias, "rm": manage.run_rm, "traffic": traffic.run_traffic,
        "export-onnx": export_onnx.run_export_onnx, "optimize": optimize.run_optimize,
    }[name]


def _user(env: dict[str, str]) -> str:
    try:
        return env.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return ""
