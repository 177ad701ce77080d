"""The offline profiler end to end on the tiny model (real transformers forward passes)."""

import json

import pytest

from conftest import PROFILES

from vllm_heterocache.cli import main as cli_main
from vllm_heterocache.head_profile import HeadType, load_profile
from vllm_heterocache.profiler.__main__ import main as profiler_main

ARGS = ["--num-docs", "2", "--prompt-tokens", "96", "--decode-steps", "6", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vllm_heterocache.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def profiled(tiny, tmp_path_factory):
    """Profiles the tiny model twice to the same path; returns the path and the first run's bytes."""
    path = tmp_path_factory.mktemp("prof") / "tiny.json"
    runs = []
    for _ in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SOURCE_DATE_EPOCH", "1800000000")
            assert profiler_main(["--model", str(tiny), "--output", str(path), *ARGS]) == 0
        runs.append((path.read_bytes(), path.with_suffix(".png").read_bytes()))
    return path, runs


def test_profile_is_valid_and_matches_the_model(profiled, tiny):
    from vllm_heterocache.head_profile import ModelFingerprint

    profile = load_profile(profiled[0])
    config = json.loads((tiny / "config.json").read_text())
    profile.model.check_matches(ModelFingerprint.from_hf_config(config))
    assert (profile.num_layers, profile.num_kv_heads) == (4, 2)
    assert sum(profile.counts().values()) == 8
    assert profile.stability is not None and profile.similarity is not None
    assert profile.calibration["decode_steps"] == 6 and profile.calibration["data"]["num_docs"] == 2
    assert profile.provenance["command"].startswith("python -m vllm_heterocache.profiler --model")
    assert profile.provenance["created"] == "2027-01-15T08:00:00Z"


def test_types_follow_the_stored_scores(profiled):
    """Re-deriving the taxonomy from the file's own stability/similarity gives its types."""
    import torch

    from vllm_heterocache import taxonomy

    p = load_profile(profiled[0])
    types, clusters = taxonomy.classify(
        torch.tensor(p.stability, dtype=torch.float64), torch.tensor(p.similarity, dtype=torch.float64),
        p.calibration["tau_stable"], p.calibration["tau_sim"],
    )
    assert [tuple(r) for r in types] == list(p.head_types)
    assert tuple(clusters) == p.clusters
    for l, row in enumerate(p.head_types):
        for h, t in enumerate(row):
            s = p.stability[l][h]
            if t is HeadType.ANCHOR:
                assert s >= p.calibration["tau_stable"]
            if t is HeadType.VOLATILE:
                assert s < p.calibration["tau_stable"]


def test_same_input_same_file(profiled):
    (json_a, png_a), (json_b, png_b) = profiled[1]
    assert json_a == json_b and png_a == png_b


def test_heatmap_is_a_png_of_the_grid(profiled):
    from PIL import Image

    img = Image.open(profiled[0].with_suffix(".png"))
    assert img.format == "PNG" and img.width >= 100 and img.height >= 4 * 16


def test_tp_size_keeps_clusters_inside_ranks(tiny, tmp_path):
    out = tmp_path / "tp.json"
    assert profiler_main(["--model", str(tiny), "--output", str(out), "--tp-size", "2", "--tau-sim", "0.0", *ARGS]) == 0
    p = load_profile(out)
    assert p.clusters == ()  # 2 KV heads over 2 ranks: no head shares a rank with another
    assert p.calibration["tp_size"] == 2


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--num-docs", "0"], "--num-docs: must be >= 1"),
        (["--pool-kernel", "4"], "--pool-kernel: must be a positive odd integer"),
        (["--tau-sim", "1.5"], "--tau-sim: must be in [0, 1]"),
        (["--sources", "bible"], "--sources: unknown ['bible']"),
    ],
)
def test_bad_arguments_name_the_flag(tiny, tmp_path, capsys, extra, needle):
    rc = profiler_main(["--model", str(tiny), "--output", str(tmp_path / "x.json"), *extra])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_missing_model_folder(tmp_path, capsys):
    assert profiler_main(["--model", str(tmp_path), "--output", str(tmp_path / "x.json")]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_cli_show_checks_the_model(profiled, tiny, tmp_path, capsys):
    assert cli_main(["show", str(profiled[0]), "--model", str(tiny), "--heatmap", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "profile matches the model" in out and (tmp_path / "h.png").is_file()
    assert cli_main(["show", str(PROFILES / "Llama-3.1-8B-Instruct.json"), "--model", str(tiny)]) == 2
    assert "model.num_layers: profile has 32, model has 4" in capsys.readouterr().err
