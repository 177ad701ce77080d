"""Which profile serves a model: explicit file, or the shipped one matching its fingerprint."""

from pathlib import Path

import pytest

from conftest import PROFILES
from vllm_heterocache.errors import ProfileError, ProfileMismatchError
from vllm_heterocache.head_profile.importer import KNOWN_MODELS
from vllm_heterocache.head_profile.resolve import resolve_profile

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


# --- several shipped profiles of one model (the SmolLM2 default and its sparse variant) ----------

def test_the_default_of_several_profiles_is_the_file_named_after_the_model():
    """profiles/ holds SmolLM2-135M-Instruct.json and SmolLM2-135M-Instruct-sparse.json (which sorts
    first); the model's fingerprint picks the one named after it, whatever the served path."""
    assert (PROFILES / "SmolLM2-135M-Instruct-sparse.json").is_file()
    for model in ("/somewhere/my-smol-copy", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert Path(resolve_profile(SMOL, model).source).name == "SmolLM2-135M-Instruct.json"


def test_a_variant_is_picked_by_name_or_path():
    by_name = resolve_profile(SMOL, "/m/smol", "SmolLM2-135M-Instruct-sparse")
    by_path = resolve_profile(SMOL, "/m/smol", str(PROFILES / "SmolLM2-135M-Instruct-sparse.json"))
    assert Path(by_name.source).name == Path(by_path.source).name == "SmolLM2-135M-Instruct-sparse.json"
    assert by_name.calibration["tau_stable"] == 0.45
    assert Path(resolve_profile(SMOL, "/m/smol", "SmolLM2-135M-Instruct").source).name == "SmolLM2-135M-Instruct.json"


def test_a_wrong_name_lists_the_shipped_names():
    with pytest.raises(ProfileError, match=r"no shipped head profile named 'SmolLM2-sparse'.*"
                       r"SmolLM2-135M-Instruct, SmolLM2-135M-Instruct-sparse for this model; all: .*Llama-3.1-8B-Instruct"):
        resolve_profile(SMOL, "/m/smol", "SmolLM2-sparse")
    # a shipped name for another model is refused like a file for another model
    with pytest.raises(ProfileMismatchError, match="model.num_layers: profile has 32, model has 30"):
        resolve_profile(SMOL, "/m/smol", "Llama-3.1-8B-Instruct")
    # a path that does not exist stays a path
    with pytest.raises(ProfileError, match="profile file .*nope.json' does not exist"):
        resolve_profile(SMOL, "/m/smol", "/tmp/nope.json")


def test_several_profiles_of_a_model_without_a_default_must_be_chosen(tmp_path, monkeypatch):
    import shutil

    for name in ("smol-a", "smol-b"):
        shutil.copy(PROFILES / "SmolLM2-135M-Instruct.json", tmp_path / f"{name}.json")
    monkeypatch.setenv("HETEROCACHE_PROFILE_DIR", str(tmp_path))
    with pytest.raises(ProfileError, match=r"several shipped profiles for 'HuggingFaceTB/SmolLM2-135M-Instruct' and "
                       r"none named after it \(smollm2-135m-instruct.json\).*choose one with the `profile` option"):
        resolve_profile(SMOL, "/m/smol")
    assert Path(resolve_profile(SMOL, "/m/smol", "smol-b").source) == tmp_path / "smol-b.json"
    # one profile of the model in the first folder overrides the shipped ones, whatever its file name
    (tmp_path / "smol-a.json").unlink()
    assert Path(resolve_profile(SMOL, "/m/smol").source) == tmp_path / "smol-b.json"


def test_cli_show_takes_a_shipped_name(capsys):
    from vllm_heterocache.cli import main as cli_main

    assert cli_main(["show", "SmolLM2-135M-Instruct-sparse"]) == 0
    assert "full           17   18.9%" in capsys.readouterr().out
    assert cli_main(["show", "no-such-profile"]) == 2
    assert "SmolLM2-135M-Instruct-sparse" in capsys.readouterr().err
