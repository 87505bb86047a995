"""How long an engine step takes, learned from the steps the engine runs.

A step's time is modelled as linear in what it computes:

    step_s ≈ base_s + per_seq_s * num_seqs + per_prefill_token_s * num_prefill_tokens

(a fixed part — reading every weight once, launching the layers —, a part per sequence in the batch,
which dominates decode, and a part per prompt token computed). Admission control uses it to estimate
how long a new request would wait and run. The coefficients are fitted by recursive least squares
with exponential forgetting, so they follow the machine as its load changes (another process taking
a core), starting from a prior that the warm-up steps quickly replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Forgetting factor: the fit's memory is about 1 / (1 - FORGETTING) steps.
FORGETTING = 0.98
# Prior coefficients (base, per sequence, per prompt token), seconds: a small CPU model.
PRIOR_S = (0.02, 0.002, 0.0005)
# How sure the prior is: small values let the first real steps override it.
PRIOR_WEIGHT = 1e-3
# Steps that all look alike (a steady decode batch) excite one direction only; forgetting would then
# inflate the covariance in the others without bound ("wind-up"). Its trace is capped instead.
MAX_COVARIANCE_TRACE = 1e6


@dataclass(frozen=True, slots=True)
class StepCost:
    """The fitted coefficients, as published with the engine's stats."""

    base_s: float
    per_seq_s: float
    per_prefill_token_s: float

    def step_s(self, num_seqs: int, num_prefill_tokens: int = 0) -> float:
        return self.base_s + self.per_seq_s * num_seqs + self.per_prefill_token_s * num_prefill_tokens


class StepCostModel:
    def __init__(self) -> None:
        self._theta = np.array(PRIOR_S, dtype=np.float64)
        self._p = np.eye(3) / PRIOR_WEIGHT
        self._min_step_s = float("inf")

    def observe(self, num_seqs: int, num_prefill_tokens: int, duration_s: float) -> None:
        x = np.array((1.0, num_seqs, num_prefill_tokens), dtype=np.float64)
        px = self._p @ x
        gain = px / (FORGETTING + x @ px)
        self._theta = self._theta + gain * (duration_s - x @ self._theta)
        self._p = (self._p - np.outer(gain, px)) / FORGETTING
        trace = np.trace(self._p)
        if trace > MAX_COVARIANCE_TRACE:
            self._p *= MAX_COVARIANCE_TRACE / trace
        self._min_step_s = min(self._min_step_s, duration_s)

    def current(self) -> StepCost:
        """The coefficients now; none negative (a fit on steps that all look alike can drift below
        zero in a direction it has not seen), and a base no larger than the fastest step seen."""
        base_s, per_seq_s, per_token_s = (max(float(v), 0.0) for v in self._theta)
        if self._min_step_s < float("inf"):
            base_s = min(base_s, self._min_step_s)
        return StepCost(base_s, per_seq_s, per_token_s)
