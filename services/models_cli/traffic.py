"""`models traffic`: a model's traffic policy — shown, or changed in the parts promote leaves alone.

`promote` and `rollback` move the split; this command sets what decides a request before the split
(an A/B key and its routes, a sticky key) and the rollback guard's bounds. Each change reads the
policy and writes it back at that revision, so a concurrent promote or rollback is never undone: the
write is refused and the command says to run it again.
"""

from __future__ import annotations

import argparse

from protos.tensoryard.v1 import registry_pb2
from services.models_cli.context import Context
from services.models_cli.render import policy_dict

_ROLLBACK_FLAGS = {
    "rollback_window_s": "window_s",
    "rollback_min_requests": "min_requests",
    "rollback_max_error_rate_increase": "max_error_rate_increase",
    "rollback_max_latency_ratio": "max_latency_ratio",
}


def add_traffic_command(sub, common: argparse.ArgumentParser) -> None:
    traffic = sub.add_parser(
        "traffic", parents=[common],
        help="show a model's traffic policy, or set its A/B key, sticky key and rollback bounds",
        description="Without flags: the policy. The split itself is moved by promote and rollback.",
    )
    traffic.add_argument("name", metavar="MODEL")
    traffic.add_argument("--sticky-key", help="metadata key (or request parameter) whose value keeps one caller "
                                              "on one version; '' to clear")
    traffic.add_argument("--ab-key", help="metadata key (or request parameter) that picks a version by value; "
                                          "'' to clear it and its routes")
    traffic.add_argument("--ab-route", action="append", default=[], metavar="VALUE=VERSION",
                         help="requests whose A/B key has VALUE go to VERSION (repeatable; replaces the routes)")
    traffic.add_argument("--rollback-window-s", type=float, dest="rollback_window_s",
                         help="the rollback guard's window (0: not watched)")
    traffic.add_argument("--rollback-min-requests", type=int, dest="rollback_min_requests")
    traffic.add_argument("--rollback-max-error-rate-increase", type=float, dest="rollback_max_error_rate_increase",
                         help="e.g. 0.05: roll back past 5 points more errors than the stable version")
    traffic.add_argument("--rollback-max-latency-ratio", type=float, dest="rollback_max_latency_ratio")
    traffic.add_argument("--reason", default="", help="recorded in the audit log")


def run_traffic(args: argparse.Namespace, ctx: Context) -> int:
    stub = ctx.stub
    model = stub.GetModel(registry_pb2.GetModelRequest(name=args.name))
    if _changes_requested(args):
        if not model.HasField("traffic_policy"):
            raise ValueError(f"model {args.name!r} has no traffic policy yet: `models promote` sets the first one")
        policy = registry_pb2.TrafficPolicy()
        policy.CopyFrom(model.traffic_policy)
        _apply(args, policy)
        stub.SetTrafficPolicy(registry_pb2.SetTrafficPolicyRequest(
            policy=policy, expected_revision=model.traffic_policy.revision, reason=args.reason))
        model = stub.GetModel(registry_pb2.GetModelRequest(name=args.name))
    described = policy_dict(model)
    if ctx.json:
        ctx.emit({"model": model.name, "traffic_policy": described})
    elif described is None:
        ctx.say(f"{model.name}: no traffic policy (requests that name no version go to the production alias, "
                "else the latest version with replicas)")
    else:
        _say_policy(ctx, model.name, model.traffic_policy)
    return 0


def _changes_requested(args: argparse.Namespace) -> bool:
    return (args.sticky_key is not None or args.ab_key is not None or bool(args.ab_route)
            or any(getattr(args, flag) is not None for flag in _ROLLBACK_FLAGS))


def _apply(args: argparse.Namespace, policy: registry_pb2.TrafficPolicy) -> None:
    if args.sticky_key is not None:
        policy.sticky_key = args.sticky_key
    if args.ab_key is not None:
        policy.ab_key = args.ab_key
        if not args.ab_key:
            del policy.ab_routes[:]
    if args.ab_route:
        if not policy.ab_key:
            raise ValueError("--ab-route needs an A/B key (--ab-key)")
        del policy.ab_routes[:]
        for route in args.ab_route:
            value, sep, version = route.partition("=")
            if not sep or not value or not version.isdigit():
                raise ValueError(f"--ab-route {route!r}: expected VALUE=VERSION (a version number)")
            policy.ab_routes.add(value=value, version=int(version))
    for flag, field in _ROLLBACK_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(policy.rollback, field, value)


def _say_policy(ctx: Context, name: str, policy: registry_pb2.TrafficPolicy) -> None:
    splits = ", ".join(f"v{s.version} {s.percent:g}%" for s in policy.splits) or f"v{policy.stable_version} 100%"
    ctx.say(f"{name}: traffic policy revision {policy.revision}")
    ctx.say(f"  stable     v{policy.stable_version}")
    ctx.say(f"  split      {splits}")
    if policy.ab_key:
        routes = ", ".join(f"{r.value} -> v{r.version}" for r in policy.ab_routes) or "none"
        ctx.say(f"  A/B        by {policy.ab_key}: {routes}")
    if policy.sticky_key:
        ctx.say(f"  sticky     by {policy.sticky_key}")
    bounds = policy.rollback
    if bounds.window_s:
        ctx.say(f"  rollback   over {bounds.window_s:g} s once the canary has {bounds.min_requests} requests: "
                f"errors +{bounds.max_error_rate_increase * 100:g} points, latency x{bounds.max_latency_ratio:g}")
    else:
        ctx.say("  rollback   not watched")
