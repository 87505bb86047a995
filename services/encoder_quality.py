"""The quality check of an optimised sentence encoder: cosine similarity of its embeddings with
the float32 torch path's, text by text, over a fixed set of texts (short and long, several
languages and scripts, one past the truncation length).

`models export-onnx` runs it before pushing and stores the figures in the new version's metadata
labels (`quality.*`), refusing to push below the bound for the version's kind. The same texts and
the reference's embeddings become the version's gate (golden embeddings, services/rollout/gate.py)
unless --gate names another, so `models gate` and promotion hold the serving replicas to the
bound too, not just the file checked here. The bounds were
set from all-MiniLM-L6-v2: float32 ONNX agrees to ~1 - 1e-6; int8 dynamic quantization (per
channel) keeps 0.98-0.995.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

QUALITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "hi",
    "How do I serve sentence embeddings with low latency on a CPU?",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Die Katze schläft auf dem Sofa, während es draußen regnet.",
    "猫はソファの上で寝ています。",
    "我喜欢在周末去公园散步。",
    "القطة نائمة على الأريكة",
    "Emoji test 🚀🔥 with mixed 文字 and accents: naïve café.",
    "A much longer passage that keeps going " * 60,  # past the truncation length
    "Refunds are issued within 14 days of the return being received at our warehouse.",
    "SELECT name, count(*) FROM orders GROUP BY name HAVING count(*) > 3;",
    "The mitochondria is the powerhouse of the cell.",
    "Quarterly revenue grew 12% year over year, driven by subscriptions.",
    "   ",
    "Short.",
)
# Lowest cosine similarity with float32 torch that a version of each kind may have.
MIN_COSINE = {"float32": 0.999, "int8_dynamic": 0.97}


@dataclass(frozen=True, slots=True)
class EncoderAgreement:
    min_cosine: float
    mean_cosine: float
    num_texts: int
    reference: str  # what it was compared with, e.g. "all-MiniLM-L6-v2:1 float32 torch"
    texts: tuple[str, ...] = ()
    expected: np.ndarray | None = field(default=None, repr=False, compare=False)  # [N, dim], the reference's

    def labels(self) -> dict[str, str]:
        """The version metadata labels that record it."""
        return {"quality.min_cosine_vs_float32": f"{self.min_cosine:.6f}",
                "quality.mean_cosine_vs_float32": f"{self.mean_cosine:.6f}",
                "quality.num_texts": str(self.num_texts),
                "quality.reference": self.reference}


def encoder_agreement(reference, candidate, reference_name: str,
                      texts: tuple[str, ...] = QUALITY_TEXTS) -> EncoderAgreement:
    """Both encoders expose `embed_texts(list[str]) -> [N, dim]` (SentenceEncoder and its ONNX kin)."""
    expected = reference.embed_texts(list(texts))
    got = candidate.embed_texts(list(texts))
    cosines = _cosines(expected, got)
    return EncoderAgreement(float(cosines.min()), float(cosines.mean()), len(texts), reference_name, tuple(texts),
                            expected)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)
