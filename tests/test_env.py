"""HETEROCACHE_* environment variables: a bad value is a clear error naming the variable."""

import logging

import pytest

from vllm_heterocache import env
from vllm_heterocache.errors import ConfigError


@pytest.mark.parametrize("raw, want", [("1", True), ("true", True), ("On", True), ("0", False), ("", False), ("no", False)])
def test_flags(monkeypatch, raw, want):
    monkeypatch.setenv("HETEROCACHE_STEP_TIMING", raw)
    assert env.flag("HETEROCACHE_STEP_TIMING") is want


def test_a_bad_flag_names_the_variable(monkeypatch):
    monkeypatch.setenv("HETEROCACHE_STEP_TIMING", "please")
    with pytest.raises(ConfigError, match=r"HETEROCACHE_STEP_TIMING='please': set it to 1 or 0"):
        env.check()


def test_a_missing_directory_is_an_error_not_a_silent_skip(monkeypatch, tmp_path):
    monkeypatch.setenv("HETEROCACHE_PROFILE_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="HETEROCACHE_PROFILE_DIR=.* is not a directory"):
        env.check()
    from vllm_heterocache.head_profile.resolve import shipped_profile_dirs

    with pytest.raises(ConfigError, match="HETEROCACHE_PROFILE_DIR"):
        shipped_profile_dirs()
    monkeypatch.setenv("HETEROCACHE_PROFILE_DIR", str(tmp_path))
    assert shipped_profile_dirs()[0] == tmp_path


def test_a_cache_dir_that_is_a_file(monkeypatch, tmp_path):
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="HETEROCACHE_CACHE_DIR=.* is a file"):
        env.check()


def test_unknown_names_are_logged_with_the_closest(monkeypatch, caplog):
    monkeypatch.setenv("HETEROCACHE_STEP_TIMNG", "1")
    with caplog.at_level(logging.WARNING, logger="vllm.heterocache"):
        env.check()
    assert "unknown environment variable HETEROCACHE_STEP_TIMNG ignored (did you mean HETEROCACHE_STEP_TIMING?)" in caplog.text


def test_the_engine_refuses_a_bad_value_at_startup(monkeypatch):
    """The plugin's registration (run by vLLM in every process) checks the environment."""
    monkeypatch.setenv("HETEROCACHE_STEP_TIMING", "sometimes")
    from vllm_heterocache.vllm_adapter.registration import register

    with pytest.raises(ConfigError, match="HETEROCACHE_STEP_TIMING"):
        register()
