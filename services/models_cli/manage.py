"""`models alias` and `models rm`: the writes besides publishing (each audited by the registry)."""

from __future__ import annotations

import argparse

from protos.tensoryard.v1 import registry_pb2
from services.models_cli.context import Context


def run_alias(args: argparse.Namespace, ctx: Context) -> int:
    stub = ctx.stub
    if args.delete:
        if args.version is not None:
            raise ValueError("alias --delete takes no VERSION")
        stub.DeleteAlias(registry_pb2.DeleteAliasRequest(model_name=args.name, name=args.alias, reason=args.reason))
        if ctx.json:
            ctx.emit({"model": args.name, "alias": args.alias, "deleted": True})
        else:
            ctx.say(f"{args.name}: alias {args.alias} deleted")
        return 0
    if args.version is None:
        raise ValueError("alias needs a VERSION to point at (or --delete)")
    alias = stub.SetAlias(registry_pb2.SetAliasRequest(
        model_name=args.name, name=args.alias, version=args.version, reason=args.reason))
    if ctx.json:
        ctx.emit({"model": alias.model_name, "alias": alias.name, "version": alias.version,
                  "updated_at_s": alias.updated_at_s})
    else:
        ctx.say(f"{alias.model_name}: alias {alias.name} -> version {alias.version}")
    return 0


def run_rm(args: argparse.Namespace, ctx: Context) -> int:
    ctx.stub.DeleteVersion(registry_pb2.DeleteVersionRequest(model_name=args.name, version=args.version))
    if ctx.json:
        ctx.emit({"model": args.name, "version": args.version, "deleted": True})
    else:
        ctx.say(f"{args.name}: version {args.version} deleted")
    return 0
