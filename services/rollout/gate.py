"""A version's gate: golden prompts, golden embeddings and a latency budget, run against its
replicas through the router by explicit version (so no user request reaches it first).

`run_gate` sends the requests and records what came back (`Observation`s); `judge` compares them
with the gate, a pure function the unit tests cover: greedy outputs equal the expected text, or
are at least `min_similarity` alike (difflib's ratio); embeddings have at least `min_cosine`
cosine similarity with the expected vector; the p95 of the gate's request latencies is within
`latency_budget_s`. A request that fails fails its check, with the status in the reason.
"""

from __future__ import annotations

import difflib
import math
import time
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from protos.tensoryard.v1 import (
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    registry_pb2,
)

GATE_REQUEST_TIMEOUT_S = 60.0
# How long a gate request is retried while the router answers UNAVAILABLE: the replica is in
# discovery, but the router hears of it a moment later.
ROUTABLE_WAIT_S = 15.0


@dataclass(frozen=True, slots=True)
class Observation:
    """What one gate request got back: text (golden prompt) or a vector (golden embedding)."""

    latency_s: float
    text: str = ""
    vector: tuple[float, ...] = ()
    error: str | None = None  # "UNAVAILABLE: ..." when the request failed


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str  # "prompt 1", "embedding 2", "latency"
    passed: bool
    detail: str


@dataclass(frozen=True, slots=True)
class GateResult:
    model_name: str
    version: int
    passed: bool
    checks: list[CheckResult] = field(default_factory=list)
    p95_latency_s: float | None = None

    @property
    def reasons(self) -> list[str]:
        """Why it failed: one line per failed check."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {**asdict(self), "reasons": self.reasons}


def text_similarity(expected: str, actual: str) -> float:
    return difflib.SequenceMatcher(None, expected, actual, autojunk=False).ratio()


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms else 0.0


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (of 20 samples, the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


def judge(model_name: str, version: int, gate: registry_pb2.Gate,
          prompts: list[Observation], embeddings: list[Observation]) -> GateResult:
    """Compare what the version answered (one observation per golden, in order) with the gate."""
    checks = [_check_prompt(i, golden, seen) for i, (golden, seen) in enumerate(zip(gate.golden_prompts, prompts), 1)]
    checks += [_check_embedding(i, golden, seen)
               for i, (golden, seen) in enumerate(zip(gate.golden_embeddings, embeddings), 1)]
    latencies = [o.latency_s for o in (*prompts, *embeddings) if o.error is None]
    p95_s = p95(latencies) if latencies else None
    if gate.latency_budget_s > 0:
        if p95_s is None:
            checks.append(CheckResult("latency", False, "no request succeeded to measure"))
        else:
            within = p95_s <= gate.latency_budget_s
            checks.append(CheckResult("latency", within, f"p95 {p95_s * 1e3:.1f} ms "
                                      f"{'within' if within else 'over'} the budget of {gate.latency_budget_s * 1e3:g} ms"))
    return GateResult(model_name, version, all(c.passed for c in checks), checks, p95_s)


def _check_prompt(index: int, golden: registry_pb2.GoldenPrompt, seen: Observation) -> CheckResult:
    name = f"prompt {index}"
    if seen.error is not None:
        return CheckResult(name, False, f"request failed: {seen.error}")
    if golden.min_similarity > 0:
        similarity = text_similarity(golden.expected_text, seen.text)
        passed = similarity >= golden.min_similarity
        return CheckResult(name, passed, f"similarity {similarity:.3f} "
                           f"{'>=' if passed else '<'} {golden.min_similarity:g} (got {seen.text!r})")
    if seen.text == golden.expected_text:
        return CheckResult(name, True, "exact match")
    return CheckResult(name, False, f"expected {golden.expected_text!r}, got {seen.text!r}")


def _check_embedding(index: int, golden: registry_pb2.GoldenEmbedding, seen: Observation) -> CheckResult:
    name = f"embedding {index}"
    if seen.error is not None:
        return CheckResult(name, False, f"request failed: {seen.error}")
    if len(seen.vector) != len(golden.expected):
        return CheckResult(name, False, f"dimension {len(seen.vector)}, expected {len(golden.expected)}")
    similarity = cosine(golden.expected, seen.vector)
    passed = similarity >= golden.min_cosine
    return CheckResult(name, passed, f"cosine {similarity:.6f} {'>=' if passed else '<'} {golden.min_cosine:g}")


def run_gate(router: grpc.Channel, model_name: str, version: int, gate: registry_pb2.Gate) -> GateResult:
    """Send every golden request to `version` through the router, one at a time, and judge."""
    generate = generation_pb2_grpc.TextGenerationStub(router)
    embed = embeddings_pb2_grpc.EmbeddingsStub(router)
    prompts = [_observe(lambda g=g: _generate(generate, model_name, version, g)) for g in gate.golden_prompts]
    embeddings = [_observe(lambda g=g: _embed(embed, model_name, version, g)) for g in gate.golden_embeddings]
    return judge(model_name, version, gate, prompts, embeddings)


def _observe(call) -> Observation:
    deadline_s = time.monotonic() + ROUTABLE_WAIT_S
    while True:
        started_s = time.perf_counter()
        try:
            text, vector = call()
            return Observation(time.perf_counter() - started_s, text, vector)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline_s:
                time.sleep(0.2)
                continue
            return Observation(time.perf_counter() - started_s, error=f"{error.code().name}: {error.details()}")


def _generate(stub, model_name: str, version: int, golden: registry_pb2.GoldenPrompt) -> tuple[str, tuple]:
    request = generation_pb2.GenerateRequest(
        model_name=model_name, model_version=str(version), prompt=golden.prompt,
        sampling=generation_pb2.SamplingParameters(temperature=0.0, max_tokens=golden.max_tokens or 16),
    )
    text = "".join(r.text for r in stub.Generate(request, timeout=GATE_REQUEST_TIMEOUT_S))
    return text, ()


def _embed(stub, model_name: str, version: int, golden: registry_pb2.GoldenEmbedding) -> tuple[str, tuple]:
    reply = stub.Embed(embeddings_pb2.EmbedRequest(
        model_name=model_name, model_version=str(version), texts=[golden.text],
    ), timeout=GATE_REQUEST_TIMEOUT_S)
    vectors = np.frombuffer(reply.embeddings, dtype="<f4").reshape(-1, reply.dim)
    return "", tuple(float(x) for x in vectors[0])
