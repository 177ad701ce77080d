"""Every profile in profiles/ loads, and each matches the fingerprint of the model it names."""

import json

import pytest

from conftest import PROFILES
from vllm_heterocache.profile import ModelFingerprint, load_profile
from vllm_heterocache.profile.importer import KNOWN_MODELS

SHIPPED = sorted(PROFILES.glob("*.json"))


def test_profiles_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"SmolLM2-135M-Instruct.json", "Llama-3.1-8B-Instruct.json", "DeepSeek-R1-Distill-Llama-8B.json", "Qwen2.5-14B-Instruct.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_loads_with_provenance(path):
    profile = load_profile(path)
    assert profile.provenance["command"] and profile.provenance["tool"] == "vllm-heterocache"
    assert sum(profile.counts().values()) == profile.num_layers * profile.num_kv_heads


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_reference_profiles_match_their_model_configs(name):
    path = PROFILES / (name.split("/")[1] + ".json")
    load_profile(path).model.check_matches(ModelFingerprint.from_hf_config(KNOWN_MODELS[name], name=name))


@pytest.mark.model
def test_smollm2_profile_matches_the_prepared_default_model():
    from vllm_heterocache.models.smollm2 import prepare_default_model

    config = json.loads((prepare_default_model() / "config.json").read_text())
    profile = load_profile(PROFILES / "SmolLM2-135M-Instruct.json")
    profile.model.check_matches(ModelFingerprint.from_hf_config(config))
    assert profile.provenance["source"] == "profiler"
    assert profile.provenance["command"].startswith(
        "python -m vllm_heterocache.profiler --model default --output profiles/SmolLM2-135M-Instruct.json"
    )
