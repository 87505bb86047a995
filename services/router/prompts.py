"""The router's tokenizers: a generation request's prompt as token ids and block hashes.

KV-aware routing hashes a prompt's blocks the way the worker's cache names them, so the router needs
the same token ids the worker will compute: the same tokenizer and chat template
(services/common/prompting.py), fetched from the registry per (model, version) — `tokenizer.json` and
`tokenizer_config.json` only, verified by sha256, held in memory. They load in the background when a
replica of a generation model appears; until then requests route by load alone. The token ids are
forwarded to the worker with the request, so the prompt is tokenized once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

import grpc
from tokenizers import Tokenizer

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.chat_template import ChatTemplate
from services.common.errors import IntegrityError
from services.common.kv_blocks import block_hashes
from services.common.prompting import prompt_token_ids
from services.common.telemetry import get_logger

log = get_logger(__name__)

_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True, slots=True)
class PromptTokenizer:
    model_name: str
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None

    def token_ids(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        return prompt_token_ids(self.tokenizer, self.chat_template, self.model_name, prompt=prompt, messages=messages)


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """The hashes of the full blocks a worker's cache could hold for this prompt. The last token is
    always computed (its logits start the generation), so a prompt of exactly N blocks can reuse
    N - 1 of them, as the worker's cache lookup does."""
    return block_hashes(token_ids, block_size, (len(token_ids) - 1) // block_size)


class PromptTokenizers:
    def __init__(self, registry_channel: grpc.aio.Channel):
        self._stub = registry_pb2_grpc.ModelRegistryStub(registry_channel)
        self._loaded: dict[tuple[str, str], PromptTokenizer | None] = {}
        self._loading: dict[tuple[str, str], asyncio.Task] = {}

    def get(self, model_name: str, model_version: str) -> PromptTokenizer | None:
        """The tokenizer if loaded; otherwise starts loading it and returns None."""
        key = (model_name, model_version)
        if key in self._loaded:
            return self._loaded[key]
        if key not in self._loading:
            self._loading[key] = asyncio.create_task(self._load(key))
        return None

    async def ready(self, model_name: str, model_version: str) -> PromptTokenizer | None:
        self.get(model_name, model_version)
        task = self._loading.get((model_name, model_version))
        if task is not None:
            await asyncio.shield(task)
        return self._loaded.get((model_name, model_version))

    async def _load(self, key: tuple[str, str]) -> None:
        model_name, model_version = key
        try:
            self._loaded[key] = await self._fetch(model_name, model_version)
            log.info("router_tokenizer_loaded", model=model_name, version=model_version)
        except (grpc.aio.AioRpcError, IntegrityError, ValueError, KeyError) as error:
            # Without a tokenizer the model is routed by load alone; say so once.
            self._loaded[key] = None
            log.warning("router_tokenizer_unavailable", model=model_name, version=model_version, error=str(error))
        finally:
            self._loading.pop(key, None)

    async def _fetch(self, model_name: str, model_version: str) -> PromptTokenizer | None:
        manifest = await self._stub.GetVersion(
            registry_pb2.GetVersionRequest(model_name=model_name, version=int(model_version or 0)), timeout=10
        )
        if manifest.task != "generation":
            return None
        files = {f.path: f for f in manifest.files if f.path in _FILES}
        if "tokenizer.json" not in files:
            raise KeyError(f"version {manifest.version} of {model_name} has no tokenizer.json")
        contents = {path: await self._download(file) for path, file in files.items()}
        tokenizer = Tokenizer.from_str(contents["tokenizer.json"].decode("utf-8"))
        chat_template = None
        if "tokenizer_config.json" in contents:
            chat_template = ChatTemplate.from_config(json.loads(contents["tokenizer_config.json"]))
        return PromptTokenizer(model_name, tokenizer, chat_template)

    async def _download(self, file: registry_pb2.ModelFile) -> bytes:
        chunks = [c.data async for c in self._stub.DownloadBlob(
            registry_pb2.DownloadBlobRequest(sha256=file.sha256), timeout=30
        )]
        data = b"".join(chunks)
        if hashlib.sha256(data).hexdigest() != file.sha256:
            raise IntegrityError(f"{file.path} does not match its sha256 {file.sha256}")
        return data
