"""Policies (``vllm_heterocache.policies``): their roles of a profile's heads, the same budget rule for
all, what a request may ask for, and the scheduler's pool capacities against the budgeter."""


import pytest
import torch

from vllm_heterocache.budget import Budgeter, request_terms
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.errors import BudgetError, ConfigError
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.policies import POLICIES, PYRAMID_BETA, SINK_TOKENS, RequestChoice, RequestError, RequestRules


def _mean_ratio(roles):
    ratios = [r for row in roles.budget_ratios for r in row if r is not None]
    return sum(ratios) / len(ratios)


def test_roles(llama_profile):
    p = llama_profile
    total, profile_full = p.num_layers * p.num_kv_heads, p.num_full_heads()
    full = {name: policy.roles(p).num_full_heads() for name, policy in POLICIES.items()}
    assert full == {"full": total, "streamingllm": 0, "snapkv": 0, "pyramidkv": 0, "duo": profile_full,
                    "heterocache": profile_full}
    for name in ("streamingllm", "snapkv", "pyramidkv", "duo", "heterocache"):
        assert _mean_ratio(POLICIES[name].roles(p)) == pytest.approx(1.0), name  # the same total for a ratio
    assert POLICIES["heterocache"].roles(p) is p
    assert not any(POLICIES[n].roles(p).clusters for n in ("streamingllm", "snapkv", "pyramidkv", "duo"))
    pyramid = [row[0] for row in POLICIES["pyramidkv"].roles(p).budget_ratios]
    assert pyramid == sorted(pyramid, reverse=True)  # falling with depth
    assert pyramid[0] == pytest.approx(2 - 1 / PYRAMID_BETA) and pyramid[-1] == pytest.approx(1 / PYRAMID_BETA)


@pytest.mark.parametrize("policy", ["streamingllm", "snapkv", "pyramidkv"])
def test_every_head_compressed_keeps_the_ratio(llama_profile, policy):
    plan = Budgeter(llama_profile, HeteroCacheConfig(policy=policy, compression_ratio=0.1, window=8)).budgets(8192)
    assert not plan.full.any()
    assert plan.kept_fraction() == pytest.approx(0.1, abs=0.01)  # (floors: a budget never drops below the window)


def test_infeasible_budget_is_the_same_error_for_every_policy(llama_profile):
    for policy in ("duo", "heterocache"):
        with pytest.raises(BudgetError, match=f"infeasible for policy {policy}"):
            Budgeter(llama_profile, HeteroCacheConfig(policy=policy, compression_ratio=0.1))
    with pytest.raises(ConfigError, match="heterocache.policy='h2o' is not a policy: choose one of full, streamingllm"):
        HeteroCacheConfig(policy="h2o")


def test_recent_tokens_keep_sinks_and_the_most_recent():
    chosen = ref.recent_tokens(torch.tensor([10, 3, 50]), 50, SINK_TOKENS)
    assert chosen[0, :10].tolist() == [0, 1, 2, 3, 44, 45, 46, 47, 48, 49] and (chosen[0, 10:] == -1).all()
    assert chosen[1, :3].tolist() == [0, 1, 2] and (chosen[1, 3:] == -1).all()
    assert chosen[2].tolist() == list(range(50))


def test_what_requests_may_ask_for(llama_profile):
    p, floor = llama_profile, llama_profile.num_full_heads() / 256
    rules = RequestRules.of(p, "heterocache", 0.5, compresses=True)
    assert dict(rules.floors) == {"full": 0.0, "duo": pytest.approx(floor), "heterocache": pytest.approx(floor)}
    assert rules.parse(None) == RequestChoice("heterocache")
    assert rules.parse({"heterocache_policy": "full"}) == RequestChoice("full")
    assert rules.parse({"heterocache_policy": "duo", "heterocache_ratio": 0.3}) == RequestChoice("duo", 0.3)
    assert rules.parse({"heterocache_ratio": "0.9", "other": 1}) == RequestChoice("heterocache", 0.9)
    # an all-compressed server holds every policy but HeteroCache (drift tracking needs the
    # server's pivots, clusters and host tier); a server that keeps everything only full
    assert {n for n, _ in RequestRules.of(p, "snapkv", 0.5, compresses=True).floors} == set(POLICIES) - {"heterocache"}
    assert RequestRules.of(p, "heterocache", 1.0, compresses=False).floors == (("full", 0.0),)
    errors = {
        "heterocache_policy": [{"heterocache_policy": "snapkv"}, {"heterocache_policy": 3}],
        "heterocache_ratio": [{"heterocache_ratio": floor}, {"heterocache_ratio": 0}, {"heterocache_ratio": True},
                              {"heterocache_ratio": float("nan")}, {"heterocache_ratio": "x"},
                              {"heterocache_policy": "full", "heterocache_ratio": 0.5}],
        "heterocache_ratios": [{"heterocache_ratios": 0.5}],
    }
    for key, cases in errors.items():
        for args in cases:
            with pytest.raises(RequestError, match=f"vllm_xargs.{key}") as e:
                rules.parse(args)
            assert e.value.key == key
    # a policy infeasible at the server's ratio needs a ratio of its own
    snap = RequestRules.of(p, "snapkv", 0.1, compresses=True)
    with pytest.raises(RequestError, match="needs vllm_xargs.heterocache_ratio"):
        snap.parse({"heterocache_policy": "duo"})
    # the engine's reading of arguments the front end did not check: keep everything, and say why
    choice, error = rules.resolve({"heterocache_policy": "nope"})
    assert choice == RequestChoice("full") and "no such policy" in error


@pytest.mark.parametrize("server", ["heterocache", "snapkv", "duo"])
def test_pool_capacities_bound_every_request_budget(llama_profile, server):
    """The scheduler's capacity of each pool class for a request (``budget.request_terms``, from
    the class's spec) is the largest budget the worker's budgeter for the same terms gives that
    request's heads in the class."""
    config = HeteroCacheConfig(policy=server, compression_ratio=0.5, window=16, budget_classes=3)
    budgeter = Budgeter(llama_profile, config)
    server_terms = budgeter.server_terms()
    _, class_of = budgeter.capacity_classes(config.budget_classes)
    assert server_terms.rules == RequestRules.of(llama_profile, server, 0.5, compresses=True)
    for name, floor in server_terms.rules.floors:
        for ratio in (None, 1.0, round(floor + 0.05, 3), 0.9):
            if name == "full" and ratio not in (None, 1.0):
                continue
            args = {"heterocache_policy": name, **({} if ratio is None else {"heterocache_ratio": ratio})}
            terms = request_terms(server_terms, args, strict=True)
            assert terms == request_terms(server_terms, args)  # the engine reads them alike
            request = budgeter.for_choice(terms.choice)
            for L in (100, 700, 4096):
                budgets = request.budgets(L).every_head
                for c in range(len(server_terms.capacities)):
                    scheduler = request_terms(server_terms.of_class(c), args)  # as a pool's spec reads them
                    cap = scheduler.capacities[0].max_budget(L)
                    assert cap == terms.capacities[c].max_budget(L)
                    heads = [budgets[l, h] for (l, h), k in class_of.items() if k == c]
                    assert cap == max(heads), (name, ratio, L, c)
                    # where the request's tokens go (placement): the scheduler's blocks hold the
                    # worker's selections, with or without a prefix-cache hit
                    for hit in (0, (L - 16) // 64 * 64):
                        placement = scheduler.placement(0, L, 64, hit)
                        assert placement == terms.placement(c, L, 64, hit)
                        if placement.positional:  # every token in place: nothing selected, or a short own part
                            assert all(b == L for b in heads) or hit and L - hit <= cap, (name, ratio, L, c)
                        else:  # room for the copied part of the largest selection
                            assert placement.shared_len == hit
                            assert placement.selection_len == min(cap, L - hit), (name, ratio, L, c)
