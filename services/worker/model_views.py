"""Triton-protocol views of a served model: metadata, configuration, statistics."""

from __future__ import annotations

from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc
from services.worker.statistics import ModelStats

_CONFIG_DATATYPES = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}


def model_metadata(model) -> pb.ModelMetadataResponse:
    batched = model.max_batch_size > 0

    def tensors(specs):
        return [
            pb.ModelMetadataResponse.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=s.shape_with_batch(batched)
            )
            for s in specs.values()
        ]

    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[model.version],
        platform=model.platform,
        inputs=tensors(model.inputs),
        outputs=tensors(model.outputs),
    )


def model_config(model) -> pb.ModelConfigResponse:
    config = mc.ModelConfig(
        name=model.name,
        platform=model.platform,
        backend=getattr(model, "backend", "tensoryard"),  # "onnxruntime" for ONNX versions
        max_batch_size=model.max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        input=[
            mc.ModelInput(name=s.name, data_type=_CONFIG_DATATYPES[s.datatype], dims=s.dims, optional=s.optional)
            for s in model.inputs.values()
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=_CONFIG_DATATYPES[s.datatype], dims=s.dims)
            for s in model.outputs.values()
        ],
        instance_group=[mc.ModelInstanceGroup(name=f"{model.name}_0", kind=_instance_kind(model), count=1)],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=model.decoupled),
    )
    batcher = getattr(model, "batcher_config", None)
    if batcher is not None:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=batcher.preferred_batch_sizes,
                max_queue_delay_microseconds=batcher.max_queue_delay_us,
                default_queue_policy=mc.ModelQueuePolicy(max_queue_size=batcher.max_queue_size),
            )
        )
    # Each kind of model says what else matters about it: the session's settings for an ONNX
    # graph, the longest input for an encoder, the context length for an LLM.
    if hasattr(model, "config_parameters"):
        for key, value in model.config_parameters().items():
            config.parameters[key].string_value = value
    elif batcher is not None:
        config.parameters["max_seq_length"].string_value = str(model.encoder.max_seq_length)
    else:
        config.parameters["max_model_len"].string_value = str(model.max_model_len)
        for name in ("weight_dtype", "kv_cache_dtype"):
            if getattr(model, name, ""):
                config.parameters[name].string_value = getattr(model, name)
    return pb.ModelConfigResponse(config=config)


def _instance_kind(model):
    return (
        mc.ModelInstanceGroup.KIND_GPU if model.device.startswith("cuda") else mc.ModelInstanceGroup.KIND_CPU
    )


def model_statistics(model, stats: ModelStats) -> pb.ModelStatistics:
    def duration(d):
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_infer=duration(stats.compute_infer),
            compute_input=duration(stats.compute_input),
            compute_output=duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_infer=duration(b.compute_infer),
                compute_input=duration(b.compute_input),
                compute_output=duration(b.compute_output),
            )
            for b in stats.batch_stats
        ],
    )
