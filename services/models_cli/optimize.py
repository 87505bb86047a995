"""`tensoryard models optimize --model NAME[:REF] --weight-dtype int8 [--kv-cache-dtype bfloat16]`: a
float32 LLM version becomes an optimised version of the same model, gated on quality first.

The source version is fetched (verified) into the work folder and loaded twice in this process, as
served in float32 and in the asked dtypes; services/rollout/quality.py measures the candidate's
greedy agreement and perplexity ratio against float32 on the gate's texts (services/rollout/
quality_texts.py, or --prompts / --held-out). Below the dtype's bounds nothing is pushed; otherwise
the next version of the model holds the same files (the registry stores each blob once, so nothing
is uploaded again), the source's config with `weight_dtype` / `kv_cache_dtype` set, the figures in
its metadata labels (`quality.*`), the source in its lineage, and `dtype` the weight dtype it
serves in. The rollout controller then canaries it like any other version.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

from services.models_cli.context import Context

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_optimize_command(sub, common, add_version_flags) -> None:
    optimize = sub.add_parser(
        "optimize", parents=[common],
        help="serve an LLM version in bf16/fp16/int8/int4 weights as a new version, gated on quality",
    )
    optimize.add_argument("--model", required=True, metavar="NAME[:REF]", help="REF: version or alias (default: latest)")
    optimize.add_argument("--weight-dtype", required=True, choices=WEIGHT_DTYPES)
    optimize.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                          help="auto: the weights' float dtype (bfloat16 for int8/int4 on CPU)")
    optimize.add_argument("--name", help="push to this model instead (default: a new version of the same model)")
    optimize.add_argument("--held-out", type=Path, help="a text file scored for perplexity (default: the gate's own)")
    optimize.add_argument("--prompts", type=Path, help="one prompt a line (default: the gate's own)")
    optimize.add_argument("--max-tokens", type=int, default=None, help="greedy tokens per prompt (default: 16)")
    optimize.add_argument("--min-greedy-agreement", type=float, default=None,
                          help="refuse to push below this (default: the dtype's bound, quality_texts.BOUNDS)")
    optimize.add_argument("--max-ppl-ratio", type=float, default=None,
                          help="refuse to push above this perplexity ratio to float32 (default: the dtype's bound)")
    optimize.add_argument("--work-dir", type=Path, default=Path(".tensoryard/imports"),
                          help="where the source version is fetched")
    add_version_flags(optimize)


def run_optimize(args: argparse.Namespace, ctx: Context) -> int:
    # Imported here: the parser (loaded by `tensoryard --help`) imports this module.
    from protos.tensoryard.v1 import registry_pb2
    from services.common.config import TelemetryConfig
    from services.common.telemetry import configure_logging
    from services.models_cli.export_onnx import _fetch
    from services.models_cli.listing import parse_target
    from services.models_cli.push import _config, _push, _report
    from services.registry.client import LocalFile, Source
    from services.registry.metadata_probe import probe_folder

    configure_logging("tensoryard-models", TelemetryConfig(log_level="warning"))
    name, ref = parse_target(args.model)
    source_version = ctx.stub.GetVersion(registry_pb2.GetVersionRequest(model_name=name, ref=ref))
    source_config = json.loads(source_version.config_json or "{}")
    source_ref = f"{name}:{source_version.version}"
    if source_version.task != "generation":
        raise ValueError(f"{source_ref} is a {source_version.task} version; optimize takes a generation version "
                         "(encoders: `models export-onnx --quantize int8`)")
    if source_config.get("weight_dtype", "float32") not in ("float32", "auto"):
        raise ValueError(f"{source_ref} already serves {source_config['weight_dtype']} weights: optimize from "
                         "its float32 version, which the gate measures against")
    fetched = asyncio.run(_fetch(args, name, source_version.version, args.work_dir / "cache"))
    report = _check_quality(ctx, args, fetched.folder, source_ref)
    config = {**source_config, **_config(args.config_json), "weight_dtype": args.weight_dtype,
              "kv_cache_dtype": args.kv_cache_dtype}
    details = {"optimized_from": source_ref, "weight_dtype": args.weight_dtype,
               "kv_cache_dtype": report.kv_cache_dtype}
    source = Source("optimize", source_ref, details, parent_version=args.parent or source_version.version,
                    created_by=ctx.user)
    metadata = probe_folder(fetched.folder)
    new_name = args.name or name
    # The files as the manifest names them: the fetched folder links into the cache's blobs, each
    # verified against its sha256 by the fetch, so nothing is hashed or sent again.
    files = [LocalFile(f.path, (fetched.folder / f.path).resolve(), f.sha256, f.size_bytes)
             for f in source_version.files]
    result = _push(ctx, args, new_name, "generation", fetched.folder, source, config=config, files=files,
                   extra_labels=report.labels(), metadata=dataclasses.replace(metadata, dtype=args.weight_dtype))
    return _report(ctx, new_name, result)


def _check_quality(ctx: Context, args, folder: Path, source_ref: str):
    """The candidate against float32 on the gate's texts; ValueError (nothing pushed) outside the bounds."""
    from tokenizers import Tokenizer

    from services.rollout import quality, quality_texts

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    held_out = tokenizer.encode(args.held_out.read_text() if args.held_out else quality_texts.HELD_OUT).ids
    prompt_lines = args.prompts.read_text().splitlines() if args.prompts else quality_texts.PROMPTS
    prompts = [tokenizer.encode(line).ids for line in prompt_lines if line.strip()]
    max_tokens = args.max_tokens or quality_texts.MAX_TOKENS
    default_agreement, default_ratio = quality_texts.BOUNDS[args.weight_dtype]
    bounds = quality.QualityBounds(
        default_agreement if args.min_greedy_agreement is None else args.min_greedy_agreement,
        default_ratio if args.max_ppl_ratio is None else args.max_ppl_ratio)
    # One engine at a time: the float32 reference's figures are taken and it is dropped first.
    figures = quality.reference_figures(quality.make_engine(folder, "float32"), prompts, held_out, max_tokens)
    report = quality.evaluate(figures, quality.make_engine(folder, args.weight_dtype, args.kv_cache_dtype),
                              prompts, held_out, max_tokens)
    ctx.err.write(f"{source_ref} in {report.weight_dtype} (cache {report.kv_cache_dtype}) vs float32: greedy "
                  f"agreement {report.greedy_agreement:.4f} ({report.num_prompts_identical}/{report.num_prompts} "
                  f"whole), perplexity {report.ppl_candidate:.4f} vs {report.ppl_reference:.4f} (ratio "
                  f"{report.ppl_ratio:.4f}); bounds: agreement >= {bounds.min_greedy_agreement}, "
                  f"ratio <= {bounds.max_ppl_ratio}\n")
    if not report.passes(bounds):
        raise ValueError(f"not pushed: {report.weight_dtype} is outside the quality bounds (greedy agreement "
                         f"{report.greedy_agreement:.4f} < {bounds.min_greedy_agreement} or perplexity ratio "
                         f"{report.ppl_ratio:.4f} > {bounds.max_ppl_ratio}); --min-greedy-agreement / "
                         "--max-ppl-ratio set other bounds")
    return report
