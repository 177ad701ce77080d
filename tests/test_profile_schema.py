import copy
import json

import pytest

from vllm_heterocache.errors import ProfileError, ProfileMismatchError
from vllm_heterocache.head_profile import HeadProfile, HeadType, ModelFingerprint, load_profile
from vllm_heterocache.head_profile.fingerprint import canonical_config


def test_roundtrip_is_byte_stable(llama_profile, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    llama_profile.save(a)
    again = load_profile(a)
    again.save(b)
    assert a.read_bytes() == b.read_bytes()
    assert again == llama_profile
    assert again.counts() == {"volatile": 17, "pivot": 33, "anchor": 10, "satellite": 196}


def test_views(llama_profile):
    c = llama_profile.clusters_of_layer(0)[0]
    assert llama_profile.head_types[0][c.pivot] is HeadType.PIVOT
    assert llama_profile.pivot_of(0, c.satellites[0]) == c.pivot
    assert llama_profile.pivot_of(0, c.pivot) is None
    assert llama_profile.num_full_heads() == 50


def _broken(profile, mutate):
    data = copy.deepcopy(profile.to_json())
    mutate(data)
    return data


CASES = [
    ("schema_version", lambda d: d.update(schema_version=2), "field schema_version"),
    ("missing model field", lambda d: d["model"].pop("head_dim"), "field model.head_dim: missing"),
    ("bad layer count", lambda d: d["head_types"].pop(), "field head_types: expected a list of 32 layers"),
    ("bad head count", lambda d: d["head_types"][3].pop(), "field head_types[3]: expected 8 KV heads"),
    ("unknown type", lambda d: d["head_types"][0].__setitem__(0, "leader"), "head_types[0][0]: unknown head type 'leader'"),
    ("ratio on full head", lambda d: _set_ratio_on_full(d), "must be null for a"),
    ("missing ratio", lambda d: _drop_ratio(d), "missing ratio for a"),
    ("ratios not normalised", lambda d: _scale_ratios(d, 1.1), "ratios of anchor/satellite heads must average 1"),
    ("pivot not pivot", lambda d: d["clusters"][0].update(pivot=d["clusters"][0]["satellites"][0]), "not pivot (head_types)"),
    ("satellite twice", lambda d: d["clusters"][1]["satellites"].append(d["clusters"][1]["satellites"][0]), "belongs to two clusters"),
    ("orphan satellite", lambda d: d["clusters"].pop(0), "is in no cluster"),
    ("stability range", lambda d: d.update(stability=[[1.5] * 8] * 32), "stability[0][0]: expected a number in [0.0, 1.0]"),
    ("calibration", lambda d: d["calibration"].pop("tau_sim"), "calibration.tau_sim: missing"),
    ("provenance", lambda d: d.pop("provenance"), "field provenance: missing"),
]


def _set_ratio_on_full(d):
    l, h = next((l, h) for l, row in enumerate(d["head_types"]) for h, t in enumerate(row) if t == "pivot")
    d["budget_ratios"][l][h] = 1.0


def _drop_ratio(d):
    l, h = next((l, h) for l, row in enumerate(d["head_types"]) for h, t in enumerate(row) if t == "satellite")
    d["budget_ratios"][l][h] = None


def _scale_ratios(d, k):
    d["budget_ratios"] = [[None if r is None else r * k for r in row] for row in d["budget_ratios"]]


@pytest.mark.parametrize("name, mutate, needle", CASES, ids=[c[0] for c in CASES])
def test_validation_names_the_field(llama_profile, tmp_path, name, mutate, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(llama_profile, mutate)))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(p)
    with pytest.raises(ProfileError, match="does not exist; check the `profile` option"):
        load_profile(tmp_path / "missing.json")


SMOL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}


def test_fingerprint_normalises_config_variants():
    old_style = {k: v for k, v in SMOL.items() if k not in ("rope_parameters", "head_dim")} | {"rope_theta": 100000.0}
    a = ModelFingerprint.from_hf_config(SMOL, name="x")
    b = ModelFingerprint.from_hf_config(old_style, name="y")
    assert a.config_hash == b.config_hash and a.differences(b) == []
    assert canonical_config(SMOL)["head_dim"] == 64


def test_mismatch_names_the_differing_field(llama_profile):
    smol = ModelFingerprint.from_hf_config(SMOL, name="smol")
    with pytest.raises(ProfileMismatchError) as e:
        llama_profile.model.check_matches(smol, profile_path="llama.json")
    msg = str(e.value)
    assert "model.num_layers: profile has 32, model has 30" in msg
    assert "model.num_kv_heads: profile has 8, model has 3" in msg
    assert "python -m vllm_heterocache.profiler" in msg


def test_mismatch_in_hashed_config_only(llama_profile):
    cfg = dict(llama_profile.model.config, rope_theta=10000.0, architectures=["LlamaForCausalLM"])
    other = ModelFingerprint.from_hf_config(cfg, name="llama-variant")
    with pytest.raises(ProfileMismatchError, match=r"model.config.rope_theta: profile has 500000.0, model has 10000.0"):
        llama_profile.model.check_matches(other)


def test_from_json_in_memory(llama_profile):
    assert HeadProfile.from_json(llama_profile.to_json()) == llama_profile
