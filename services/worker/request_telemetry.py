"""What a request's run in the worker adds to its call's access line and trace.

The interceptor opened the call's record (services/common/access_log.py) and, when traces are
exported, its server span (services/common/tracing.py). Here, after the fact:
- a generation's final output carries the engine's timings (`RequestOutput.timings`, on the
  monotonic clock): queue and compute time and token counts go on the record, and the phases
  become child spans `engine.queue` (arrival to first scheduled), `engine.prefill` (to the first
  token) and `engine.decode` (to the end; preemptions, if any, fall inside these);
- an embedding request's batch: its queue and compute time and batch size as attributes of the
  call's span (`tensoryard.batcher.queue_ms`, `.compute_ms`, `.num_items`), not child spans: a
  request of a few milliseconds is the batcher's common case, and two more SDK spans each cost it
  about as much as the rest of its tracing (bench/bench_observability.py).
With no record (a call from outside a gRPC server) or no span, this costs a few attribute writes.
"""

from __future__ import annotations

from services.common.access_log import current_request, log_prompts
from services.common.tracing import add_child_span, wall_clock_offset_ns
from services.worker.engine.engine import RequestOutput


class GenerationTelemetry:
    """Follows one generation's outputs; the final one fills the record and adds the spans."""

    __slots__ = ("record", "_texts")

    def __init__(self) -> None:
        self.record = current_request()
        # Output text, kept only when prompts and outputs may be logged.
        self._texts: list[str] | None = [] if self.record is not None and log_prompts() else None

    def on_output(self, output: RequestOutput, prompt_token_ids, tokenizer) -> None:
        if self._texts is not None:
            self._texts.append(output.text_delta)
        timings = output.timings
        record = self.record
        if timings is None or record is None:
            return
        record.queue_ns = int(timings.queue_s * 1e9)
        if timings.inference_s is not None:
            record.compute_ns = int(timings.inference_s * 1e9)
        record.num_prompt_tokens = output.usage.num_prompt_tokens
        record.num_output_tokens = output.usage.num_completion_tokens
        if self._texts is not None:
            record.prompt = tokenizer.decode(list(prompt_token_ids)) if tokenizer is not None else None
            record.output = "".join(self._texts)
        if record.span is None:
            return
        scheduled_s, first_token_s = timings.first_scheduled_s, timings.first_token_s
        offset_ns = wall_clock_offset_ns()  # one for the three: they meet end to start
        add_child_span(record, "engine.queue", timings.arrival_s,
                       scheduled_s if scheduled_s is not None else timings.finished_s, offset_ns=offset_ns)
        if scheduled_s is not None and first_token_s is not None:
            add_child_span(record, "engine.prefill", scheduled_s, first_token_s,
                           {"tensoryard.num_prompt_tokens": output.usage.num_prompt_tokens,
                            "tensoryard.num_cached_tokens": output.usage.num_cached_tokens}, offset_ns)
        if first_token_s is not None:
            add_child_span(record, "engine.decode", first_token_s, timings.finished_s,
                           {"tensoryard.num_output_tokens": output.usage.num_completion_tokens,
                            "tensoryard.num_preemptions": timings.num_preemptions,
                            "tensoryard.finish_reason": output.finish_reason or ""}, offset_ns)


def observe_batch(queued_s: float, started_s: float, finished_s: float, num_items: int,
                  texts: list[str] | None = None) -> None:
    """An embedding request's time in the batcher, on the monotonic clock (and its texts, the
    prompts, when they may be logged)."""
    record = current_request()
    if record is None:
        return
    record.queue_ns = int((started_s - queued_s) * 1e9)
    record.compute_ns = int((finished_s - started_s) * 1e9)
    if texts is not None and log_prompts():
        record.prompt = texts
    if record.span is not None:
        record.span.set_attributes({"tensoryard.batcher.queue_ms": (started_s - queued_s) * 1e3,
                                    "tensoryard.batcher.compute_ms": (finished_s - started_s) * 1e3,
                                    "tensoryard.batcher.num_items": num_items})
