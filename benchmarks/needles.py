"""Needle-in-a-haystack cases over packaged public-domain text (RULER-style synthetic tasks).

Tasks: ``single`` (one key, one 7-digit value), ``multikey`` (four keys, one is asked for),
``multivalue`` (one key with three values, all must be recalled) -- kind ``needle``; and kind
``vartrack`` (RULER's variable tracking: follow VAR B = VAR A, VAR A = 12345 beside a distractor
chain; see :func:`make_vartrack_cases`). Haystack: passages of the King
James Bible and Shakespeare (``vllm_heterocache.data.texts``), cut to the context length in the
model's tokens; needles are placed at the given depths. Deterministic for a seed.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from vllm_heterocache.data.texts import documents

KEYS = ["amber", "falcon", "harbor", "juniper", "lantern", "meadow", "orchid", "quarry", "saffron", "tundra",
        "violet", "willow", "cobalt", "ember", "glacier", "hazel"]
TASKS = ("single", "multikey", "multivalue")
KINDS = ("needle", "vartrack", "shared")


@dataclass(frozen=True)
class Case:
    task: str
    context: int  # target prompt length in tokens
    depth: float  # where the (first) needle sits, 0..1
    prompt_ids: list[int]
    answers: tuple[str, ...]  # all must appear in the answer
    kind: str = "needle"  # "needle" (tasks single/multikey/multivalue), "vartrack" or "shared"
    absent: tuple[str, ...] = ()  # none may appear in a correct answer (vartrack: the distractor chains' names)
    document: int = -1  # kind "shared": the document its prompt shares with the other cases of that number


def _needle(key: str, value: str) -> str:
    return f" The special magic number for {key} is: {value}. "


def make_cases(tokenizer, contexts: dict[int, int], seed: int = 0, tasks: tuple[str, ...] = ("needle",)) -> list[Case]:
    """``contexts``: {context length in tokens: number of cases of each kind}.

    ``tasks``: kinds of task, ``needle`` (tasks single/multikey/multivalue and depths cycle) and/or ``vartrack``
    (:func:`make_vartrack_cases`). The needle cases are the same whatever else is asked for."""
    unknown = set(tasks) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown task kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    haystack_text = "\n".join(documents(8, 60_000))
    hay = tokenizer(haystack_text, add_special_tokens=False).input_ids
    cases = []
    if "needle" in tasks:
        cases += _needle_cases(tokenizer, hay, contexts, seed)
    if "vartrack" in tasks:
        cases += make_vartrack_cases(tokenizer, contexts, seed, _hay=(haystack_text, hay))
    if "shared" in tasks:
        cases += make_shared_cases(tokenizer, hay, contexts, seed)
    return cases


def make_shared_cases(tokenizer, hay, contexts: dict[int, int], seed: int = 0) -> list[Case]:
    """Several questions about one long text: per context length, one haystack with ``count``
    keys and their values (needles spread from depth 0.1), and ``count`` cases, each asking for
    one key. The prompts are the same up to the question, so asked one after another, later ones
    hit vLLM's prefix cache for the whole document (kind ``shared``; ``document`` groups them)."""
    rng = random.Random(f"shared-{seed}")
    cases = []
    for document, (context, count) in enumerate(contexts.items()):
        keys = rng.sample(KEYS, count)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        marker = "QUESTION"  # the question goes after the document, where the marker is
        prompt = _build(tokenizer, hay, context, 0.1, list(zip(keys, values)), marker, rng)
        text = tokenizer.decode(prompt)
        head, tail = text.split(marker)
        for k, (key, value) in enumerate(zip(keys, values)):
            question = f"What is the special magic number for {key}? Answer with the number only."
            ids = tokenizer(head + question + tail, add_special_tokens=False).input_ids
            cases.append(Case("shared", context, round(0.1 + 0.9 * k / max(1, count), 3), ids, (value,), "shared",
                              document=document))
    return cases


def _needle_cases(tokenizer, hay, contexts, seed) -> list[Case]:
    rng = random.Random(seed)
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


def _build(tokenizer, hay, context, depth, needles, question, rng, *, texts=None, spots=None, intro="",
           answer_prefix="") -> list[int]:
    """Chat prompt of ``context`` tokens: ``intro``, haystack with the needle texts inserted, question;
    ``answer_prefix`` is appended after the assistant turn's header (the answer's first words).

    Needles: ``needles`` as (key, value) pairs (the needle tasks) or ``texts``; ``spots`` their depths
    (default: spread from ``depth`` onwards, the first one exactly at depth)."""

    def encode(body: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text + answer_prefix, add_special_tokens=False).input_ids

    texts = texts if texts is not None else [_needle(k, v) for k, v in needles]
    needle_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    overhead = len(encode(intro + "\n\n" + question)) + sum(len(n) for n in needle_ids)
    n_hay = max(16, context - overhead)
    start = rng.randrange(0, len(hay) - n_hay)
    body = list(hay[start : start + n_hay])
    if spots is None:
        spots = [depth + (1 - depth) * 0.6 * j / max(1, len(needle_ids)) for j in range(len(needle_ids))]
    if needles is None:
        # texts: places in the haystack as it was (none lands inside another), moved on to a word's start
        n = len(body)
        places = [_word_start(tokenizer, body, int(spot * n)) for spot in spots]
    else:
        places = spots  # the needle tasks' placement, kept as it was so their cases do not change
    # inserted back to front; equal places keep the given order
    for place, _, ids in sorted(zip(places, range(len(needle_ids)), needle_ids), reverse=True):
        at = place if needles is None else int(place * len(body))
        body[at:at] = ids
    return encode(intro + tokenizer.decode(body) + "\n\n" + question)


def _word_start(tokenizer, ids, at: int) -> int:
    while at < len(ids) and not tokenizer.decode(ids[at : at + 1])[:1].isspace():
        at += 1
    return at


# Variable tracking (RULER's ``vt``): a chain of assignments VAR A = 12345, VAR B = VAR A, ... hidden in
# the haystack beside distractor chains with other values; the question asks for every variable that
# holds the chain's value. A correct answer names all of the chain and none of the distractors.
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are:")

VT_VALUE_QUESTION = "Question: What is the value of VAR {name}? Follow the chain of assignments. Answer with the number only."
VT_VALUE_ANSWER = ""


def make_vartrack_cases(tokenizer, contexts: dict[int, int], seed: int = 0, chain: int = 2, distractors: int = 1,
                        ask: str = "value", _hay=None) -> list[Case]:
    """``count`` variable-tracking cases per context: one chain of ``chain`` variables and
    ``distractors`` chains of the same length with other values; the chain's first assignment at
    ``depth`` (cycling 0.1..0.9), the rest spread after it like the needle tasks' needles;
    distractor chains at random places, each in order. Own random stream: adding these cases
    leaves the needle cases unchanged.

    ``ask="value"`` (default): "What is the value of VAR <last in chain>?"; answer the chain's
    value, ``absent`` the distractors' values (a guess among the numbers in the text is wrong half
    the time). ``ask="names"``: RULER's question and answer prefix, all names in the chain (answers)
    and none of the distractors' (absent) -- SmolLM2-135M scores 0 on it with the full cache, so it
    measures nothing for that model. SmolLM2-135M-Instruct with vLLM's full cache (greedy, 32
    tokens), seed 0: chain 2 + 1 distractor chain 4/11 right at 2K, 1/8 at 4K (HF transformers
    gave the same answers on the cases compared); chain 3 (two hops) was 1/8 at 2K."""
    rng = random.Random(f"vartrack-{seed}")
    if _hay is None:
        text = "\n".join(documents(8, 60_000))
        _hay = (text, tokenizer(text, add_special_tokens=False).input_ids)
    haystack_text, hay = _hay
    cases = []
    for context, count in contexts.items():
        for i in range(count):
            depth = 0.1 + 0.8 * (i / max(1, count - 1))
            names = _names(rng, chain * (1 + distractors), haystack_text)
            values = rng.sample(range(10_000, 100_000), 1 + distractors)
            texts, spots = [], []
            for c in range(1 + distractors):
                group = names[c * chain : (c + 1) * chain]
                stmts = [f" VAR {group[0]} = {values[c]}. "] + [
                    f" VAR {group[j]} = VAR {group[j - 1]}. " for j in range(1, chain)]
                if c == 0:
                    where = [depth + (1 - depth) * 0.6 * j / chain for j in range(chain)]
                else:
                    where = sorted(rng.uniform(0.02, 0.98) for _ in range(chain))
                texts += stmts
                spots += where
            if ask == "names":
                answers, absent = tuple(names[:chain]), tuple(names[chain:])
                question, prefix = VT_QUESTION.format(value=values[0]), VT_ANSWER.format(n=chain, value=values[0])
            else:
                answers, absent = (str(values[0]),), tuple(str(v) for v in values[1:])
                question, prefix = VT_VALUE_QUESTION.format(name=names[chain - 1]), VT_VALUE_ANSWER.format(name=names[chain - 1])
            prompt_ids = _build(tokenizer, hay, context, depth, None, question, rng, texts=texts, spots=spots,
                                intro=VT_INTRO, answer_prefix=prefix)
            cases.append(Case("vartrack", context, round(depth, 3), prompt_ids, answers, "vartrack", absent))
    return cases


def _names(rng, n, haystack_text) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in out and name not in haystack_text:
            out.append(name)
    return out
