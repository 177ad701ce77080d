import math

import pytest
import torch

from vllm_heterocache.budget import Budgeter, min_feasible_ratio, prompt_budgets
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.errors import BudgetError, ProfileError
from vllm_heterocache.head_profile import HeadProfile
from vllm_heterocache.sharding import crossing_clusters, local_kv_heads

from conftest import ROOT


def test_ratio_formula_matches_the_paper(llama_profile):
    L, H, F = 4096, 256, 50
    plan = prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=0.25, window=0), L)
    base = (0.25 * H - F) * L / (H - F)
    assert plan.base == pytest.approx(base)
    for l in range(32):
        for h in range(8):
            r = llama_profile.budget_ratios[l][h]
            expected = L if r is None else min(L, math.floor(base * r))
            assert int(plan.per_head[l, h]) == expected
    assert plan.kept_fraction() == pytest.approx(0.25, abs=0.002)
    assert plan.reference_topk == math.floor(base)


def test_window_is_a_floor_of_every_budget(llama_profile):
    plan = prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=0.21, window=64), 1000)
    assert int(plan.per_head.min()) == 64


def test_prompt_shorter_than_window_keeps_everything(llama_profile):
    plan = prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=0.25, window=32), 20)
    assert torch.all(plan.per_head == 20)


def test_ratio_one_keeps_every_token(llama_profile):
    plan = prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=1.0), 777)
    assert torch.all(plan.per_head == 777) and plan.kept_fraction() == 1.0


def test_token_budget_mode(llama_profile):
    plan = prompt_budgets(llama_profile, HeteroCacheConfig(token_budget=100, window=8), 10_000)
    r = llama_profile.budget_ratios[0][0]
    assert plan.base == 100 and int(plan.per_head[0, 0]) == max(8, math.floor(100 * r))
    assert plan.reference_topk == 100


def test_infeasible_ratio_names_the_smallest_feasible_one(llama_profile):
    assert min_feasible_ratio(llama_profile) == pytest.approx(50 / 256)
    with pytest.raises(BudgetError) as e:
        prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=0.1), 4096)
    msg = str(e.value)
    assert "heterocache.compression_ratio=0.1 is infeasible" in msg
    assert "smallest feasible ratio is 0.196" in msg
    prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=0.196), 4096)  # and it is


def test_round_to_block(llama_profile):
    cfg = HeteroCacheConfig(compression_ratio=0.3, round_to_block=True)
    plan = prompt_budgets(llama_profile, cfg, 1000, block_size=16)
    assert torch.all((plan.per_head % 16 == 0) | (plan.per_head == 1000))
    unrounded = prompt_budgets(llama_profile, HeteroCacheConfig(compression_ratio=0.3), 1000)
    assert torch.all(plan.per_head >= unrounded.per_head)
    with pytest.raises(ValueError, match="block_size"):
        prompt_budgets(llama_profile, cfg, 1000)


def test_local_heads_split_and_replicate():
    assert local_kv_heads(8, 1, 2) == (4, 5, 6, 7)
    assert local_kv_heads(2, 3, 4) == (1,)  # 4 ranks, 2 KV heads: ranks 2, 3 hold head 1
    with pytest.raises(ProfileError, match="tensor_parallel_size=3"):
        local_kv_heads(8, 0, 3)


def _two_layer_profile(clusters, layer0=("pivot", "satellite", "anchor", "satellite")):
    types = [list(layer0), ["anchor"] * 4]
    ratio_rows = [[None if t == "pivot" else 1.0 for t in row] for row in types]
    data = {
        "schema_version": 1,
        "model": {
            "name": "toy", "architecture": "LlamaForCausalLM", "num_layers": 2, "num_kv_heads": 4,
            "num_attention_heads": 8, "head_dim": 64, "config_hash": "sha256:0", "config": {},
        },
        "head_types": types,
        "clusters": clusters,
        "budget_ratios": ratio_rows,
        "calibration": {"topk": 4, "tau_stable": 0.5, "tau_sim": 0.5},
        "provenance": {"tool": "t", "tool_version": "0", "command": "", "created": ""},
    }
    return HeadProfile.from_json(data, source="toy.json")


def test_tp_slicing_maps_local_heads_to_global_ones():
    profile = _two_layer_profile([{"layer": 0, "pivot": 0, "satellites": [1, 3]}])
    plan = prompt_budgets(profile, HeteroCacheConfig(compression_ratio=0.5, window=0), 100)
    assert plan.global_heads == (0, 1, 2, 3) and plan.full[0].tolist() == [True, False, False, False]


def test_clusters_crossing_ranks_are_named_and_planned():
    profile = _two_layer_profile([{"layer": 0, "pivot": 0, "satellites": [1, 3]}])
    assert crossing_clusters(profile, 2) == ["layer 0 pivot 0 -> satellites [3]"]
    assert crossing_clusters(profile, 1) == []
    plan = prompt_budgets(profile, HeteroCacheConfig(compression_ratio=0.5, window=0), 100, tp_rank=1, tp_size=2)
    assert plan.global_heads == (2, 3) and plan.per_head.shape == (2, 2)


def test_short_prompts_keep_every_token(llama_profile):
    cfg = HeteroCacheConfig(compression_ratio=0.25, window=32, min_prompt_len=300)
    assert torch.all(prompt_budgets(llama_profile, cfg, 299).per_head == 299)
    assert prompt_budgets(llama_profile, cfg, 300).kept_fraction() < 0.3


@pytest.mark.parametrize("options", [{"compression_ratio": 0.6}, {"token_budget": 100}, {"compression_ratio": 0.6, "round_to_block": True}])
def test_pool_capacity_bounds_every_compressed_budget(options):
    from vllm_heterocache.head_profile.synthetic import synthetic_profile

    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 100, "architectures": ["LlamaForCausalLM"]}
    data = synthetic_profile(config, ["PSSA", "PSAV", "PSAA"]).to_json()
    ratios = iter([0.7, 1.3, 0.9, 1.9, 0.4, 1.1, 0.55, 1.15])  # uneven budget ratios of the compressed heads
    data["budget_ratios"] = [[None if r is None else next(ratios) for r in row] for row in data["budget_ratios"]]
    profile = HeadProfile.from_json(data)
    cfg = HeteroCacheConfig(window=8, min_prompt_len=64, **options)
    budgeter = Budgeter(profile, cfg, block_size=16)
    capacities, class_of = budgeter.capacity_classes(3)
    assert sorted(set(class_of.values())) == [0, 1, 2] and len(class_of) == 8
    for L in [0, 1, 7, 63, 64, 65, 100, 333, 1000, 4097]:
        plan = budgeter.budgets(L)
        for c, cap in enumerate(capacities):  # exactly the class's largest budget, never below
            members = [int(plan.per_head[l, h]) for (l, h), k in class_of.items() if k == c]
            assert cap.max_budget(L) == max(members)
    ratios = [profile.budget_ratios[l][h] for (l, h) in sorted(class_of, key=class_of.get)]
    assert ratios == sorted(ratios)  # classes are contiguous ranges of budget ratio


def test_vllm_groups_pools_of_caches_in_equal_groups_padding_the_last():
    from vllm_heterocache.budget import kv_cache_group_slots

    assert kv_cache_group_slots([35, 13, 14, 14, 14]) == (10, 130)  # groups of 13: 44% padding
    assert kv_cache_group_slots([35, 7, 21, 14, 13]) == (13, 91)  # groups of 7
    assert kv_cache_group_slots([50, 52, 51]) == (3, 156)  # within 1.5x: groups of the largest
    assert kv_cache_group_slots([8]) == (1, 8) and kv_cache_group_slots([1, 7, 0]) == (8, 8)


def test_classes_are_sized_for_vllms_groups():
    """SmolLM2's 35 full heads beside 55 compressed ones: 4 equal classes would pad 40 of 130
    cache slots; the classes chosen pad at most 2%, in contiguous ranges of budget ratio."""
    from vllm_heterocache.head_profile import load_profile

    profile = load_profile(ROOT / "profiles" / "SmolLM2-135M-Instruct.json")
    budgeter = Budgeter(profile, HeteroCacheConfig(compression_ratio=0.5), block_size=128)
    capacities, class_of = budgeter.capacity_classes(4)
    groups, slots, caches = budgeter.group_slots(capacities, class_of)
    assert caches == 90 and slots <= 1.02 * caches and len(capacities) <= 4
    by_class = [[profile.budget_ratios[l][h] for (l, h), c in class_of.items() if c == k] for k in range(len(capacities))]
    assert all(max(a) <= min(b) for a, b in zip(by_class, by_class[1:]))  # contiguous by ratio
