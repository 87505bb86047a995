"""An OTLP/gRPC trace endpoint that counts what it is sent and keeps nothing, for benchmarks that
run with trace export on: the exporters do all their real work (batching, encoding, sending), and
the sink stays cheap. Prints "otlp sink listening on PORT" once it accepts exports.

    .venv/bin/python -m bench.otlp_sink --port N
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _CountingTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.num_exports = 0
        self.num_spans = 0

    def Export(self, request, context):
        self.num_exports += 1
        self.num_spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    service = _CountingTraceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"otlp sink listening on {args.port}", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1)
    print(f"otlp sink received {service.num_spans} spans in {service.num_exports} exports", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
