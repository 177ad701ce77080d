import json

import pytest

from conftest import PROFILES, REFERENCE_FILES
from vllm_heterocache.errors import ProfileError
from vllm_heterocache.head_profile import load_profile
from vllm_heterocache.head_profile.importer import KNOWN_MODELS, convert_reference, hyperparameters_from_name

SHIPPED = {
    "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B-Instruct.json",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "DeepSeek-R1-Distill-Llama-8B.json",
    "Qwen/Qwen2.5-14B-Instruct": "Qwen2.5-14B-Instruct.json",
}


@pytest.mark.parametrize("name", sorted(REFERENCE_FILES))
def test_conversion_keeps_types_clusters_and_ratios(name):
    path = REFERENCE_FILES[name]
    raw = json.loads(path.read_text())
    profile = convert_reference(path, model_name=name)
    # both naming variants end up as the same four names, with the published counts
    legacy = {"Stable_Unique": "anchor", "Decaying_Unique": "volatile", "Similar_Leader": "pivot", "Similar_Member": "satellite"}
    expected = {legacy.get(k, k): v for k, v in raw["meta"]["counts"].items()}
    assert profile.counts() == expected
    for l, row in enumerate(raw["allocation_matrix"]):
        for h, a in enumerate(row):
            r = profile.budget_ratios[l][h]
            assert (r is None) == (a == -1.0)
            assert r is None or r == pytest.approx(a)
    for l, rel in enumerate(raw["leader_member_relations"]):
        assert {(c.pivot, c.satellites) for c in profile.clusters_of_layer(l)} == {
            (int(p), tuple(sorted(s))) for p, s in rel.items()
        }
    assert profile.provenance["source"] == "imported"


def test_hyperparameters_come_from_the_file_name():
    params = hyperparameters_from_name(REFERENCE_FILES["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"].name)
    assert params == {"topk": 1024, "tau_stable": 0.5, "tau_sim": 0.4, "step": 5000}
    with pytest.raises(ProfileError, match="rename the file"):
        hyperparameters_from_name("clusters.json")


def test_unknown_model_needs_its_config(tmp_path):
    with pytest.raises(ProfileError, match="pass its config.json with --model-config"):
        convert_reference(REFERENCE_FILES["Qwen/Qwen2.5-14B-Instruct"], model_name="someone/else")
    config = dict(KNOWN_MODELS["Qwen/Qwen2.5-14B-Instruct"])
    p = convert_reference(REFERENCE_FILES["Qwen/Qwen2.5-14B-Instruct"], model_name="someone/else", model_config=config)
    assert p.model.name == "someone/else" and p.model.num_layers == 48


def test_geometry_mismatch_is_refused(tmp_path):
    config = dict(KNOWN_MODELS["Qwen/Qwen2.5-14B-Instruct"], num_hidden_layers=40)
    with pytest.raises(ProfileError, match="expected a list of 40 layers"):
        convert_reference(REFERENCE_FILES["Qwen/Qwen2.5-14B-Instruct"], model_name="q", model_config=config)


def test_unknown_type_name(tmp_path):
    raw = json.loads(REFERENCE_FILES["meta-llama/Llama-3.1-8B-Instruct"].read_text())
    raw["meta"]["type_map"]["Leader"] = raw["meta"]["type_map"].pop("pivot")
    bad = tmp_path / REFERENCE_FILES["meta-llama/Llama-3.1-8B-Instruct"].name
    bad.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match=r"meta.type_map: unknown type name\(s\) \['Leader'\]"):
        convert_reference(bad, model_name="meta-llama/Llama-3.1-8B-Instruct")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_reference_profiles_equal_a_fresh_conversion(name):
    shipped = load_profile(PROFILES / SHIPPED[name])
    fresh = convert_reference(REFERENCE_FILES[name], model_name=name)
    assert shipped.to_json() | {"provenance": None} == fresh.to_json() | {"provenance": None}
    assert shipped.model.config_hash == fresh.model.config_hash
    assert shipped.provenance["command"].startswith("heterocache import-reference")
