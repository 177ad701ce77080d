"""Needle-in-a-haystack cases over packaged public-domain text (RULER-style synthetic tasks).

Tasks: ``single`` (one key, one 7-digit value), ``multikey`` (four keys, one is asked for),
``multivalue`` (one key with three values, all must be recalled). Haystack: passages of the King
James Bible and Shakespeare (``vllm_heterocache.data.texts``), cut to the context length in the
model's tokens; needles are placed at the given depths. Deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vllm_heterocache.data.texts import documents

KEYS = ["amber", "falcon", "harbor", "juniper", "lantern", "meadow", "orchid", "quarry", "saffron", "tundra",
        "violet", "willow", "cobalt", "ember", "glacier", "hazel"]
TASKS = ("single", "multikey", "multivalue")


@dataclass(frozen=True)
class Case:
    task: str
    context: int  # target prompt length in tokens
    depth: float  # where the (first) needle sits, 0..1
    prompt_ids: list[int]
    answers: tuple[str, ...]  # all must appear in the answer


def _needle(key: str, value: str) -> str:
    return f" The special magic number for {key} is: {value}. "


def make_cases(tokenizer, contexts: dict[int, int], seed: int = 0) -> list[Case]:
    """``contexts``: {context length in tokens: number of cases}; tasks and depths cycle."""
    rng = random.Random(seed)
    haystack_text = "\n".join(documents(8, 60_000))
    hay = tokenizer(haystack_text, add_special_tokens=False).input_ids
    cases = []
    for context, count in contexts.items():
        for i in range(count):
            task = TASKS[i % len(TASKS)]
            depth = 0.1 + 0.8 * (i / max(1, count - 1))
            keys = rng.sample(KEYS, 4)
            values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(4)]
            if task == "single":
                needles, asked, answers = [(keys[0], values[0])], keys[0], (values[0],)
                question = f"What is the special magic number for {asked}? Answer with the number only."
            elif task == "multikey":
                needles = list(zip(keys, values))
                asked, answers = keys[1], (values[1],)
                question = f"What is the special magic number for {asked}? Answer with the number only."
            else:
                needles = [(keys[0], v) for v in values[:3]]
                asked, answers = keys[0], tuple(values[:3])
                question = f"What are all the special magic numbers for {asked}? List the numbers only."
            prompt_ids = _build(tokenizer, hay, context, depth, needles, question, rng)
            cases.append(Case(task, context, round(depth, 3), prompt_ids, answers))
    return cases


def _build(tokenizer, hay, context, depth, needles, question, rng) -> list[int]:
    def encode(body: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids

    needle_ids = [tokenizer(_needle(k, v), add_special_tokens=False).input_ids for k, v in needles]
    overhead = len(encode("\n\n" + question)) + sum(len(n) for n in needle_ids)
    n_hay = max(16, context - overhead)
    start = rng.randrange(0, len(hay) - n_hay)
    body = list(hay[start : start + n_hay])
    # needles spread from `depth` onwards (the first one exactly at depth), inserted back to front
    spots = [depth + (1 - depth) * 0.6 * j / max(1, len(needle_ids)) for j in range(len(needle_ids))]
    for spot, ids in sorted(zip(spots, needle_ids), reverse=True):
        at = int(spot * len(body))
        body[at:at] = ids
    return encode(tokenizer.decode(body) + "\n\n" + question)
