"""What every `models` command gets: the registry stub (admin token attached), output streams, --json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TextIO

import grpc

from protos.tensoryard.v1 import registry_pb2_grpc


@dataclass(frozen=True, slots=True)
class Context:
    channel: grpc.Channel
    json: bool
    out: TextIO
    err: TextIO
    user: str  # who runs the command, for lineage's created_by

    @property
    def stub(self) -> registry_pb2_grpc.ModelRegistryStub:
        return registry_pb2_grpc.ModelRegistryStub(self.channel)

    def say(self, line: str = "") -> None:
        print(line, file=self.out)

    def emit(self, value) -> None:
        print(json.dumps(value, indent=2, sort_keys=False), file=self.out)
