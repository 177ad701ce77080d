"""Which profile serves a model: explicit file, or the shipped one matching its fingerprint."""

import pytest

from conftest import PROFILES
from vllm_heterocache.errors import ProfileError, ProfileMismatchError
from vllm_heterocache.profile.importer import KNOWN_MODELS
from vllm_heterocache.profile.resolve import resolve_profile

SMOL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "rope_theta": 100000.0}


def test_shipped_profile_found_by_fingerprint():
    p = resolve_profile(SMOL, "/somewhere/my-smol-copy")
    assert p.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_fine_tunes_sharing_a_config_are_told_apart_by_name():
    llama = KNOWN_MODELS["meta-llama/Llama-3.1-8B-Instruct"]
    assert resolve_profile(llama, "/models/Llama-3.1-8B-Instruct").model.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_profile(llama, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B").model.name.startswith("deepseek-ai/")
    with pytest.raises(ProfileError, match="choose one with the `profile` option"):
        resolve_profile(llama, "/models/my-llama-finetune")


def test_no_match_names_the_profiler_command():
    other = dict(SMOL, num_hidden_layers=12)
    with pytest.raises(ProfileError, match=r"python -m vllm_heterocache.profiler --model /m/x"):
        resolve_profile(other, "/m/x")


def test_explicit_profile_must_match():
    with pytest.raises(ProfileMismatchError, match="model.num_layers: profile has 32, model has 30"):
        resolve_profile(SMOL, "/m/smol", str(PROFILES / "Llama-3.1-8B-Instruct.json"))
    assert resolve_profile(SMOL, "/m/smol", str(PROFILES / "SmolLM2-135M-Instruct.json")).model.num_layers == 30
