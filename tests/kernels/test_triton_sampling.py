"""Device sampling (kernels/sampling.py) against its torch reference and the host sampler.

Without CUDA the kernels run under triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run on the GPU. Vocabularies are odd sizes; the draw
distribution tests use a small vocabulary so that thousands of draws stay cheap in the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from kernels.sampling import sample, sample_ref, sampling_probs, sampling_probs_ref
from services.worker.engine.sampler import SamplingParams, processed_probs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (temperature, top_k, top_p, min_p): one row kind each, greedy first
ROW_KINDS = [
    (0.0, 0, 1.0, 0.0),  # greedy
    (1.0, 0, 1.0, 0.0),  # plain softmax
    (0.7, 0, 1.0, 0.0),  # temperature only
    (1.0, 17, 1.0, 0.0),  # top-k
    (1.3, 0, 0.8, 0.0),  # top-p
    (0.9, 0, 1.0, 0.1),  # min-p
    (0.8, 40, 0.9, 0.05),  # all of them
    (0.0, 5, 0.5, 0.2),  # greedy ignores the filters
    (2.0, 1, 1.0, 0.0),  # top-k 1 is greedy on the scaled logits
    (0.5, 5000, 0.3, 0.0),  # top_k past the vocabulary keeps all
]


def params(kinds, device=DEVICE):
    """Per-row parameter tensors for a list of ROW_KINDS entries."""
    columns = list(zip(*kinds))
    return (
        torch.tensor(columns[0], dtype=torch.float32, device=device),
        torch.tensor(columns[1], dtype=torch.int64, device=device),
        torch.tensor(columns[2], dtype=torch.float32, device=device),
        torch.tensor(columns[3], dtype=torch.float32, device=device),
    )


def batch(num_rows: int, vocab_size: int, seed: int = 0):
    """Logits with a few dominant tokens per row (so the filters bite) and a parameter mix."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab_size, generator=generator) * 2
    logits[:, :: max(vocab_size // 20, 1)] += 4
    kinds = [ROW_KINDS[i % len(ROW_KINDS)] for i in range(num_rows)]
    return logits.to(DEVICE), params(kinds)


def seeds_offsets(num_rows: int, offset: int = 0):
    seeds = torch.arange(num_rows, dtype=torch.int64, device=DEVICE) * 7919 + 12345
    return seeds, torch.full((num_rows,), offset, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("vocab_size", [1000, 4999])
def test_greedy_rows_take_the_first_argmax(vocab_size):
    logits, (temperature, top_k, top_p, min_p) = batch(37, vocab_size)
    logits[0, 3] = logits[0, 900] = logits[0].max() + 1  # a tie: the first index wins, as torch.argmax
    tokens = sample(logits, temperature, top_k, top_p, min_p, *seeds_offsets(37))
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(dim=-1)[greedy])
    assert tokens[0] == 3


@pytest.mark.parametrize("vocab_size", [1000, 3001])
def test_probabilities_match_the_reference(vocab_size):
    logits, rows = batch(len(ROW_KINDS) * 2, vocab_size, seed=1)
    probs, expected = sampling_probs(logits, *rows), sampling_probs_ref(logits, *rows)
    assert torch.equal(probs > 0, expected > 0)  # the same tokens survive the filters
    torch.testing.assert_close(probs, expected, atol=2e-6, rtol=1e-4)


def test_reference_is_the_host_samplers_distribution():
    logits, rows = batch(len(ROW_KINDS), 1000, seed=2)
    host = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in ROW_KINDS]
    torch.testing.assert_close(sampling_probs_ref(logits, *rows), processed_probs(logits, host), atol=0, rtol=0)


@pytest.mark.parametrize("vocab_size", [1000, 4999])
def test_tokens_stay_inside_the_filtered_set(vocab_size):
    logits, rows = batch(37, vocab_size, seed=3)
    allowed = sampling_probs_ref(logits, *rows) > 0
    for offset in range(4):
        tokens = sample(logits, *rows, *seeds_offsets(37, offset))
        assert allowed.gather(-1, tokens[:, None]).all(), f"a token outside top-k/top-p/min-p at offset {offset}"


def test_a_seeded_token_does_not_depend_on_the_batch():
    logits, rows = batch(37, 1000, seed=4)
    seeds, offsets = seeds_offsets(37)
    offsets += torch.arange(37, device=DEVICE)
    alone = torch.cat([sample(logits[i:i + 1], *(r[i:i + 1] for r in rows), seeds[i:i + 1], offsets[i:i + 1])
                       for i in range(0, 37, 6)])
    together = sample(logits, *rows, seeds, offsets)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    other_logits, other_rows = batch(11, 1000, seed=5)  # other requests join, rows move
    mixed_logits = torch.cat([other_logits, logits[order]])
    mixed_rows = [torch.cat([o, r[order]]) for o, r in zip(other_rows, rows)]
    other_seeds, other_offsets = seeds_offsets(11, 3)
    mixed = sample(mixed_logits, *mixed_rows, torch.cat([other_seeds, seeds[order]]),
                   torch.cat([other_offsets, offsets[order]]))
    assert torch.equal(together[::6], alone)
    assert torch.equal(mixed[11:], together[order])


def test_offsets_and_seeds_draw_different_tokens():
    flat = torch.randn(1, 1000, generator=torch.Generator().manual_seed(6)).to(DEVICE) * 0.1
    logits = flat.expand(64, -1).contiguous()
    rows = params([(1.0, 0, 1.0, 0.0)] * 64)
    same_seed = torch.full((64,), 99, dtype=torch.int64, device=DEVICE)
    by_offset = sample(logits, *rows, same_seed, torch.arange(64, device=DEVICE))
    by_seed = sample(logits, *rows, torch.arange(64, device=DEVICE), torch.zeros(64, dtype=torch.int64, device=DEVICE))
    # 64 draws from a near-uniform 1000-way distribution: about two collisions expected
    assert len(set(by_offset.tolist())) >= 55
    assert len(set(by_seed.tolist())) >= 55
    again = sample(logits, *rows, same_seed, torch.arange(64, device=DEVICE))
    assert torch.equal(by_offset, again)


# ---------------------------------------------------------------------------- draw distribution

DRAW_KINDS = {
    "temperature": (0.7, 0, 1.0, 0.0),
    "top_k": (1.0, 12, 1.0, 0.0),
    "top_p": (1.3, 0, 0.8, 0.0),
    "min_p": (0.9, 0, 1.0, 0.1),
    "all": (0.8, 40, 0.9, 0.05),
}
NUM_DRAWS = 1200
DRAW_VOCAB = 257


@pytest.fixture(scope="module")
def draws():
    """NUM_DRAWS tokens per DRAW_KINDS entry from one launch: one logits row, each draw its own
    offset. Rows are independent, so one launch of all kinds is as good as one per kind."""
    generator = torch.Generator().manual_seed(7)
    # logits fall by 0.3 per rank (shuffled over the vocabulary): a few dozen tokens carry the mass,
    # and every filter below cuts into it
    row = -0.3 * torch.arange(DRAW_VOCAB, dtype=torch.float32)[torch.randperm(DRAW_VOCAB, generator=generator)]
    row = (row + 0.2 * torch.randn(DRAW_VOCAB, generator=generator)).to(DEVICE)
    kinds = [kind for kind in DRAW_KINDS.values() for _ in range(NUM_DRAWS)]
    rows = params(kinds)
    num_rows = len(kinds)
    offsets = torch.arange(NUM_DRAWS, dtype=torch.int64, device=DEVICE).repeat(len(DRAW_KINDS))
    tokens = sample(row.expand(num_rows, -1).contiguous(), *rows, torch.full_like(offsets, 2024), offsets)
    return row, tokens.view(len(DRAW_KINDS), NUM_DRAWS).cpu()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, its 1e-3 critical value); bins expecting fewer than 5 draws are pooled."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    if ((~keep) & (observed > 0)).any():
        return float("inf"), 0.0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return statistic, float(stats.chi2.ppf(1 - 1e-3, int(keep.sum()) - 1))


@pytest.mark.parametrize("kind", DRAW_KINDS)
def test_draws_follow_the_reference_distribution(draws, kind):
    row, tokens = draws
    temperature, top_k, top_p, min_p = DRAW_KINDS[kind]
    counts = torch.bincount(tokens[list(DRAW_KINDS).index(kind)], minlength=DRAW_VOCAB)

    def reference(t, top_k=top_k, top_p=top_p, min_p=min_p):
        return sampling_probs_ref(row[None].cpu(), *params([(t, top_k, top_p, min_p)], "cpu"))[0]

    statistic, critical = chi_square(counts, reference(temperature))
    assert statistic < critical, f"{kind}: chi-square {statistic:.1f} >= {critical:.1f}"
    # The test can tell: the same draws are far off a distribution at a temperature 25% off.
    wrong, critical = chi_square(counts, reference(temperature * 1.25))
    assert wrong > critical, f"{kind}: a 25% temperature error went unnoticed ({wrong:.1f} < {critical:.1f})"
    if kind != "temperature":  # and from the distribution with the filters left out
        unfiltered, critical = chi_square(counts, reference(temperature, 0, 1.0, 0.0))
        assert unfiltered > critical, f"{kind}: dropping the filters went unnoticed"


def test_reference_draws_match_the_reference_distribution():
    """The reference's own draw (torch.Generator noise) samples the same distribution."""
    logits = torch.randn(1, DRAW_VOCAB, generator=torch.Generator().manual_seed(8)) * 2
    rows = params([DRAW_KINDS["all"]] * 4000, "cpu")
    tokens = sample_ref(logits.expand(4000, -1), *rows, generator=torch.Generator().manual_seed(9))
    statistic, critical = chi_square(torch.bincount(tokens, minlength=DRAW_VOCAB),
                                     sampling_probs_ref(logits, *(r[:1] for r in rows))[0])
    assert statistic < critical


# ---------------------------------------------------------------------------- launcher behaviour

def test_temperature_only_batches_may_skip_the_sort():
    logits, _ = batch(37, 1000, seed=10)
    rows = params([ROW_KINDS[i % 3] for i in range(37)])  # greedy, plain, temperature: no top-k/top-p
    seeds, offsets = seeds_offsets(37, 5)
    assert torch.equal(sample(logits, *rows, seeds, offsets, use_top_k_top_p=False),
                       sample(logits, *rows, seeds, offsets))


def test_strided_rows_read_like_contiguous_ones():
    wide, rows = batch(13, 1500, seed=11)
    logits = wide[:, :1001]  # row stride 1500
    seeds, offsets = seeds_offsets(13)
    assert torch.equal(sample(logits, *rows, seeds, offsets), sample(logits.contiguous(), *rows, seeds, offsets))


def test_an_empty_batch_samples_nothing():
    empty = torch.empty(0, device=DEVICE)
    tokens = sample(torch.empty(0, 1000, device=DEVICE), empty, empty.long(), empty, empty, empty.long(),
                    empty.long())
    assert tokens.shape == (0,) and tokens.dtype == torch.int64


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "logits": a["logits"].half()}, "logits must be"),
    (lambda a: {**a, "logits": a["logits"][0]}, "logits must be"),
    (lambda a: {**a, "top_k": a["top_k"][:2]}, "top_k must be a tensor of shape"),
    (lambda a: {**a, "top_k": a["top_k"].float()}, "top_k must be an integer"),
    (lambda a: {**a, "min_p": a["min_p"].long()}, "min_p must be a floating-point"),
    (lambda a: {**a, "seeds": [1, 2, 3]}, "seeds must be a tensor"),
    (lambda a: {**a, "offsets": a["offsets"].to("meta")}, "must share a device"),
])
def test_bad_arguments_are_named(change, message):
    logits, (temperature, top_k, top_p, min_p) = batch(3, 1000)
    seeds, offsets = seeds_offsets(3)
    arguments = dict(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     seeds=seeds, offsets=offsets)
    with pytest.raises(ValueError, match=message):
        sample(**change(arguments))
