"""In-process references for the LLM benchmark: Hugging Face `generate` (one request at a time and
static batches), our engine stepped with no gRPC, and static batching under Poisson arrivals,
simulated from the measured batch times.

Static batching here is what `generate` does with a padded batch: every request in a batch starts
together (left padding) and the batch ends when all have their tokens. A request that arrives while
a batch runs waits for it to end, then joins the next batch (up to the batch size, with whoever else
is waiting; a server with nobody waiting starts on the next arrival alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class GenerateTiming:
    batch_size: int
    num_prompt_tokens: list[int]
    first_token_s: float  # call start -> the batch's first token
    total_s: float
    gaps_s: list[float] = field(default_factory=list)  # between successive tokens of the batch
    token_ids: list[list[int]] = field(default_factory=list)


def set_torch_threads(num_threads: int) -> int:
    """Match the worker's --worker-threads (0: torch's default); returns the count in use."""
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------ transformers

def load_transformers(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def time_generate(model, prompts: list[list[int]], num_output_tokens: int, pad_token_id: int) -> GenerateTiming:
    """One greedy `generate` call on a left-padded batch, exactly num_output_tokens new tokens each."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token (for the whole batch)."""

        def __init__(self):
            self.num_puts = 0
            self.token_times_s: list[float] = []

        def put(self, value) -> None:
            if self.num_puts:
                self.token_times_s.append(time.perf_counter())
            self.num_puts += 1

        def end(self) -> None:
            pass

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # [B, width]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    clock = TokenClock()
    start_s = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
            max_new_tokens=num_output_tokens, min_new_tokens=num_output_tokens,
            pad_token_id=pad_token_id, streamer=clock,
        )
    total_s = time.perf_counter() - start_s
    new_tokens = output[:, width:]
    if new_tokens.shape[1] != num_output_tokens:
        raise RuntimeError(f"generate returned {new_tokens.shape[1]} new tokens, expected {num_output_tokens}")
    times_s = clock.token_times_s
    return GenerateTiming(
        batch_size=len(prompts),
        num_prompt_tokens=[len(p) for p in prompts],
        first_token_s=times_s[0] - start_s,
        total_s=total_s,
        gaps_s=list(np.diff(times_s)),
        token_ids=new_tokens.tolist(),
    )


def measure_transformers(model, prompts: list[list[int]], warmup_prompts: list[list[int]], batch_sizes: list[int],
                         num_output_tokens: int, pad_token_id: int, duration_s: float, log=print) -> dict[int, dict]:
    """Per batch size: batch 1 runs the prompts one at a time until duration_s has passed (at least
    one); larger sizes run every full batch of `prompts` in order, once. Each size first runs a
    batch of as many warm-up prompts for 2 tokens: the first call at a size costs seconds more."""
    results = {}
    for batch_size in batch_sizes:
        time_generate(model, warmup_prompts[:batch_size], 2, pad_token_id)
        timings: list[GenerateTiming] = []
        if batch_size == 1:
            started_s = time.perf_counter()
            for prompt in prompts:
                timings.append(time_generate(model, [prompt], num_output_tokens, pad_token_id))
                if time.perf_counter() - started_s >= duration_s:
                    break
        else:
            for first in range(0, len(prompts) - batch_size + 1, batch_size):
                timings.append(time_generate(model, prompts[first:first + batch_size], num_output_tokens,
                                             pad_token_id))
        results[batch_size] = _summarize_batches(timings, num_output_tokens)
        log(f"  transformers batch {batch_size}: {results[batch_size]['output_tokens_per_s']:.1f} tok/s "
            f"over {len(timings)} call(s)")
    return results


def _summarize_batches(timings: list[GenerateTiming], num_output_tokens: int) -> dict:
    gaps_s = [gap for t in timings for gap in t.gaps_s]
    num_requests = sum(t.batch_size for t in timings)
    total_s = sum(t.total_s for t in timings)
    return {
        "batch_size": timings[0].batch_size,
        "num_calls": len(timings),
        "num_requests": num_requests,
        "mean_prompt_tokens": float(np.mean([n for t in timings for n in t.num_prompt_tokens])),
        "padded_prompt_tokens_fraction": 1 - sum(sum(t.num_prompt_tokens) for t in timings) / sum(
            max(t.num_prompt_tokens) * t.batch_size for t in timings),
        "output_tokens_per_s": num_requests * num_output_tokens / total_s,
        "mean_first_token_ms": float(np.mean([t.first_token_s for t in timings])) * 1e3,
        "mean_batch_ms": total_s / len(timings) * 1e3,
        "itl_p50_ms": float(np.percentile(gaps_s, 50)) * 1e3 if gaps_s else None,
        "itl_p99_ms": float(np.percentile(gaps_s, 99)) * 1e3 if gaps_s else None,
        "first_request_token_ids": timings[0].token_ids[0],
    }


# ------------------------------------------------------------------------------------- engine only

def measure_engine_only(engine_config, prompts: list[list[int]], warmup_prompts: list[list[int]],
                        num_output_tokens: int) -> dict:
    """All prompts added at once to an in-process LLMEngine, stepped until done: no gRPC, no threads.
    A wave of as many other prompts runs first for 2 tokens (the first large prefill costs seconds
    more; other prompts, so that the prefix cache holds none of the measured ones)."""
    from services.worker.engine.engine import LLMEngine

    engine = LLMEngine(engine_config)
    run_engine(engine, warmup_prompts[:len(prompts)], 2)
    hits_before = engine.stats().num_prefix_hit_tokens
    step_log, first_token_at_s, token_ids, start_s = run_engine(engine, prompts, num_output_tokens)
    elapsed_s = step_log[-1][0] - start_s
    prefill_done_s = max(first_token_at_s.values())
    decode_steps = [(end_s, took_s, num_tokens) for end_s, took_s, num_tokens in step_log
                    if end_s - took_s >= prefill_done_s]
    ttfts_s = [t - start_s for t in first_token_at_s.values()]
    stats = engine.stats()
    return {
        "num_requests": len(prompts),
        "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])),
        "elapsed_s": elapsed_s,
        "output_tokens_per_s": len(prompts) * num_output_tokens / elapsed_s,
        "num_steps": len(step_log),
        "ttft_p50_ms": float(np.percentile(ttfts_s, 50)) * 1e3,
        "ttft_p99_ms": float(np.percentile(ttfts_s, 99)) * 1e3,
        "all_first_tokens_ms": (prefill_done_s - start_s) * 1e3,
        "decode_step_p50_ms": float(np.median([s[1] for s in decode_steps])) * 1e3 if decode_steps else None,
        "decode_tokens_per_s": (sum(s[2] for s in decode_steps) / sum(s[1] for s in decode_steps)
                                if decode_steps else None),
        "prefix_hit_tokens": stats.num_prefix_hit_tokens - hits_before,
        "first_request_token_ids": token_ids[0],
    }


def run_engine(engine, prompts: list[list[int]], num_output_tokens: int):
    """Adds the prompts (greedy, ignore_eos) and steps until done: (end, duration, tokens) per step,
    first-token time per request, token ids per request, start time."""
    from services.worker.engine.sampler import SamplingParams

    params = SamplingParams(max_tokens=num_output_tokens, temperature=0.0, ignore_eos=True)
    request_ids = [f"request-{i}" for i in range(len(prompts))]  # unique while in flight
    start_s = time.perf_counter()
    for request_id, prompt in zip(request_ids, prompts):
        engine.add_request(request_id, prompt, params)
    step_log, first_token_at_s = [], {}
    token_ids: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    while engine.has_unfinished():
        step_start_s = time.perf_counter()
        outputs = engine.step()
        end_s = time.perf_counter()
        step_log.append((end_s, end_s - step_start_s, sum(len(o.new_token_ids) for o in outputs)))
        for output in outputs:
            if output.new_token_ids:
                first_token_at_s.setdefault(output.request_id, end_s)
                token_ids[output.request_id] += output.new_token_ids
    return step_log, first_token_at_s, [token_ids[r] for r in request_ids], start_s


# ------------------------------------------------------------------------ static batching, simulated

def simulate_static_batching(arrivals_s: list[float], batch_size: int, transformers: dict[int, dict]) -> dict:
    """TTFT and latency under the given arrivals for a server that runs static batches of at most
    batch_size. A batch of b requests takes the measured time, interpolated linearly in b between
    the measured batch sizes (prompt lengths as in the measured batches)."""
    sizes = sorted(transformers)
    first_token_s = [transformers[s]["mean_first_token_ms"] / 1e3 for s in sizes]
    batch_s = [transformers[s]["mean_batch_ms"] / 1e3 for s in sizes]
    ttfts_s, latencies_s, batch_sizes = [], [], []
    free_at_s, next_index = 0.0, 0
    while next_index < len(arrivals_s):
        start_s = max(free_at_s, arrivals_s[next_index])
        last = next_index
        while last < len(arrivals_s) and last - next_index < batch_size and arrivals_s[last] <= start_s:
            last += 1
        size = last - next_index
        took_first_s, took_s = np.interp(size, sizes, first_token_s), np.interp(size, sizes, batch_s)
        for arrival_s in arrivals_s[next_index:last]:
            ttfts_s.append(start_s + took_first_s - arrival_s)
            latencies_s.append(start_s + took_s - arrival_s)
        batch_sizes.append(size)
        free_at_s, next_index = start_s + took_s, last
    capacity_per_s = batch_size / float(np.interp(batch_size, sizes, batch_s))
    offered_per_s = len(arrivals_s) / arrivals_s[-1] if len(arrivals_s) > 1 else 0.0
    return {
        "batch_size": batch_size,
        "num_requests": len(arrivals_s),
        "mean_batch_size": float(np.mean(batch_sizes)) if batch_sizes else None,
        "capacity_requests_per_s": capacity_per_s,
        "overloaded": offered_per_s > capacity_per_s,  # then the queue, and the p99, grow with the run
        "ttft_p50_ms": float(np.percentile(ttfts_s, 50)) * 1e3 if ttfts_s else None,
        "ttft_p99_ms": float(np.percentile(ttfts_s, 99)) * 1e3 if ttfts_s else None,
        "latency_p50_ms": float(np.percentile(latencies_s, 50)) * 1e3 if latencies_s else None,
        "latency_p99_ms": float(np.percentile(latencies_s, 99)) * 1e3 if latencies_s else None,
    }
