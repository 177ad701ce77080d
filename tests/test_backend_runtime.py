"""Backend steps without the engine: a real paged cache (vLLM's own write op, scrambled block
tables, odd lengths) against the reference ops on dense tensors."""

import pytest
import torch

from backend_support import synthetic_profile, write_tokens
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.runtime.layer import Row, compressed_attention, select_after_prefill, track_drift
from vllm_heterocache.runtime.model import HeteroCacheRuntime
from vllm_heterocache.runtime.paged import LayerCache, read_bits
from vllm_heterocache.runtime.requests import RequestTable, StateLost

HQ, HKV, D, BS, NB = 6, 2, 64, 16, 16
CONFIG = {"model_type": "llama", "hidden_size": HQ * D, "num_hidden_layers": 1, "num_attention_heads": HQ,
          "num_key_value_heads": HKV, "head_dim": D, "vocab_size": 100, "architectures": ["LlamaForCausalLM"]}


@pytest.fixture(scope="module")
def isa():
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, BS, D)


def make(isa, pattern="PS", ratio=0.75, window=4, interval=3, length=53, seed=0):
    """Runtime + a request of ``length`` prompt tokens in scrambled blocks + its prompt queries."""
    from vllm_heterocache.vllm_adapter.layout import probe_layout

    g = torch.Generator().manual_seed(seed)
    profile = synthetic_profile(CONFIG, [pattern])
    cfg = HeteroCacheConfig(compression_ratio=ratio, window=window, drift_interval=interval, pool_kernel=3,
                            min_prompt_len=0)
    rt = HeteroCacheRuntime(profile, cfg, tp_rank=0, tp_size=1, block_size=BS, max_requests=4)
    kv = torch.zeros(NB, HKV, BS, 2 * D)
    cache = LayerCache(kv, probe_layout(isa, torch.float32, BS, D), torch.zeros(NB, HKV, BS, dtype=torch.bool))
    block_row = torch.randperm(NB, generator=g)[: (length + 40) // BS + 1].int()  # scrambled order
    k, v = torch.randn(length, HKV, D, generator=g), torch.randn(length, HKV, D, generator=g)
    write_tokens(kv, isa, block_row, 0, k, v)
    q = torch.randn(length, HQ, D, generator=g) * 2
    state = rt.requests.begin(int(block_row[0]))
    state.plan = rt.planner.plan(length)
    return rt, cache, block_row, k, v, q, state


def prefill(rt, cache, block_row, q, state):
    row = Row(0, q.shape[0], q.shape[0], block_row, True, state, 0)
    select_after_prefill(rt, 0, rt.layers[0], row, q, cache)


def test_prefill_selection_matches_reference(isa):
    rt, cache, block_row, k, v, q, state = make(isa, pattern="PS")
    prefill(rt, cache, block_row, q, state)
    plan, L = state.plan, 53
    scores = ref.prefill_scores(q[-4:], k, 3)
    cut = L - plan.window
    want = ref.select_tokens(scores[[1]], plan.budgets[0, [1]], plan.window)[0]
    bits = read_bits(cache.bits, block_row, L)
    assert torch.equal(torch.nonzero(bits[1, :cut]).flatten(), want[(want >= 0) & (want < cut)])
    assert int(plan.budgets[0, 1]) < L  # really compressed
    ref_topk = ref.topk_positions(scores[[0]], torch.tensor([plan.reference_topk]), torch.tensor([cut]))
    assert torch.equal(state.references[0], ref_topk)


@pytest.mark.parametrize("pattern", ["PS", "AV", "SP"], ids=["pivot-satellite", "anchor-volatile", "satellite-pivot"])
def test_decode_attention_equals_masked_dense_attention(isa, pattern):
    rt, cache, block_row, k, v, q, state = make(isa, pattern=pattern, length=37)
    prefill(rt, cache, block_row, q, state)
    g = torch.Generator().manual_seed(5)
    kn, vn, qn = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g), torch.randn(3, HQ, D, generator=g)
    write_tokens(cache.kv, isa, block_row, 37, kn, vn)
    kk, vv = torch.cat([k, kn]), torch.cat([v, vn])
    out = torch.full((3, HQ, D), 7.0)
    row = Row(0, 3, 40, block_row, False, state, 0)  # 3 tokens after the prompt at once (recompute)
    compressed_attention(rt.layers[0], row, qn, cache, 0.125, out)
    heads = rt.layers[0]
    kept = read_bits(cache.bits, block_row, 40) | (torch.arange(40) >= 37 - state.plan.window)
    for j in range(3):
        visible = 38 + j
        idx = torch.full((1, HKV, visible), -1)
        for h in range(HKV):
            pos = torch.nonzero(kept[h, :visible]).flatten()
            idx[0, h, : pos.numel()] = pos
        want = ref.subset_attention(qn[j : j + 1], kk[None, :visible], vv[None, :visible], idx, scale=0.125)[0]
        for h in range(HKV):
            cols = slice(h * 3, (h + 1) * 3)
            if h in heads.compressed:
                torch.testing.assert_close(out[j, cols], want[cols], rtol=1e-4, atol=1e-5)
            else:
                assert torch.all(out[j, cols] == 7.0)  # full heads keep the base backend's output


def test_drift_refills_satellite_with_pivot_top_tokens(isa):
    rt, cache, block_row, k, v, q, state = make(isa, pattern="PS", ratio=0.6, interval=3, length=61)
    prefill(rt, cache, block_row, q, state)
    plan = state.plan
    cut, K = 61 - plan.window, plan.reference_topk
    g = torch.Generator().manual_seed(9)
    qs = torch.randn(3, HQ, D, generator=g) * 3
    ks, vs = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g)
    keys = torch.cat([k, ks])[:, 0][None]  # pivot head 0: [1, 64, D]

    def reference_check(reference):
        return ref.drift_check(qs[:, :3][None], keys, torch.tensor([64]), torch.tensor([cut]), reference,
                               torch.tensor([K]), rt.threshold, 3)

    # make the pivot's reference the K positions it now attends to least: a certain drift
    latest = reference_check(state.references[0]).latest_scores[0, :cut]
    state.references[0] = torch.sort(latest, stable=True).indices[:K].sort().values[None]
    result = reference_check(state.references[0])
    assert bool(result.drift[0])
    before = read_bits(cache.bits, block_row, 61)[1].clone()
    for step in range(3):
        write_tokens(cache.kv, isa, block_row, 61 + step, ks[step : step + 1], vs[step : step + 1])
        row = Row(0, 1, 62 + step, block_row, False, state, step)
        track_drift(rt, 0, rt.layers[0], row, qs[step : step + 1], cache)
    assert rt.counters.drift_checks == 1 and rt.counters.drifts == 1
    want = ref.refill_indices(result.latest_scores, torch.tensor([int(plan.budgets[0, 1]) - plan.window]), torch.tensor([cut]))[0]
    after = read_bits(cache.bits, block_row, 61)[1]
    assert torch.equal(torch.nonzero(after[:cut]).flatten(), want[want >= 0])
    assert not torch.equal(after, before)
    assert torch.equal(state.references[0][0], result.latest_topk[0])


def test_request_table_lifecycle():
    table = RequestTable(capacity=2)
    a = table.begin(5)
    assert table.get(5) is a
    assert table.begin(5) is not a  # a new request on the same first block starts afresh
    table.begin(6)
    table.forget_reused(torch.tensor([[9, 5, 0]]), torch.tensor([2]))  # block 5 reused inside a table
    with pytest.raises(StateLost):
        table.get(5)
    table.begin(7)
    table.begin(8)  # capacity 2: the least recently used (6) goes
    with pytest.raises(StateLost, match="first KV block is 6"):
        table.get(6)
    assert len(table) == 2
