"""Unsupported or wrong setups fail at engine startup with a message naming what to change."""

import json
import os
import subprocess
import sys

import pytest

from vllm_heterocache.head_profile.synthetic import save_synthetic_profile
from conftest import PROFILES, ROOT
from vllm_heterocache.vllm_adapter.startup import check_layer
from vllm_heterocache.errors import ConfigError

SCRIPT = """
import json, sys
from vllm import LLM
kwargs = json.loads(sys.argv[1])
if __name__ == "__main__":
    LLM(model=sys.argv[2], dtype="float32", max_model_len=1024, enforce_eager=True,
        attention_backend="heterocache", **kwargs)
"""


def start(model, multiprocess=False, **kwargs):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", OMP_NUM_THREADS="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kwargs), str(model)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode != 0, "the engine started although it should not have"
    return out.stdout + out.stderr


def last_line(log: str) -> str:
    return [line for line in log.splitlines() if line.strip()][-1]


def hc(**options):
    return {"additional_config": {"heterocache": options}}


@pytest.mark.slow
def test_startup_errors(tiny, tmp_path):
    profile = save_synthetic_profile(tiny, ["PS", "AV"], tmp_path / "tiny.json")
    cases = [
        (dict(enable_prefix_caching=False, **hc(profile=str(PROFILES / "Llama-3.1-8B-Instruct.json"))),
         "model.num_layers: profile has 32, model has 4"),
        (dict(enable_prefix_caching=False, **hc()),
         "no shipped head profile matches the model"),
        (dict(enable_prefix_caching=False, **hc(profile=str(profile), compression_ratio=0.3)),
         "The smallest feasible ratio is 0.501"),
        (dict(enable_prefix_caching=False, **hc(profile=str(profile), windw=4)),
         "unknown option(s) heterocache.windw"),
        (dict(kv_cache_dtype="fp8", **hc(profile=str(profile))),
         "heterocache does not support --kv-cache-dtype fp8: use auto"),
        (dict(enable_prefix_caching=False, **hc(profile=str(profile), compression_ratio=0.9, host_tier_gib=4000)),
         "heterocache.host_tier_gib=4000.0 does not fit"),
        (dict(enable_prefix_caching=False, **hc(profile=str(profile), compression_ratio=0.9, host_tier_gib=100000)),
         "heterocache.host_tier_gib must be at most 4096"),
        (dict(enable_prefix_caching=False, **hc(profile=str(profile), compression_ratio=0.9, host_tier_gib=4000,
                                                host_tier_path=str(tmp_path))),
         "GiB free, and the host tier needs 4000.00 GiB"),
        (dict(enable_prefix_caching=False, **hc(profile=str(profile), compression_ratio=0.9, host_tier_path="/nonexistent")),
         "heterocache.host_tier_path '/nonexistent' is not a directory"),
    ]
    for kwargs, needle in cases:
        log = start(tiny, **kwargs)
        assert needle in log, f"{kwargs}: {log[-3000:]}"
    assert "python -m vllm_heterocache.profiler --model" in start(tiny, enable_prefix_caching=False, **hc())


@pytest.mark.slow
def test_what_the_config_decides_is_refused_before_any_engine_process_starts(tiny, tmp_path):
    """With engine processes (as under vllm serve), the message is the last line printed, not an
    engine-core failure below a worker's traceback; vLLM's default prefix caching is no error."""
    profile = save_synthetic_profile(tiny, ["PS", "AV"], tmp_path / "tiny.json")
    cases = [
        (hc(profile=str(profile), compression_ratio=0.3), "The smallest feasible ratio is 0.501"),
        (hc(profile=str(profile), windw=4), "unknown option(s) heterocache.windw"),
        (dict(kv_cache_dtype="fp8", **hc(profile=str(profile))), "--kv-cache-dtype fp8: use auto"),
    ]
    for kwargs, needle in cases:
        log = start(tiny, multiprocess=True, **kwargs)
        assert needle in last_line(log), f"{kwargs}: {log[-3000:]}"
        assert "Engine core initialization failed" not in log


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(attn_type="encoder_only"), "encoder_only attention"),
        (dict(sliding_window=4096), "sliding-window attention (window 4096)"),
        (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8"),
        (dict(logits_soft_cap=30.0), "logit soft-capping"),
    ],
)
def test_unsupported_layers_are_refused(kwargs, needle):
    args = dict(attn_type="decoder", sliding_window=None, alibi_slopes=None, sinks=None, logits_soft_cap=None,
                kv_cache_dtype="auto", kv_sharing_target_layer_name=None) | kwargs
    with pytest.raises(ConfigError, match="serve it without --attention-backend heterocache") as e:
        check_layer(**args)
    assert needle in str(e.value)


def _small_shm_prefix() -> list[str]:
    """A command prefix that runs the rest with a 64 MB /dev/shm (a container engine's default) in
    a mount namespace of its own; skips where namespaces cannot be made."""
    probe = subprocess.run(["unshare", "--mount", "--fork", "sh", "-c", "mount -t tmpfs -o size=64m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small /dev/shm in a mount namespace here: {probe.stderr.strip()}")
    return ["unshare", "--mount", "--fork", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"', "sh"]


@pytest.mark.slow
def test_too_small_dev_shm_is_one_line_naming_the_flags(tiny, tmp_path):
    """vLLM's engine needs 240 MiB of /dev/shm for its message queues: with 64 MB its worker fails
    deep in a traceback; HeteroCache refuses before any engine process starts, in one last line."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    profile = save_synthetic_profile(tiny, ["PS", "AV"], tmp_path / "tiny.json")
    out = subprocess.run(_small_shm_prefix() + [sys.executable, "-c", SCRIPT, json.dumps(hc(profile=str(profile), compression_ratio=0.75)), str(tiny)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    line = last_line(log)
    assert "/dev/shm has 64 MiB free" in line and "--shm-size" in line and "--ipc=host" in line, log[-3000:]
    assert "Engine core initialization failed" not in log
