"""A BERT-family sentence encoder served through the dynamic batcher, as a Triton-style model.

Inputs (one of the two forms per request):
  text            BYTES [-1, 1]   UTF-8 texts, tokenized here
  input_ids       INT64 [-1, -1]  for callers that tokenize themselves
  attention_mask  INT64 [-1, -1]  optional with input_ids (default: all ones)
Output:
  embedding       FP32  [-1, dim] mean-pooled, L2-normalised as sentence-transformers does

Requests are checked on the gRPC thread before they reach the batcher, so a batch only ever holds
valid requests and one caller's mistake never fails another's. Tokenization and the model both run
on the batcher's thread; a batch is padded per length bucket, not to its longest text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.worker.batcher import BatchOutput, BatcherConfig, DynamicBatcher
from services.worker.models.sentence_encoder import SentenceEncoder
from services.worker.request_telemetry import observe_batch
from services.worker.statistics import ModelStats, StatisticsRecorder
from services.worker.tensor_codec import TensorSpec, check_requested_outputs, decode_inputs

PLATFORM = "tensoryard_sentence_encoder"


@dataclass(frozen=True, slots=True)
class EmbedJob:
    """What one request asks of a batch: texts, or token ids already padded by the caller."""

    texts: list[str] | None = None
    input_ids: np.ndarray | None = None  # [N, T] int64
    attention_mask: np.ndarray | None = None  # [N, T] int64
    # (started_s, finished_s) of the batch that ran it, monotonic: set on the batcher's thread, read
    # by the caller once its result is in (the request's access line and spans).
    ran_s: list[float] = field(default_factory=list, compare=False, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.input_ids.shape[0])


class EmbeddingModel:
    platform = PLATFORM
    decoupled = False
    reports_load = False  # no engine reports: each finished request wakes the load stream

    def __init__(self, name: str, version: str, encoder: SentenceEncoder, batcher_config: BatcherConfig):
        self.name = name
        self.version = version
        self.encoder = encoder
        self.batcher_config = batcher_config
        self.inputs = {
            "text": TensorSpec("text", "BYTES", (1,), optional=True),
            "input_ids": TensorSpec("input_ids", "INT64", (-1,), optional=True),
            "attention_mask": TensorSpec("attention_mask", "INT64", (-1,), optional=True),
        }
        self.outputs = {"embedding": TensorSpec("embedding", "FP32", (encoder.dim,))}
        self.recorder = StatisticsRecorder()  # ModelStatistics and nv_inference_* read it
        self.batcher = DynamicBatcher(batcher_config, self._execute, name=name, statistics=self.recorder)

    @property
    def max_batch_size(self) -> int:
        return self.batcher_config.max_batch_size

    @property
    def device(self) -> str:
        return str(self.encoder.device)

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def statistics(self) -> ModelStats:
        return self.recorder.snapshot()

    def load_fields(self) -> dict:
        return {}

    # -- request side (gRPC thread) ----------------------------------------------------------

    def job_from_infer_request(self, request) -> EmbedJob:
        check_requested_outputs(request, self.outputs, self.name)
        arrays, _ = decode_inputs(request, self.inputs, self.name, self.max_batch_size)
        if "text" in arrays:
            if "input_ids" in arrays or "attention_mask" in arrays:
                raise InvalidArgument("send either 'text' or 'input_ids' (+ 'attention_mask'), not both")
            return self.job_from_texts([_utf8(v, i) for i, v in enumerate(arrays["text"].reshape(-1))])
        if "input_ids" not in arrays:
            raise InvalidArgument(
                f"model '{self.name}' needs input 'text' (BYTES [-1, 1]) or 'input_ids' (INT64 [-1, -1])"
            )
        return self._job_from_ids(arrays["input_ids"], arrays.get("attention_mask"))

    def job_from_texts(self, texts: list[str]) -> EmbedJob:
        if not texts:
            raise InvalidArgument("empty batch: send at least one text")
        if len(texts) > self.max_batch_size:
            raise InvalidArgument(
                f"{len(texts)} texts exceed model '{self.name}' max_batch_size {self.max_batch_size}"
            )
        return EmbedJob(texts=texts)

    def _job_from_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> EmbedJob:
        num_tokens = input_ids.shape[1]
        if num_tokens == 0 or num_tokens > self.encoder.max_seq_length:
            raise InvalidArgument(
                f"input_ids has {num_tokens} tokens per row; model '{self.name}' takes "
                f"1..{self.encoder.max_seq_length}"
            )
        vocab_size = self.encoder.vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab_size:
            raise InvalidArgument(f"input_ids must lie in [0, {vocab_size}) for model '{self.name}'")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise InvalidArgument(
                f"attention_mask has shape {list(attention_mask.shape)} but input_ids has "
                f"{list(input_ids.shape)}"
            )
        elif not np.isin(attention_mask, (0, 1)).all() or (attention_mask.sum(axis=1) == 0).any():
            raise InvalidArgument("attention_mask must hold 0/1 with at least one 1 per row")
        return EmbedJob(
            input_ids=np.ascontiguousarray(input_ids, dtype=np.int64),
            attention_mask=np.ascontiguousarray(attention_mask, dtype=np.int64),
        )

    async def embed(self, job: EmbedJob) -> np.ndarray:
        """[N, dim] float32, through the batcher."""
        queued_s = time.monotonic()
        embeddings = await self.batcher.submit_async(job, job.num_items)
        if job.ran_s:
            observe_batch(queued_s, *job.ran_s, job.num_items, job.texts)
        return embeddings

    async def infer(self, request, timeout_s: float | None = None) -> pb.ModelInferResponse:
        embeddings = await self.embed(self.job_from_infer_request(request))
        return pb.ModelInferResponse(
            model_name=self.name,
            model_version=self.version,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name="embedding", datatype="FP32", shape=list(embeddings.shape)
                )
            ],
            raw_output_contents=[np.ascontiguousarray(embeddings, dtype="<f4").tobytes()],
        )

    # -- batch side (batcher thread) -----------------------------------------------------------

    def _execute(self, jobs: list[EmbedJob]) -> BatchOutput:
        started_ns = time.monotonic_ns()
        texts = [t for job in jobs if job.texts is not None for t in job.texts]
        token_rows: list[list[int]] = self.encoder.tokenize(texts) if texts else []
        rows = iter(token_rows)
        per_job_rows: list[list[list[int]]] = []
        for job in jobs:
            if job.texts is not None:
                per_job_rows.append([next(rows) for _ in job.texts])
            else:
                per_job_rows.append(
                    [ids[mask.astype(bool)].tolist() for ids, mask in zip(job.input_ids, job.attention_mask)]
                )
        flat = [row for job_rows in per_job_rows for row in job_rows]
        tokenized_ns = time.monotonic_ns()
        embeddings = self.encoder.embed_token_lists(flat)
        computed_ns = time.monotonic_ns()
        results, start = [], 0
        for job_rows in per_job_rows:
            results.append(embeddings[start : start + len(job_rows)])
            start += len(job_rows)
        ran_s = [started_ns / 1e9, time.monotonic_ns() / 1e9]
        for job in jobs:
            job.ran_s[:] = ran_s
        return BatchOutput(
            results,
            compute_input_ns=tokenized_ns - started_ns,
            compute_output_ns=time.monotonic_ns() - computed_ns,
        )

    def warm_up(self, num_batches: int) -> None:
        """Run the model on short and long inputs so the first requests pay no first-call costs.

        Straight to the encoder, not through the batcher: warm-up is not traffic and must not
        show in the model's statistics.
        """
        for _ in range(num_batches):
            self.encoder.embed_texts(["warm up"] * min(8, self.max_batch_size))
            self.encoder.embed_texts(["warm up " * 200])

    def close(self) -> None:
        self.batcher.close(timeout_s=30)


def _utf8(value, index: int) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"text element {index} is not valid UTF-8: {error}") from None
