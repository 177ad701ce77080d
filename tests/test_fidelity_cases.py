"""benchmarks/needles.py's cases (needle and variable tracking) and kvpress_env.py's guard; no engine, no network."""

import json
import re

import pytest

CONTEXTS = {1024: 3, 2048: 2}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from vllm_heterocache.models.smollm2 import prepare_default_model

    return AutoTokenizer.from_pretrained(str(prepare_default_model()))


@pytest.fixture(scope="module")
def cases(tokenizer):
    from needles import make_cases

    return make_cases(tokenizer, CONTEXTS, seed=3, tasks=("needle", "vartrack"))


def test_deterministic_and_needles_unchanged_by_other_kinds(tokenizer, cases):
    from needles import make_cases

    again = make_cases(tokenizer, CONTEXTS, seed=3, tasks=("needle", "vartrack"))
    assert [c.__dict__ for c in again] == [c.__dict__ for c in cases]
    needles_only = make_cases(tokenizer, CONTEXTS, seed=3)
    assert [c.__dict__ for c in needles_only] == [c.__dict__ for c in cases if c.kind == "needle"]
    assert make_cases(tokenizer, CONTEXTS, seed=4, tasks=("vartrack",))[0].prompt_ids != \
        [c for c in cases if c.kind == "vartrack"][0].prompt_ids
    with pytest.raises(ValueError, match="unknown task kind"):
        make_cases(tokenizer, CONTEXTS, tasks=("counting",))


def test_cases_fit_and_hold_their_answers(tokenizer, cases):
    assert {c.kind for c in cases} == {"needle", "vartrack"}
    for kind in ("needle", "vartrack"):
        assert sorted(c.context for c in cases if c.kind == kind) == [1024] * 3 + [2048] * 2
    for c in cases:
        assert abs(len(c.prompt_ids) - c.context) <= 8, (c.task, len(c.prompt_ids))
        text = tokenizer.decode(c.prompt_ids)
        for a in c.answers + c.absent:
            assert a in text
        json.loads(json.dumps(c.__dict__))


def test_vartrack_chain(tokenizer, cases):
    for c in (c for c in cases if c.kind == "vartrack"):
        text = tokenizer.decode(c.prompt_ids)
        (asked,) = re.findall(r"What is the value of VAR (\w+)\?", text)
        (first,) = re.findall(rf"VAR {asked} = VAR (\w+)\.", text)
        assert re.findall(rf"VAR {first} = (\d+)\.", text) == list(c.answers)
        assert len(c.absent) == 1 and c.absent[0] != c.answers[0] and text.count(c.answers[0]) == 1
        # the chain's first assignment sits at the case's depth, before the assignment that uses it
        body = text[: text.index("Question:")]
        assert body.index(f"VAR {first} =") < body.index(f"VAR {asked} =")
        assert abs(body.index(f"VAR {first} =") / len(body) - c.depth) < 0.1


def test_kvpress_env_leaves_a_foreign_folder_alone(tmp_path):
    from kvpress_env import KvpressEnvError, ensure_env

    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(KvpressEnvError, match="not a virtual environment"):
        ensure_env(tmp_path)
    assert (tmp_path / "mine.txt").exists()
