"""`tensoryard models promote | gate | rollback`: the rollout commands, added to the `models`
parser by services/models_cli (`add_rollout_commands`) and run by `run_rollout_command`.

    tensoryard models promote MODEL VERSION (--canary P | --full)
    tensoryard models gate MODEL VERSION [--json]      exit 0: passed, 1: failed (for CI)
    tensoryard models rollback MODEL [--reason TEXT]

Also runnable alone: `python -m services.rollout.cli promote ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

ROLLOUT_COMMANDS = ("promote", "gate", "rollback")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default="127.0.0.1:7070")
    parser.add_argument("--router", default="127.0.0.1:8001", help="where the gate's requests go")
    parser.add_argument("--admin-token-file", type=Path, dest="admin_token_file",
                        help="file whose first line is the admin token (else $TENSORYARD_ADMIN_TOKEN)")
    from services.common.tls import add_client_tls_flags

    add_client_tls_flags(parser)  # for the registry and the router alike


def add_rollout_commands(models_subparsers) -> None:
    promote = models_subparsers.add_parser(
        "promote", help="deploy a version, run its gate, then give it a canary share or all traffic")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    share = promote.add_mutually_exclusive_group(required=True)
    share.add_argument("--canary", type=float, metavar="P", help="percent of the requests that name no version")
    share.add_argument("--full", action="store_true", help="all of them, and the `production` alias")
    promote.add_argument("--replica-wait-s", type=float, default=180.0, dest="replica_wait_s",
                         help="how long a new replica may take to load")
    promote.add_argument("--json", action="store_true")
    _common(promote)
    gate = models_subparsers.add_parser("gate", help="run a version's gate (exit 0: passed, 1: failed)")
    gate.add_argument("model")
    gate.add_argument("version", type=int)
    gate.add_argument("--replica-wait-s", type=float, default=180.0, dest="replica_wait_s")
    gate.add_argument("--json", action="store_true")
    _common(gate)
    rollback = models_subparsers.add_parser("rollback", help="send every request without a version to the stable version")
    rollback.add_argument("model")
    rollback.add_argument("--reason", default="by hand")
    rollback.add_argument("--json", action="store_true")
    _common(rollback)


def run_rollout_command(args: argparse.Namespace, env: dict[str, str]) -> int:
    """0 done / gate passed; 1 refused or gate failed (the reasons on stderr); 2 bad arguments."""
    from google.protobuf.json_format import MessageToDict

    from services.common.admin_auth import admin_channel, client_admin_token
    from services.common.tls import client_security
    from services.rollout.promote import (
        PromoteFailed,
        Registry,
        gate_version,
        promote,
        rollback,
    )

    command = args.models_command
    say = (lambda line: None) if args.json else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    token = client_admin_token(env, args.admin_token_file)
    try:
        security = client_security(args, env)
        with security.channel(args.registry) as registry_channel, \
                security.channel(getattr(args, "router", "127.0.0.1:8001")) as router:
            registry = Registry(admin_channel(registry_channel, token))
            if command == "gate":
                result = gate_version(registry, router, args.model, args.version, args.replica_wait_s, say)
                registry.audit("gate.pass" if result.passed else "gate.fail", args.model, args.version,
                               {"reasons": result.reasons, "by": "models gate"})
                _print_gate(result, args.json)
                return 0 if result.passed else 1
            if command == "promote":
                rollout = promote(registry, router, args.model, args.version, args.canary, args.full,
                                  args.replica_wait_s, say)
                _print_policy(rollout.policy, args.json, MessageToDict)
                return 0
            policy = rollback(registry, args.model, args.reason)
            _print_policy(policy, args.json, MessageToDict)
            return 0
    except PromoteFailed as failure:
        if failure.gate is not None and args.json:
            print(json.dumps(failure.gate.to_json(), indent=2))
        print(f"tensoryard: {failure.summary}", file=sys.stderr)
        for reason in failure.reasons:
            print(f"  {reason}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"tensoryard: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"tensoryard: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


def _print_gate(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    print(f"{result.model_name} version {result.version}: gate {'passed' if result.passed else 'FAILED'}")
    for check in result.checks:
        print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    if not result.checks:
        print("  (the version has no gate: nothing to check)")


def _print_policy(policy, as_json: bool, to_dict) -> None:
    if as_json:
        print(json.dumps(to_dict(policy, preserving_proto_field_name=True), indent=2))
        return
    splits = ", ".join(f"version {s.version}: {s.percent:g}%" for s in policy.splits)
    print(f"{policy.model_name}: stable version {policy.stable_version}; {splits} (revision {policy.revision})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensoryard models")
    add_rollout_commands(parser.add_subparsers(dest="models_command", required=True))
    return run_rollout_command(parser.parse_args(argv), dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
