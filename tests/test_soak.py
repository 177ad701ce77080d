"""The soak benchmark's short version (benchmarks/bench_soak.py): 64 concurrent streams of mixed
prompt lengths up to the served context against the real server, some clients leaving
mid-stream; every other request completes, and the server settles back to its baseline on its
own /metrics (no request, refill, host-tier or device block held)."""

import argparse

import pytest

from vllm_heterocache.serve import vllm_executable

pytestmark = pytest.mark.slow


def test_short_soak_under_64_streams_with_disconnects(tmp_path):
    import bench_soak

    from vllm_heterocache.vllm_adapter.metrics import METRICS

    a = argparse.Namespace(requests=200, warmup=64, concurrency=64, disconnect=0.15, max_model_len=2048,
                           kv_gib=0.25, ready_timeout=600, malloc="glibc", replay=False)
    model, options = bench_soak.model_and_options("tiny", 0.5, tmp_path)
    r = bench_soak.run_setting("heterocache", 0, model, options, a, tmp_path, vllm_executable())
    assert r["failed"] == 0, r["failures"]
    assert r["disconnected"] >= 10 and r["completed"] == a.requests - a.warmup - r["disconnected"]
    assert r["baseline_after_warmup"] == {} and r["off_baseline"] == {}, (r["baseline_after_warmup"], r["off_baseline"])
    seen = set(r["heterocache"])  # sample names: counters end in _total, histograms have _count
    missing = [m for m in METRICS if not {f"heterocache_{m}{suffix}" for suffix in ("", "_total", "_count")} & seen]
    assert not missing, missing
    assert r["heterocache"]["heterocache_drifts_total"] > 0 and r["heterocache"]["heterocache_refill_failures_total"] == 0


def test_rss_helpers_and_fixed_prompt_length():
    """The worker's RSS by kind and by mapping (what grows: anonymous memory or a library), and
    --prompt-len (one prompt length: per-shape caches then see one shape)."""
    import os

    import bench_soak

    kinds = bench_soak.rss_kinds(os.getpid())
    assert kinds["VmRSS"] > 0 and kinds["RssAnon"] + kinds["RssFile"] + kinds["RssShmem"] == kinds["VmRSS"]
    maps = bench_soak.rss_by_mapping(os.getpid())
    assert sum(maps.values()) > 0 and any(k.endswith(".so") or ".so." in k for k in maps)
    assert bench_soak.rss_kinds(None) == {} and bench_soak.rss_by_mapping(None) == {}
    assert bench_soak.mapping_growth({"a": 1, "b": 5}, {"a": 4, "c": 1}) == [("b", -5), ("a", 3), ("c", 1)]
    fixed = bench_soak.make_requests(20, 2048, 4096, 0.1, seed=0, prompt_len=100)
    mixed = bench_soak.make_requests(20, 2048, 4096, 0.1, seed=0)
    assert {len(r.prompt) for r in fixed} == {100} and len({len(r.prompt) for r in mixed}) > 1
    with pytest.raises(SystemExit):
        bench_soak.make_requests(1, 2048, 4096, 0.1, seed=0, prompt_len=4000)
