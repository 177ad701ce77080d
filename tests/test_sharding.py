"""One KV cache layout for every tensor-parallel rank (``sharding``), on hand cases and the
shipped profiles."""

import pytest
from conftest import ROOT

from vllm_heterocache.budget import Budgeter
from vllm_heterocache.cli import main
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.head_profile import load_profile
from vllm_heterocache.sharding import FULL_POOL, layer_caches, local_kv_heads, model_caches

F = FULL_POOL
SHIPPED = ["Llama-3.1-8B-Instruct", "DeepSeek-R1-Distill-Llama-8B", "Qwen2.5-14B-Instruct"]


def fits(cache_pool, head_pool):
    """A cache holds a head of its own pool or of a pool with less room (full holds any)."""
    return cache_pool == head_pool or cache_pool == F or (head_pool != F and cache_pool > head_pool)


def test_ranks_with_the_same_pools_keep_head_j_in_cache_j():
    lc = layer_caches([(1, F, 0), (1, F, 0)])
    assert lc.pools == (1, F, 0) and lc.cache_of == ((0, 1, 2), (0, 1, 2))
    assert lc.moved(0, (1, F, 0)) == (0, 0)


def test_uneven_ranks_share_caches_with_room_for_each_mix():
    # rank 0: two full heads and two of class 0; rank 1: one full, one of class 2, two of class 1
    lc = layer_caches([(F, 0, F, 0), (1, 2, F, 1)])
    # 2 full caches (rank 0's full heads); rank 1 needs room >= class 2 for 2 heads: the full
    # caches have it; room >= class 1 for 4 heads: 2 more caches of class 1
    assert lc.pools == (F, F, 1, 1)
    assert lc.cache_of[0] == (0, 2, 1, 3)  # its class-0 heads in the class-1 caches
    assert lc.cache_of[1] == (2, 1, 0, 3)  # most room first: full head, class-2 head (in a full cache), class 1s
    assert lc.moved(0, (F, 0, F, 0)) == (0, 2) and lc.moved(1, (1, 2, F, 1)) == (1, 0)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("classes", [1, 4])
def test_shipped_profiles_get_one_layout_at_tp_2_4_8(name, classes):
    profile = load_profile(ROOT / "profiles" / f"{name}.json")
    _, pool_of = Budgeter(profile, HeteroCacheConfig(budget_classes=classes), block_size=16).pools()
    for tp in (2, 4, 8):
        if profile.num_kv_heads % tp and tp % profile.num_kv_heads:
            continue
        caches = model_caches(pool_of, profile.num_layers, profile.num_kv_heads, tp)
        for layer, lc in enumerate(caches):
            for rank in range(tp):
                heads = local_kv_heads(profile.num_kv_heads, rank, tp)
                slots = lc.cache_of[rank]
                assert sorted(slots) == list(range(len(lc.pools)))  # every cache used once: no padding
                for h, c in zip(heads, slots):
                    assert fits(lc.pools[c], pool_of(layer, h)), (name, tp, layer, rank, h)


def test_show_prints_how_ranks_share_the_layout(capsys):
    assert main(["show", str(ROOT / "profiles" / "Llama-3.1-8B-Instruct.json"), "--tp-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "heterocache.budget_classes=1: tensor_parallel_size=2: of the 256" in out
    assert "hold a compressed head in a full cache" in out
    assert main(["show", str(ROOT / "profiles" / "Llama-3.1-8B-Instruct.json"), "--tp-size", "3"]) == 2
    assert "cannot be split evenly over tensor_parallel_size=3" in capsys.readouterr().err


def test_host_tiers_are_shared_by_the_ranks_of_a_node():
    """Each rank allocates a host tier; the default size and the host_tier_gib check divide the
    node's memory among the ranks of all engines on it (vLLM's own ParallelConfig)."""
    from vllm.config import ParallelConfig

    from vllm_heterocache.vllm_adapter.runner_hooks import _host_tiers_on_node

    assert _host_tiers_on_node(ParallelConfig()) == 1
    assert _host_tiers_on_node(ParallelConfig(tensor_parallel_size=2)) == 2
    assert _host_tiers_on_node(ParallelConfig(tensor_parallel_size=2, data_parallel_size=2,
                                              data_parallel_size_local=2)) == 4
    assert _host_tiers_on_node(ParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2, nnodes=2)) == 4
