"""The traffic of bench/bench_routing.py: three prompt mixes, as chat requests with fixed seeds.

- `multi_tenant`: `num_tenants` tenants, each with its own system prompt of about
  `system_prompt_tokens` tokens; each request picks a tenant uniformly at random and asks a short
  question of its own (a number and a few words, so no two requests are the same past the system
  prompt);
- `unique`: the same shape, but every request has a system prompt of its own, marked with its
  number from the first tokens on: nothing is shared, not even the first KV block;
- `hot_prefix`: one system prompt for every request, short unique questions.

A scenario's requests are built once; the measured runs of every policy send the same list at the
same Poisson arrival offsets. The capacity calibration draws requests of the same mix from another
seed (same tenants, other questions), so no measured prompt is seen before its run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = ("multi_tenant", "unique", "hot_prefix")
WORDS = ("river stone lantern harbor quiet copper meadow signal winter orchard velvet compass thunder pepper "
         "canyon marble feather glacier saddle violet ember tunnel wander crystal basket invoice refund parcel "
         "account billing warranty shipping ticket escalate policy customer manager weekend holiday").split()
QUESTION_WORDS = ("how when where why which order delivery price return size colour store open today").split()
NUM_QUESTION_WORDS = 6


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    system: str
    question: str
    num_tokens: int  # with the chat template, as the worker tokenizes it
    group: int  # the tenant (multi_tenant), the request (unique) or 0 (hot_prefix)


class PromptBuilder:
    """System prompts of a target length and unique questions, counted with the model's tokenizer."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        from services.common.chat_template import ChatTemplate

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.template = ChatTemplate.from_folder(folder)

    def num_tokens(self, system: str, question: str) -> int:
        text = self.template.render([{"role": "system", "content": system}, {"role": "user", "content": question}])
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def system_prompt(self, rng: random.Random, label: str, num_tokens: int) -> str:
        """"You are ..." and house rules of random words, grown to about num_tokens tokens."""
        head = f"You are the support assistant of {label}. Answer briefly and follow these house rules:"
        words: list[str] = []
        while len(self.tokenizer.encode(f"{head} {' '.join(words)}", add_special_tokens=False).ids) < num_tokens:
            words += [rng.choice(WORDS) for _ in range(16)]
        return f"{head} {' '.join(words)}"

    @staticmethod
    def question(rng: random.Random, number: int) -> str:
        return f"Question {number}: {' '.join(rng.choice(QUESTION_WORDS) for _ in range(NUM_QUESTION_WORDS))}?"


@dataclass(frozen=True, slots=True)
class ScenarioShape:
    name: str
    num_tenants: int
    system_prompt_tokens: int


def make_prompts(builder: PromptBuilder, shape: ScenarioShape, num_prompts: int, seed: int,
                 first_number: int = 0) -> list[ChatPrompt]:
    """num_prompts requests of the scenario. The tenants' system prompts depend on the scenario and
    `shape` only (not on `seed`), so a calibration (another seed) sees the same tenants."""
    tenant_rng = random.Random(f"{shape.name}-tenants")
    if shape.name == "multi_tenant":
        systems = [builder.system_prompt(tenant_rng, f"tenant {i}", shape.system_prompt_tokens)
                   for i in range(shape.num_tenants)]
    elif shape.name == "hot_prefix":
        systems = [builder.system_prompt(tenant_rng, "the one hot tenant", shape.system_prompt_tokens)]
    elif shape.name != "unique":
        raise ValueError(f"unknown scenario {shape.name!r}; one of {', '.join(SCENARIOS)}")
    rng = random.Random(seed)
    prompts = []
    for n in range(first_number, first_number + num_prompts):
        if shape.name == "unique":
            # The request's own mark first: its very first KV block differs from every other's.
            mark = f"[{n:06d}-{rng.getrandbits(32):08x}] "
            system = mark + builder.system_prompt(rng, f"customer {n}", shape.system_prompt_tokens
                                                  - len(builder.tokenizer.encode(mark, add_special_tokens=False).ids))
            group = n
        else:
            group = rng.randrange(len(systems))
            system = systems[group]
        question = builder.question(rng, n)
        prompts.append(ChatPrompt(system, question, builder.num_tokens(system, question), group))
    return prompts


def generate_requests(prompts: list[ChatPrompt], model_name: str, max_tokens: int, tag: str) -> list:
    """tensoryard.v1.GenerateRequests: greedy, exactly max_tokens output tokens (ignore_eos)."""
    from protos.tensoryard.v1 import generation_pb2 as g

    sampling = g.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [
        g.GenerateRequest(model_name=model_name, id=f"{tag}-{n}", sampling=sampling, messages=g.ChatMessages(
            messages=[g.ChatMessage(role="system", content=p.system), g.ChatMessage(role="user", content=p.question)]))
        for n, p in enumerate(prompts)
    ]


def prompt_summary(prompts: list[ChatPrompt]) -> dict:
    lengths = [p.num_tokens for p in prompts]
    groups = {p.group for p in prompts}
    return {"num_prompts": len(prompts), "num_system_prompts": len(groups),
            "mean_tokens": sum(lengths) / len(lengths), "min_tokens": min(lengths), "max_tokens": max(lengths),
            "example_system_prompt_start": prompts[0].system[:120], "example_question": prompts[0].question}
