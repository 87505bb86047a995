"""Building the served model from a fetched version: an embedding encoder or an LLM engine.

The version's config (set at registration) gives serving parameters; the worker's own flags
override them; anything left unset takes the defaults here.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from services.common.config import WorkerConfig
from services.common.errors import FailedPrecondition
from services.worker.admission import AdmissionConfig
from services.worker.batcher import BatcherConfig
from services.common.chat_template import ChatTemplate
from services.worker.embedding_model import EmbeddingModel
from services.worker.engine_settings import engine_config_for, weight_bytes
from services.worker.engine.config import EngineConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.loop import EngineLoop
from services.worker.engine.sampler import SamplingParams
from services.worker.generation_jobs import sampling_defaults_from
from services.worker.generation_model import GenerationModel
from services.worker.load_reports import LoadPublisher
from services.worker.model_files import FetchedVersion
from services.worker.models.sentence_encoder import SentenceEncoder

# Embedding model defaults.
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 1_000
DEFAULT_MAX_QUEUE_SIZE = 1_024


def batcher_config_for(version_config: dict, config: WorkerConfig) -> BatcherConfig:
    max_batch_size = config.max_batch_size or int(version_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
    preferred = tuple(
        int(s) for s in version_config.get("preferred_batch_sizes", ()) if int(s) <= max_batch_size
    )
    delay_us = (
        config.max_queue_delay_us
        if config.max_queue_delay_us >= 0
        else int(version_config.get("max_queue_delay_us", DEFAULT_MAX_QUEUE_DELAY_US))
    )
    return BatcherConfig(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=delay_us,
        max_queue_size=config.max_queue_size or int(version_config.get("max_queue_size", DEFAULT_MAX_QUEUE_SIZE)),
    )


def admission_config_for(fetched: FetchedVersion, config: WorkerConfig, engine: EngineConfig) -> AdmissionConfig:
    version_config = fetched.config
    defaults = AdmissionConfig()
    return AdmissionConfig(
        max_num_waiting=engine.scheduler.max_num_waiting,
        max_num_queued_tokens=int(config.max_num_queued_tokens or version_config.get("max_num_queued_tokens")
                                  or defaults.max_num_queued_tokens),
        max_queue_wait_s=float(config.max_queue_wait_s or version_config.get("max_queue_wait_s")
                               or defaults.max_queue_wait_s),  # 0: auto
    )


def load_model(fetched: FetchedVersion, config: WorkerConfig, publisher: LoadPublisher | None = None):
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    if fetched.config.get("backend") == "onnxruntime":
        # Imported here: onnx_loading builds on this module (batcher_config_for).
        from services.worker.onnx_loading import load_onnx_model

        return load_onnx_model(fetched, config)
    if fetched.task == "embedding":
        encoder = SentenceEncoder.from_folder(fetched.folder, device=config.device)
        model = EmbeddingModel(
            fetched.model_name, str(fetched.version), encoder, batcher_config_for(fetched.config, config)
        )
        model.weight_bytes = weight_bytes(encoder.model)
        return model
    if fetched.task == "generation":
        return _load_generation_model(fetched, config, publisher)
    raise FailedPrecondition(
        f"model '{fetched.model_name}' has task {fetched.task!r}; workers serve embedding and generation models, "
        "and ONNX versions (config backend 'onnxruntime', as `models import model.onnx` writes)"
    )


def _load_generation_model(fetched: FetchedVersion, config: WorkerConfig, publisher) -> GenerationModel:
    tokenizer = Tokenizer.from_file(str(fetched.folder / "tokenizer.json"))
    engine_config = engine_config_for(fetched, config)
    engines: list[LLMEngine] = []

    def build() -> LLMEngine:
        engines.append(LLMEngine(engine_config, tokenizer))
        return engines[0]

    loop = EngineLoop(build)
    loop.start()
    model = GenerationModel(
        fetched.model_name,
        str(fetched.version),
        loop,
        tokenizer,
        ChatTemplate.from_folder(fetched.folder),
        sampling_defaults_from(fetched.folder),
        engines[0].max_model_len,
        device=config.device,
        admission=admission_config_for(fetched, config, engine_config),
        publisher=publisher,
        block_size=engine_config.cache.block_size,
    )
    # Read here, before any request: the engine thread owns the engine from now on, and these never change.
    model.weight_bytes = weight_bytes(engines[0].runner.model)
    model.weight_dtype = engines[0].dtypes.weight_dtype
    model.kv_cache_dtype = engines[0].dtypes.kv_cache_dtype_name
    model.kv_cache_bytes = sum(t.numel() * t.element_size() for pair in engines[0].runner.kv_caches for t in pair)
    return model


def warm_up(model, num_batches: int) -> None:
    if not isinstance(model, GenerationModel):  # batcher models (embeddings, ONNX) warm themselves
        model.warm_up(num_batches)
        return
    # A short and a longer prompt through the whole engine path (allocations, first-call costs),
    # then a small batch: the step-time model behind admission control starts from real steps of
    # several sizes rather than its prior.
    for index in range(num_batches):
        for prompt_tokens in (4, 64):
            _wait_finished(model.loop.submit(
                f"warm-up-{index}-{prompt_tokens}", [1] * prompt_tokens, SamplingParams(max_tokens=2, temperature=0)
            ))
        batch_size = min(8, model.admission.config.max_num_waiting)  # a one-seat queue takes one at a time
        batch = [
            model.loop.submit(f"warm-up-{index}-batch-{i}", [2 + i] * 8, SamplingParams(max_tokens=4, temperature=0))
            for i in range(batch_size)
        ]
        for outputs in batch:
            _wait_finished(outputs)


def _wait_finished(outputs) -> None:
    while not getattr(item := outputs.get(timeout=120), "finished", True):
        pass
    if isinstance(item, Exception):
        raise item
