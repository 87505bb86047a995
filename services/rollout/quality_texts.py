"""The default prompts, held-out text and bounds of the LLM quality gate (services/rollout/quality.py).

Short English and code prompts, greedy-decoded by the float32 reference and the candidate; a
held-out text of plain English (about 200 tokens with SmolLM2's tokenizer) scored for perplexity.
The bounds are per weight dtype, set from SmolLM2-135M (the demo model) with room for run-to-run
noise: measured there (agreement / perplexity ratio to float32) bfloat16 0.49 / 1.004, int8
0.33 / 1.019, int4 0.37 / 1.002. Greedy agreement is the strict measure (the matching share before
the first different token): on a 135M model most prompts part ways within 16 tokens even in bf16,
so the perplexity ratio is the bound that tells a sound quantization from a broken one.
"""

from __future__ import annotations

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "To make a cup of tea, first",
    "In 1969, astronauts",
)
HELD_OUT = (
    "The river rises in the hills to the north of the town and runs for about forty miles before it reaches "
    "the sea. For most of its length it is slow and wide, and in summer children swim in the pools below the "
    "old mill. In the spring, when the snow melts, the water comes down brown and fast, and the meadows along "
    "the banks are often flooded for a week or more.\n"
    "A bridge was built across the river in the eighteenth century, and the town grew up around it. The market "
    "square is still on the east bank, with the church on one side and the town hall on the other. Every "
    "Saturday the square fills with stalls selling bread, cheese, vegetables and flowers, and people come in "
    "from the villages to buy and to talk."
)
MAX_TOKENS = 16
# weight_dtype -> (min greedy agreement, max perplexity ratio) against float32
BOUNDS = {
    "float32": (0.99, 1.0001),  # the same dtype: what differs is the cache's, if anything
    "bfloat16": (0.25, 1.02),
    "float16": (0.25, 1.02),
    "int8": (0.15, 1.05),
    "int4": (0.15, 1.02),
}
