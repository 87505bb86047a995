"""vLLM's V1 request and step histograms, under `tensoryard:`, fed from the engine's own records.

Names, meanings and bucket boundaries are vLLM's (vllm/v1/metrics/loggers.py), so a vLLM dashboard
works after renaming the prefix; labels are `model`, `version` and `worker` (docs/METRICS.md).

Nothing here runs on the engine thread. `observe_finished` takes a request's final RequestOutput
(its `timings`, `usage`) and `observe_step` each step's `StepRecord`, both on the engine loop's
dispatcher thread, which hands outputs and reports on anyway. Gauges and the counters the engine
keeps itself (running, waiting, KV use, prefix-cache lookups, preemptions) are read from the latest
EngineStats at scrape time instead (`services/worker/metrics.py`), which costs serving nothing.

Per request the clock is the engine's: arrival (taken into the engine), first scheduled, first token
on this replica (a resumed request's first token is its first here), finished. Requests are
observed when they finish, whatever the reason (`stop`, `length`, `abort`, `deadline`), so the time
to first token of a request still running shows once it ends.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import REGISTRY

from services.common.telemetry import get_logger
from services.worker.engine.engine import RequestOutput, StepRecord

log = get_logger(__name__)

PREFIX = "tensoryard:"
LABELS = ("model", "version", "worker")
FINISHED_REASONS = ("stop", "length", "abort", "deadline")

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                         10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                             120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Not a vLLM family: the engine's step, from a fraction of a millisecond (a GPU decode step) to
# seconds (a long prefill on a CPU).
STEP_DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class LLMMetrics:
    """One LLM worker's request and step families, their children bound to its labels once."""

    def __init__(self, model: str, version: str, worker: str, max_model_len: int, registry=REGISTRY):
        values = (model, version, worker)
        token_buckets = buckets_1_2_5(max_model_len)

        def histogram(name: str, documentation: str, buckets):
            family = prometheus_client.Histogram(PREFIX + name, documentation, LABELS, buckets=buckets,
                                                 registry=registry)
            return family.labels(*values)

        def counter(name: str, documentation: str):
            return prometheus_client.Counter(PREFIX + name, documentation, LABELS, registry=registry).labels(*values)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first output token.",
                              TTFT_BUCKETS_S)
        self.inter_token = histogram("inter_token_latency_seconds", "Time between successive output tokens.",
                                     INTER_TOKEN_BUCKETS_S)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to finished.",
                             REQUEST_LATENCY_BUCKETS_S)
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to first scheduled (WAITING).",
                               REQUEST_LATENCY_BUCKETS_S)
        self.prefill = histogram("request_prefill_time_seconds", "Time from first scheduled to first token.",
                                 REQUEST_LATENCY_BUCKETS_S)
        self.decode = histogram("request_decode_time_seconds", "Time from first token to finished.",
                                REQUEST_LATENCY_BUCKETS_S)
        self.inference = histogram("request_inference_time_seconds", "Time from first scheduled to finished.",
                                   REQUEST_LATENCY_BUCKETS_S)
        self.prompt_length = histogram("request_prompt_tokens", "Prompt tokens of finished requests.",
                                       token_buckets)
        self.output_length = histogram("request_generation_tokens", "Output tokens of finished requests.",
                                       token_buckets)
        self.max_tokens = histogram("request_params_max_tokens", "The max_tokens requests asked for.",
                                    token_buckets)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per engine step.",
                                          ITERATION_TOKEN_BUCKETS)
        self.step_duration = histogram("engine_step_duration_seconds", "Wall time of one engine step.",
                                       STEP_DURATION_BUCKETS_S)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Output tokens generated on this worker.")
        success = prometheus_client.Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                                            (*LABELS, "finished_reason"), registry=registry)
        self.success = {reason: success.labels(*values, reason) for reason in FINISHED_REASONS}
        self._failed_once = False

    def observe_finished(self, max_tokens: int, output: RequestOutput) -> None:
        """A request's final output (dispatcher thread)."""
        try:
            timings, usage = output.timings, output.usage
            self.e2e.observe(timings.e2e_s)
            self.queue.observe(timings.queue_s)
            for histogram, value in ((self.ttft, timings.ttft_s), (self.prefill, timings.prefill_s),
                                     (self.decode, timings.decode_s), (self.inference, timings.inference_s)):
                if value is not None:
                    histogram.observe(value)
            self.prompt_length.observe(usage.num_prompt_tokens)
            self.output_length.observe(usage.num_completion_tokens)
            self.max_tokens.observe(max_tokens)
            self.prompt_tokens.inc(usage.num_prompt_tokens)
            success = self.success.get(output.finish_reason)
            if success is not None:
                success.inc()
        except Exception as error:  # noqa: BLE001 - a metrics bug must not stop the dispatcher thread
            self._failed(error)

    def observe_step(self, step: StepRecord) -> None:
        """One engine step that ran a batch (dispatcher thread)."""
        try:
            self.iteration_tokens.observe(step.num_tokens)
            self.step_duration.observe(step.duration_s)
            self.generation_tokens.inc(step.num_sampled)
            observe = self.inter_token.observe
            for latency_s in step.inter_token_latencies_s:
                observe(latency_s)
        except Exception as error:  # noqa: BLE001
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        if not self._failed_once:
            self._failed_once = True
            log.error("llm_metrics_failed", error=repr(error), exc_info=error)
