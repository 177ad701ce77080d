"""The backend inside real vLLM engines (tiny model; SmolLM2 for identity): greedy identity with
the stock backend when nothing is compressed, and real serving conditions when compressing."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PROFILES, ROOT

RUNNER = ROOT / "tests" / "engine_runner.py"
pytestmark = pytest.mark.slow


def run_engines(scenario, model, profile, multiprocess=False, timeout=900, **env_vars):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", **env_vars)
    out = subprocess.run([sys.executable, str(RUNNER), scenario, str(model), str(profile)],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):]), out.stdout + out.stderr


def test_identity_with_the_stock_backend_on_the_tiny_model(tiny, tiny_profile):
    results, log = run_engines("identity", tiny, tiny_profile)
    stock = results["stock"]["tokens"]
    assert [len(t) for t in stock] == [24] * 4
    # ratio 1 keeps every token: the base kernel's output is used as is
    assert results["ratio1"]["tokens"] == stock and results["ratio1"]["compresses"] is False
    # a token budget beyond every prompt: the caches are split per head and every head runs
    # HeteroCache's own decode path (the gather kernel) over all tokens; requests that keep every
    # token select nothing; greedy decoding still equals the stock backend's
    assert results["keep_all_budget"]["compresses"] is True
    assert results["keep_all_budget"]["counters"]["prefill_selections"] == 0
    assert results["keep_all_budget"]["tokens"] == stock
    # the same in mixed steps (prefilling rows run vLLM's kernel over those rows only, decoding
    # rows the gather kernel), against the stock backend given the same chunks
    assert results["keep_all_chunked"]["tokens"] == results["stock_chunked"]["tokens"]
    assert "HeteroCache attention backend: policy heterocache" in log
    assert "Cannot use" not in log  # the CPU platform did not replace the selection


def test_serving_conditions_with_compression(tiny, tiny_profile):
    results, log = run_engines("serving", tiny, tiny_profile)
    r = results["compressed"]
    assert [len(t) for t in r["tokens"]] == [100] * 24
    c = r["counters"]
    # one selection per request and layer after its last prompt chunk (256-token chunks), again
    # for a request recomputed after preemption; prompts below min_prompt_len (256) keep every
    # token and select nothing
    compressed = sum(40 + 90 * (i % 9) >= 256 for i in range(24))
    assert compressed == 15 and c["prefill_selections"] >= compressed * 4
    assert c["drift_checks"] > 0 and c["refilled_heads"] > 0
    assert r["preemptions"] >= 1  # too few KV blocks for 24 requests
    # everything goes back: request states, host-tier blocks, vLLM's blocks (all free but the null block)
    assert r["states"] == 0 and r["host_used_blocks"] == 0
    assert r["free_blocks"] == r["num_blocks"] - 1
    # the metrics line, and the host tier's size at startup
    assert "heterocache host tier:" in log
    stats = [l for l in log.splitlines() if "heterocache stats:" in l]
    assert stats and "device compressed pool" in stats[-1] and "host bytes in" in stats[-1]


def agreement(a, b) -> float:
    """The fraction of requests whose greedy tokens are equal in two runs of the same batches."""
    pairs = [(x, y) for batch_a, batch_b in zip(a, b) for x, y in zip(batch_a, batch_b)]
    return sum(x == y for x, y in pairs) / len(pairs)


def check_prefix_runs(results):
    """vLLM's prefix cache on and off over ``engine_runner.prefix_batches``: the same answers with
    hits as without (at least as often as the stock backend's), the hits where they belong, and
    every block, request state and host-tier block back at the end."""
    hc, stock = results["hc_pc"], results["stock_pc"]
    assert agreement(hc["tokens"], results["hc_nopc"]["tokens"]) >= agreement(
        stock["tokens"], results["stock_nopc"]["tokens"])
    assert agreement(hc["tokens"], results["hc_nopc"]["tokens"]) == 1.0  # float32: no near-tie flips here
    # prompt of 1100 tokens again: a hit up to its observation window (8), in whole blocks: 1024;
    # part of a prompt (900 of 1100 shared): 896; three requests on one 700-token prefix: 640 each;
    # two requests on a new 650-token prefix scheduled together: the second hits what the first computes
    assert hc["hits"][:4] == [[0], [1024], [896], [640, 640, 640]] == stock["hits"][:4]
    assert hc["hits"][4] == stock["hits"][4] and hc["hits"][4][1] >= 512
    assert hc["hits"][6] == [0]  # the small cache evicted the first prompt's blocks
    assert hc["counters"]["prefix_cache_hit_tokens"] == sum(map(sum, hc["hits"]))
    assert hc["counters"]["prefill_selections"] > 0 and hc["counters"]["refilled_heads"] > 0
    for r in (hc, results["hc_nopc"], results["hc_copy_pc"]):
        assert r["states"] == 0 and r["host_used_blocks"] == 0 and r["free_blocks"] == r["num_blocks"] - 1
    # hits copied instead of pointed at (shared_prefixes copy): the same answers and hits
    assert results["hc_copy_pc"]["tokens"] == results["hc_nopc"]["tokens"]
    assert results["hc_copy_pc"]["hits"][:6] == hc["hits"][:6]


def test_prefix_caching_hits_change_no_answer(tiny, tiny_profile):
    results, log = run_engines("prefix", tiny, tiny_profile)
    check_prefix_runs(results)
    # ratio 1 with the prefix cache: vLLM's own backend, the stock tokens and hits
    assert results["ratio1_pc"]["tokens"] == results["stock_pc"]["tokens"]
    assert results["ratio1_pc"]["hits"] == results["stock_pc"]["hits"]
    # a request with policy full that hits the blocks a compressed request cached: stock's tokens
    full = results["full_after_compressed"]
    assert full["hits"][1] == [1024] and full["tokens"][1] == results["stock_pc"]["tokens"][1]


def test_prefix_caching_under_preemption_returns_everything(tiny, tiny_profile):
    """Prompts that share prefixes, too few blocks: requests hit, wait, are preempted and come
    back (hitting again); at the end every block, state and host-tier block is free."""
    results, _ = run_engines("serving_shared", tiny, tiny_profile)
    r = results["compressed"]
    assert [len(t) for t in r["tokens"]] == [100] * 24
    assert r["preemptions"] >= 1 and r["counters"]["prefix_cache_hit_tokens"] > 0
    assert r["states"] == 0 and r["host_used_blocks"] == 0 and r["free_blocks"] == r["num_blocks"] - 1


def test_policies_per_server_and_per_request(tiny, tiny_profile):
    results, log = run_engines("policies", tiny, tiny_profile)
    stock = results["stock"]["tokens"]

    def settled(r):  # every request state, host-tier block and KV block is back
        assert [len(t) for t in r["tokens"]] == [24] * 4
        assert r["states"] == 0 and r["free_blocks"] == r["num_blocks"] - 1

    for policy in ("streamingllm", "snapkv", "pyramidkv", "duo"):
        r = results[policy]
        settled(r)
        assert r["compresses"] is True and r["counters"]["prefill_selections"] > 0, policy
        assert r["counters"]["drift_checks"] == 0, policy  # only HeteroCache's layout tracks drift
        kept = r["kept"][policy]
        assert kept["cumulative"][-1] == 4, policy  # every request kept a fraction, counted under its policy
        assert f"policy {policy} (" in log
    # every head compressed at 0.3 (window 8, prompts of 300-1100 tokens): about 0.3 of the KV kept
    assert 0.25 < results["snapkv"]["kept"]["snapkv"]["sum"] / 4 < 0.35
    # the front end refuses what an engine cannot do, naming the key: HeteroCache keys on a server
    # of another backend (misspelt ones too), a policy this server's pools cannot hold
    for key in ("heterocache_policy", "heterocache_polcy"):
        assert f"vllm_xargs.{key} needs a server started with --attention-backend heterocache" in \
            results["stock"]["refused"]
    assert "vllm_xargs.heterocache_policy='snapkv'" in results["mixed"]["refused"]
    # policy full: every token, vLLM's own kernels: the stock backend's tokens
    assert results["full"]["compresses"] is False and results["full"]["tokens"] == stock

    # mixed policies in one batch on a HeteroCache server: the request that opts out keeps
    # every token in every pool (its compressed heads run the gather kernel over all of them)
    # and decodes as the stock backend does; the others keep what their policy and ratio say
    r = results["mixed"]
    settled(r)
    assert r["tokens"][0] == stock[0]
    counts = {p: h["cumulative"][-1] for p, h in r["kept"].items()}
    assert counts == {"full": 1, "duo": 1, "heterocache": 2}
    assert r["kept"]["full"]["sum"] == 1.0
    assert r["kept"]["duo"]["sum"] > 0.85  # ratio 0.9
    assert 1.45 < r["kept"]["heterocache"]["sum"] < 1.6  # 0.6 (the server's) + 0.9
    # an all-compressed (snapkv) server takes every policy per request, duo's full heads included
    r = results["mixed_snapkv"]
    settled(r)
    assert r["tokens"][0] == stock[0]
    assert {p for p, h in r["kept"].items() if h["cumulative"][-1]} == {"full", "streamingllm", "pyramidkv", "duo"}


def test_multiprocess_engine_selects_heterocache(tiny, tiny_profile):
    results, log = run_engines("multiprocess", tiny, tiny_profile, multiprocess=True)
    assert [len(t) for t in results["compressed"]["tokens"]] == [12, 12]
    assert "HeteroCache attention backend: policy heterocache" in log  # logged by the spawned engine core
    assert "Cannot use" not in log


def test_tensor_parallel_two_ranks(tiny, tiny_profile):
    """TP=2, one core per rank. The tiny model has 2 KV heads, so rank r holds head r: every
    pivot cluster of the profile crosses ranks (its drift decisions and refill positions are
    exchanged) and every layer holds a full head on one rank and a compressed one on the other
    (one cache layout for both: the compressed head sits in a full cache)."""
    results, log = run_engines("tp2", tiny, tiny_profile, timeout=1500, VLLM_CPU_OMP_THREADS_BIND="0|1")
    assert results["keep_all"]["tokens"] == results["stock"]["tokens"]
    tp1, tp2 = results["compressed_tp1"]["tokens"], results["compressed"]["tokens"]
    assert [len(t) for t in tp2] == [48] * 4
    assert tp2 == tp1  # the same decisions as one rank (float32 model, 48 greedy tokens)
    ranks = results["compressed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["cache_pools"] == ranks[1]["cache_pools"]  # vLLM's one layout
    one = results["compressed_tp1"]["counters"]
    for r in ranks:  # each rank decides for its pivots and refills its satellites
        assert r["counters"]["drift_checks"] > 0 and r["counters"]["drifts"] > 0 and r["counters"]["refilled_heads"] > 0
        assert r["states"] == 0 and r["host_used_blocks"] == 0 and r["host_blocks"] > 0  # all freed
    assert sum(r["counters"]["drifts"] for r in ranks) == one["drifts"]
    assert sum(r["counters"]["refilled_heads"] for r in ranks) == one["refilled_heads"]
    assert [r["host_rows"] for r in ranks] == [1, 2]  # satellites: layer 1 on rank 0; layers 0 and 3 on rank 1
    # each rank's metrics (what /metrics serves), published by its worker process, settled
    published = sorted(results["compressed"]["published"], key=lambda s: s["labels"]["tp_rank"])
    assert [s["labels"]["tp_rank"] for s in published] == ["0", "1"]
    for snap, r in zip(published, ranks):
        assert {k: snap["counters"][k] for k in r["counters"]} == r["counters"]
        assert snap["gauges"]["requests"] == 0 and snap["gauges"]["host_tier_blocks_used"] == 0
    assert "tensor_parallel_size=2: of the" in log  # how the ranks share the cache layout


def test_tensor_parallel_two_ranks_with_a_real_profile(tmp_path):
    """Llama-3.1-8B-Instruct's shipped layout (32 layers x 8 KV heads: at TP=2, 32 of its 33
    clusters cross ranks and the ranks' mixes of pools differ) on a random model of that shape."""
    from backend_support import save_converted_profile

    from vllm_heterocache.models.tiny import build_tiny_model
    from vllm_heterocache.head_profile import load_profile
    from vllm_heterocache.sharding import crossing_clusters

    model = build_tiny_model(num_layers=32, num_key_value_heads=8, num_attention_heads=16, head_dim=32,
                             hidden_size=256)
    profile = save_converted_profile(model, PROFILES / "Llama-3.1-8B-Instruct.json", tmp_path / "llama-layout.json")
    assert len(crossing_clusters(load_profile(profile), 2)) == 32
    results, log = run_engines("tp2_real", model, profile, timeout=1500, VLLM_CPU_OMP_THREADS_BIND="0|1")
    tp1, tp2 = results["compressed_tp1"]["tokens"], results["compressed"]["tokens"]
    assert [len(t) for t in tp2] == [32] * 3
    assert tp2 == tp1
    ranks = results["compressed"]["ranks"]
    assert ranks[0]["cache_pools"] == ranks[1]["cache_pools"]
    assert any(p0 != p1 for p0, p1 in zip(ranks[0]["cache_of"], ranks[1]["cache_of"]))  # uneven mixes
    for r in ranks:
        assert r["counters"]["drift_checks"] > 0 and r["counters"]["refilled_heads"] > 0
        assert r["states"] == 0 and r["host_used_blocks"] == 0
    one = results["compressed_tp1"]["counters"]
    assert sum(r["counters"]["drifts"] for r in ranks) == one["drifts"]
    assert sum(r["counters"]["refilled_heads"] for r in ranks) == one["refilled_heads"]


def test_prefix_caching_at_two_tensor_parallel_ranks(tiny, tiny_profile):
    results, _ = run_engines("prefix_tp2", tiny, tiny_profile, timeout=1500, VLLM_CPU_OMP_THREADS_BIND="0|1")
    pc, nopc = results["hc_pc"], results["hc_nopc"]
    assert pc["hits"] == [[0], [1024], [896], [640, 640, 640]]
    assert pc["tokens"] == nopc["tokens"]
    for r in pc["ranks"]:  # both ranks count the same hits, and give everything back
        assert r["counters"]["prefix_cache_hit_tokens"] == sum(map(sum, pc["hits"]))
        assert r["states"] == 0 and r["host_used_blocks"] == 0


@pytest.mark.model
def test_prefix_caching_on_smollm2():
    from vllm_heterocache.models.smollm2 import prepare_default_model

    results, _ = run_engines("prefix", prepare_default_model(), PROFILES / "SmolLM2-135M-Instruct.json",
                             timeout=1800, PREFIX_BLOCKS="360")
    check_prefix_runs(results)
    # vLLM groups the caches as the budgeter chose its classes for: no block pays for padding
    # beyond 2% of its caches (4 equal classes beside the 35 full heads padded 44%)
    from vllm_heterocache.budget import Budgeter
    from vllm_heterocache.config import HeteroCacheConfig
    from vllm_heterocache.head_profile import load_profile

    budgeter = Budgeter(load_profile(PROFILES / "SmolLM2-135M-Instruct.json"),
                        HeteroCacheConfig(compression_ratio=0.6), block_size=128)
    groups, slots, caches = budgeter.group_slots(*budgeter.capacity_classes(4))
    layers = results["hc_pc"]["group_layers"]
    assert (len(layers), max(layers) * len(layers)) == (groups, slots) and slots <= 1.02 * caches == 1.02 * 90


@pytest.mark.model
def test_identity_with_the_stock_backend_on_smollm2():
    from vllm_heterocache.models.smollm2 import prepare_default_model

    results, _ = run_engines("identity", prepare_default_model(), PROFILES / "SmolLM2-135M-Instruct.json")
    stock = results["stock"]["tokens"]
    assert results["ratio1"]["tokens"] == stock
    assert results["keep_all_budget"]["tokens"] == stock
    assert results["keep_all_chunked"]["tokens"] == results["stock_chunked"]["tokens"]
