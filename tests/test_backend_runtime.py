"""Backend steps without the engine: real paged pools (vLLM's own write op, scrambled block
tables, odd lengths), a real host tier, against the reference ops on dense tensors."""

import pytest
import torch

from backend_support import write_tokens
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.ops import kernels
from vllm_heterocache.ops.paged import read_positions, read_prefix, write_positions
from vllm_heterocache.runtime.host import HostTier
from vllm_heterocache.runtime.layer import (
    LayerCaches,
    LayerStep,
    attend,
    gather_decode,
    keep_window_queries,
    mirror_to_host,
    select_and_compact,
    track_drift,
)
from vllm_heterocache.head_profile.synthetic import synthetic_profile
from vllm_heterocache.runtime.core import HeteroCacheRuntime
from vllm_heterocache.sharding import FULL_POOL

HQ, HKV, D, BS, NB = 6, 2, 64, 16, 48
CONFIG = {"model_type": "llama", "hidden_size": HQ * D, "num_hidden_layers": 1, "num_attention_heads": HQ,
          "num_key_value_heads": HKV, "head_dim": D, "vocab_size": 100, "architectures": ["LlamaForCausalLM"]}


@pytest.fixture(scope="module")
def isa():
    from vllm_heterocache.vllm_adapter.compat import attn_isa

    return attn_isa(torch.float32, BS, D)


class Setup:
    """A runtime, one request of ``length`` prompt tokens written into both pools (and the host
    tier) through the backend's own steps, and the dense K/V/Q it came from."""

    def __init__(self, isa, pattern="PS", ratio=0.75, window=4, interval=3, length=53, seed=0, hit=0,
                 shared_prefixes="point"):
        from vllm_heterocache.vllm_adapter.block_layout import compressed_pool_layout, probe_layout

        g = torch.Generator().manual_seed(seed)
        cfg = HeteroCacheConfig(compression_ratio=ratio, window=window, drift_interval=interval, pool_kernel=3,
                                min_prompt_len=0, shared_prefixes=shared_prefixes)
        self.rt = rt = HeteroCacheRuntime(synthetic_profile(CONFIG, [pattern]), cfg, tp_rank=0, tp_size=1,
                                          block_size=BS)
        self.heads = heads = rt.layers[0]
        vllm_layout = probe_layout(isa, torch.float32, BS, D)  # each pool's layout, as the adapter's
        layouts = {p: vllm_layout if p == FULL_POOL else compressed_pool_layout(vllm_layout, shared_prefixes == "point")
                   for p in set(heads.store)}
        for p, layout in layouts.items():
            rt.attach_layout(p, layout)
        self.isa, self.vllm_layout = isa, vllm_layout
        perm = torch.randperm(NB, generator=g)  # scrambled block order, one table per pool kind
        n = 2 * ((length + 40) // BS + 1)  # the prompt, the selection region and generated tokens
        tables = {-1: perm[:n].int()[None], 0: perm[n : 2 * n].int()[None]}
        self.caches = LayerCaches(
            tuple(torch.zeros(NB, 1, BS, 2 * D) for _ in range(HKV)),
            tuple(tables[min(p, 0)] for p in heads.pool),
            tuple(layouts[p] for p in heads.store),
        )
        if rt.num_host_rows:
            rt.attach_host_tier(HostTier(rows=rt.num_host_rows, head_size=D, dtype=torch.float32, block_size=8,
                                         num_blocks=32))
        self.k, self.v = torch.randn(length, HKV, D, generator=g), torch.randn(length, HKV, D, generator=g)
        self.q = torch.randn(length, HQ, D, generator=g) * 2
        self.length, self.hit = length, hit  # hit: prompt tokens from the prefix cache (whole blocks)
        self.prefill_step = self.step(length - hit, length)
        (self.prefill_row,) = self.prefill_step.plan.rows
        self.state = self.prefill_row.state
        self.write(0, self.k, self.v)
        mirror_to_host(self.prefill_step, self.k[hit:], self.v[hit:])  # the step's tokens

    def step(self, q_len, seq_len) -> LayerStep:
        """Layer 0 in a step of one row: request r0's tokens up to position ``seq_len - 1``."""
        plan = self.rt.begin_step(["r0"], [self.length], [0, q_len], [seq_len])
        return LayerStep(self.rt.parts, 0, self.heads, self.caches, plan, 0.125)

    def placement(self, head):
        """Where head ``head`` keeps request r0's tokens (``placement``; None: the full pool)."""
        pool = self.heads.pool[head]
        return None if pool < 0 else self.state.placements[pool]

    def slots(self, head, n):
        """Row positions where selection slots ``0 .. n - 1`` of compressed head ``head`` are read:
        its selection region, or after a prefix-cache hit the positions its fronts point at."""
        if self.placement(head).shared_blocks:
            return self.state.fronts[0, head, :n].long()
        return torch.arange(n) + self.placement(head).selection_start

    def write(self, start, k, v):
        """K/V of tokens ``start ..`` into every head's cache, where the head keeps them."""
        for j in range(HKV):
            placement = self.placement(j) if hasattr(self, "state") else None
            at = start if placement is None else placement.row_position(start)
            cache, table, layout = self.caches.per_head[j], self.caches.tables[j][0], self.caches.layouts[j]
            if layout is self.vllm_layout:
                write_tokens(cache, self.isa, table, at, k[:, j : j + 1], v[:, j : j + 1])
            else:  # a compressed pool's own layout, written as the adapter does
                write_positions(cache, layout, table, torch.arange(at, at + k.shape[0]), k[:, j], v[:, j])

    def append(self, n, seed):
        """K, V and queries of ``n`` generated tokens after the prompt, K/V written to the pools."""
        g = torch.Generator().manual_seed(seed)
        kn, vn, qn = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g), torch.randn(n, HQ, D, generator=g)
        self.write(self.length, kn, vn)
        return kn, vn, qn

    def prefill(self, from_cache=False):
        """Select and compact, with the prompt's K/V from the step (the whole prompt is in it),
        or, as after a chunked prefill or a prefix-cache hit, read back from the caches."""
        if self.hit:  # the row holds the tokens after the hit
            n = self.length - self.hit
            select_and_compact(self.prefill_step, self.prefill_row, self.q[-n:], self.k[-n:], self.v[-n:])
        elif from_cache:  # the same row as the last chunk of a prompt that started earlier
            row = self.prefill_row
            row = type(row)(row.start, row.q_len - 1, row.seq_len, row.index, row.state)
            select_and_compact(self.prefill_step, row, self.q[1:], self.k[1:], self.v[1:])
        else:
            select_and_compact(self.prefill_step, self.prefill_row, self.q, self.k, self.v)


@pytest.mark.parametrize("from_cache", [False, True], ids=["prompt-in-step", "prompt-chunked"])
def test_prefill_selection_is_compacted_in_position_order(isa, from_cache):
    s = Setup(isa, pattern="PS")
    s.prefill(from_cache)
    budgets, L = s.state.budgets, s.length
    scores = ref.prefill_scores(s.q[-4:], s.k, 3)
    want = ref.select_tokens(scores[[1]], budgets.per_head[0, [1]], budgets.window)[0]
    want = want[want >= 0]
    assert 4 <= want.numel() < L  # really compressed, window included
    k, v = s.caches.read(1, 0, s.slots(1, want.numel()))  # in the selection region, after the prompt
    assert s.slots(1, 1)[0] >= L
    assert torch.equal(k, s.k[want, 1]) and torch.equal(v, s.v[want, 1])
    ref_topk = ref.topk_positions(scores[[0]], torch.tensor([budgets.reference_topk]), torch.tensor([L - budgets.window]))
    assert torch.equal(s.state.references[0], ref_topk)


@pytest.mark.parametrize("cut", [2, 3, 1], ids=["half", "one-kept", "three-kept"])
def test_a_chunk_boundary_inside_the_window_selects_as_one_chunk(isa, cut):
    """Chunked prefill that splits the observation window (vLLM's token budget ends a chunk inside
    it) selects exactly what the whole prompt in one step selects: the earlier chunk's window
    queries are kept for the scoring at the prompt's end."""
    whole = Setup(isa, pattern="PS")
    whole.prefill()
    split = Setup(isa, pattern="PS")
    L = split.length
    boundary = L - cut  # the window (4) straddles it
    first = split.step(boundary, boundary)  # (admits r0 afresh: its first row starts at 0)
    (row,) = first.plan.rows
    state = row.state
    assert first.plan.continues_prompt == (row,) and not first.plan.ends_prompt
    keep_window_queries(first, row, split.q[:boundary])
    last = split.step(cut, L)
    (row,) = last.plan.ends_prompt
    assert row.state is state
    select_and_compact(last, row, split.q[boundary:], split.k[boundary:], split.v[boundary:])
    assert torch.equal(state.kept[0], whole.state.kept[0])
    assert torch.equal(state.references[0], whole.state.references[0])
    assert not state.window_queries  # used up


def masked_dense(s, q, kk, vv, positions):
    """Dense attention of query rows ``q`` [n, HQ, D] at ``positions``: compressed heads over
    their kept prompt tokens and the generated tokens up to each position, full heads over all."""
    out = []
    for j, p in enumerate(positions):
        idx = torch.full((1, HKV, p + 1), -1)
        for h in range(HKV):
            if h in s.heads.compressed:
                kept = s.state.kept[0][s.heads.compressed.index(h)]
                pos = torch.cat([kept[kept >= 0], torch.arange(s.length, p + 1)])
            else:
                pos = torch.arange(p + 1)
            idx[0, h, : pos.numel()] = pos
        out.append(ref.subset_attention(q[j : j + 1], kk[None, : p + 1], vv[None, : p + 1], idx, scale=0.125)[0])
    return torch.stack(out)


@pytest.mark.parametrize("hit", [0, 16], ids=["own-prompt", "prefix-cache-hit"])
@pytest.mark.parametrize("pattern", ["PS", "AV", "SP", "AA"],
                         ids=["pivot-satellite", "anchor-volatile", "satellite-pivot", "no-full-pool"])
def test_decode_of_several_tokens_equals_masked_dense_attention(isa, pattern, hit):
    """A decoding row of 3 tokens (vLLM recomputing a preempted request's generated tokens):
    the plan's work items cover the compressed heads, causal among the row's tokens; full heads
    are left to vLLM's kernel. After a prefix-cache hit the selection points into the hit's
    blocks for its positions there."""
    s = Setup(isa, pattern=pattern, length=37, hit=hit)
    s.prefill()
    kn, vn, qn = s.append(3, seed=5)
    step = s.step(3, 40)
    assert not step.plan.prefill and not step.plan.fused
    out = torch.full((3, HQ, D), 7.0)
    gather_decode(step, qn, out)
    want = masked_dense(s, qn, torch.cat([s.k, kn]), torch.cat([s.v, vn]), [37, 38, 39])
    for h in range(HKV):
        cols = slice(h * 3, (h + 1) * 3)
        if h in s.heads.compressed:
            torch.testing.assert_close(out[:, cols], want[:, cols], rtol=1e-4, atol=1e-5)
        else:
            assert torch.all(out[:, cols] == 7.0)  # full heads keep the base kernel's output


@pytest.mark.parametrize("hit", [0, 32], ids=["own-prompt", "prefix-cache-hit"])
@pytest.mark.parametrize("pattern", ["PS", "AA"])
def test_fused_decode_step_runs_every_head_in_one_call(isa, pattern, hit):
    """A step of one decode token per row with the compiled kernels: the plan is fused, and one
    gather call per layer gives every head's output (full heads over every position)."""
    s = Setup(isa, pattern=pattern, length=45, hit=hit)
    s.prefill()
    kn, vn, qn = s.append(1, seed=6)
    step = s.step(1, 46)
    if not all(kernels.compiled(layout) for layout in s.caches.layouts):
        assert not step.plan.fused  # the reference runs compressed heads; vLLM's kernel full heads
        pytest.skip("compiled kernels not built: decode steps are not fused")
    assert step.plan.fused and step.plan.work[0].shape[0] == HKV
    out = torch.full((1, HQ, D), 7.0)
    gather_decode(step, qn, out)
    want = masked_dense(s, qn, torch.cat([s.k, kn]), torch.cat([s.v, vn]), [45])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def tokens_to_a_drift(s):
    """K, V and queries ``[3, H, D]`` of three decode steps of request r0 (a "PS" setup of 61
    prompt tokens, drift interval 3) whose pivot (head 0) is certain to drift at the third: its
    reference is made the K positions it now attends to least. Returns the drift check's
    reference result and the tokens' queries, K and V."""
    rt, budgets = s.rt, s.state.budgets
    cut, K = 61 - budgets.window, budgets.reference_topk
    g = torch.Generator().manual_seed(9)
    qs = torch.randn(3, HQ, D, generator=g) * 3
    ks, vs = torch.randn(3, HKV, D, generator=g), torch.randn(3, HKV, D, generator=g)
    keys = torch.cat([s.k, ks])[:, 0][None]  # pivot head 0: [1, 64, D]

    def reference_check(reference):
        return ref.drift_check(qs[:, :3][None], keys, torch.tensor([64]), torch.tensor([cut]), reference,
                               torch.tensor([K]), rt.threshold, 3)

    latest = reference_check(s.state.references[0]).latest_scores[0, :cut]
    s.state.references[0] = torch.sort(latest, stable=True).indices[:K].sort().values[None]
    result = reference_check(s.state.references[0])
    assert bool(result.drift[0])
    return result, qs, ks, vs


def decode_to_a_drift(s):
    """Run the three decode steps of :func:`tokens_to_a_drift`; returns its result, K and V."""
    result, qs, ks, vs = tokens_to_a_drift(s)
    for step in range(3):
        s.write(61 + step, ks[step : step + 1], vs[step : step + 1])
        track_drift(s.step(1, 62 + step), qs[step : step + 1])
    return result, ks, vs


def test_steps_planned_before_earlier_steps_run_each_execute_their_own_plan(isa):
    """vLLM's async scheduling plans (and builds the metadata of) step n + 1 before step n runs.
    Three decode steps planned before any runs, then run in order, give what planning and running
    each in turn gives: the outputs, the queries' places in the ring, the drift check at the
    third step and its refill. (The layers take the plan from their step's metadata.)"""

    def run(plan_ahead: bool):
        s = Setup(isa, pattern="PS", ratio=0.6, interval=3, length=61)
        s.prefill()
        _, qs, ks, vs = tokens_to_a_drift(s)
        outs = []
        steps = [s.step(1, 62 + n) for n in range(3)] if plan_ahead else []
        for n in range(3):
            step = steps[n] if plan_ahead else s.step(1, 62 + n)
            s.write(61 + n, ks[n : n + 1], vs[n : n + 1])
            out = torch.zeros(1, HQ, D)
            attend(step, qs[n : n + 1], ks[n : n + 1], vs[n : n + 1], out, stock=lambda h, prefilling: None)
            outs.append(out)
        s.rt.refills.wait("r0", 0)
        return s, torch.cat(outs)

    (ahead, out_ahead), (in_turn, out_in_turn) = run(True), run(False)
    assert ahead.rt.counters.drift_checks == in_turn.rt.counters.drift_checks == 1
    assert ahead.rt.counters.drifts == in_turn.rt.counters.drifts == 1
    assert torch.equal(out_ahead, out_in_turn)
    assert torch.equal(ahead.state.kept[0], in_turn.state.kept[0])
    assert torch.equal(ahead.state.references[0], in_turn.state.references[0])
    assert ahead.state.buffered == in_turn.state.buffered == 0


@pytest.mark.parametrize("hit, shared_prefixes", [(0, "point"), (32, "point"), (32, "copy")],
                         ids=["own-prompt", "prefix-cache-hit", "prefix-cache-hit-copied"])
def test_drift_refills_satellite_slots_from_the_host_tier(isa, hit, shared_prefixes):
    s = Setup(isa, pattern="PS", ratio=0.6, interval=3, length=61, hit=hit, shared_prefixes=shared_prefixes)
    s.prefill()
    rt, budgets = s.rt, s.state.budgets
    cut = 61 - budgets.window
    before = set(s.state.kept[0][0].tolist())  # (the copy may be done as soon as the drift is found)
    result, _, _ = decode_to_a_drift(s)
    assert rt.counters.drift_checks == 1 and rt.counters.drifts == 1 and rt.counters.refilled_heads == 1
    rt.refills.wait("r0", 0)
    count = int(budgets.per_head[0, 1]) - budgets.window
    want = ref.refill_indices(result.latest_scores, torch.tensor([count]), torch.tensor([cut]))[0]
    want = want[want >= 0]
    assert want.numel() == count
    held = s.state.kept[0][0, :count]
    assert sorted(held.tolist()) == want.tolist()  # the new selection, each position in one slot
    k, v = s.caches.read(1, 0, s.slots(1, count))
    assert torch.equal(k, s.k[held, 1]) and torch.equal(v, s.v[held, 1])  # the satellite's true K/V
    window = torch.arange(cut, 61)  # the window slots are untouched
    k, _ = s.caches.read(1, 0, s.slots(1, count + budgets.window)[count:])
    assert torch.equal(k, s.k[window, 1])
    assert torch.equal(s.state.references[0][0], result.latest_topk[0])
    moved = set(want.tolist()) - before  # only positions the satellite did not hold are copied,
    copied = [p for p in moved if p >= s.placement(1).shared_len]  # none of a hit's that it points at
    assert moved and rt.host.stats.bytes_out == 2 * len(copied) * D * 4


def test_a_failed_refill_copy_degrades_its_request_and_the_step_goes_on(isa, caplog):
    """The host tier loses the request's blocks before its refill copy runs: the step that
    reads the satellite gets the failure, logs and counts it, and serves the request on from
    the slots the satellite holds, without refills."""
    s = Setup(isa, pattern="PS", ratio=0.6, interval=3, length=61)
    s.prefill()
    rt = s.rt
    count = int(s.state.budgets.per_head[0, 1]) - s.state.budgets.window
    kept, slots = s.state.kept[0].clone(), s.caches.read(1, 0, s.slots(1, count))
    rt.host.free("r0")
    _, ks, vs = decode_to_a_drift(s)
    assert rt.counters.drifts == 1 and rt.counters.refilled_heads == 1
    g = torch.Generator().manual_seed(5)
    kn, vn, qn = torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g), torch.randn(1, HQ, D, generator=g)
    s.write(64, kn, vn)
    step = s.step(1, 65)
    out = torch.zeros(1, HQ, D)
    with caplog.at_level("WARNING", logger="vllm.heterocache"):
        attend(step, qn, kn, vn, out, stock=lambda h, prefilling: None)  # full heads: not checked here
    assert rt.counters.refill_failures == 1 and not s.state.host and len(rt.refills) == 0
    assert "refill copy of request r0 failed (KeyError" in caplog.text
    assert torch.equal(s.state.kept[0], kept)  # the selection it holds, as it was
    assert all(torch.equal(a, b) for a, b in zip(s.caches.read(1, 0, s.slots(1, count)), slots))
    want = masked_dense(s, qn, torch.cat([s.k, ks, kn]), torch.cat([s.v, vs, vn]), [64])
    satellite = slice(3, 6)  # the query heads of KV head 1
    torch.testing.assert_close(out[:, satellite], want[:, satellite], rtol=1e-5, atol=1e-6)


def test_finish_frees_state_and_host_blocks(isa):
    s = Setup(isa, pattern="PS", length=61)
    rt = s.rt
    assert rt.host.used_blocks == 8 and len(rt.requests) == 1  # 61 tokens in 8-token host blocks
    rt.finish(["r0"])
    assert rt.host.used_blocks == 0 and len(rt.requests) == 0
    rt.finish(["r0", "unknown"])  # idempotent, unknown ids ignored


def test_pool_views_honour_padded_block_strides(isa):
    """vLLM pads the pages of layers whose page does not divide the largest (a strided view)."""
    from vllm_heterocache.vllm_adapter.block_layout import probe_layout

    layout = probe_layout(isa, torch.float32, BS, D)
    page = HKV * BS * 2 * D
    padded = torch.zeros(NB, page + 96).as_strided((NB, HKV, BS, 2 * D), (page + 96, BS * 2 * D, 2 * D, 1))
    dense = torch.zeros(NB, HKV, BS, 2 * D)
    g = torch.Generator().manual_seed(3)
    table = torch.randperm(NB, generator=g)[:4].int()
    k, v = torch.randn(50, HKV, D, generator=g), torch.randn(50, HKV, D, generator=g)
    for kv in (padded, dense):
        write_tokens(kv, isa, table, 0, k, v)
    pos = torch.tensor([0, 7, 16, 33, 49])
    for head in range(HKV):
        got = read_positions(padded, layout, table, pos, head)
        assert torch.equal(got[0], k[pos, head]) and torch.equal(got[1], v[pos, head])
        write_positions(padded, layout, table, torch.arange(5), got[0], got[1], head)
        write_positions(dense, layout, table, torch.arange(5), got[0], got[1], head)
    assert torch.equal(read_prefix(padded, layout, table, 50)[0], read_prefix(dense, layout, table, 50)[0])


@pytest.mark.parametrize("counts", [[5, 9], [9, 14], [0, 60]], ids=["within-top-k", "beyond-top-k", "all"])
def test_each_satellite_selection_is_a_prefix_of_the_pivots_ranking(counts):
    """A refill's selections come from one ranking of the pivot's positions (taken among its
    top-K when they are enough; a cluster across ranks sends it): the first ``c`` of it, sorted,
    are exactly ``ref.refill_indices`` with count ``c``."""
    from vllm_heterocache.runtime.layer import _ranked

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    cut, k = 50, 10
    top = ref.topk_positions(scores[None], torch.tensor([k]), torch.tensor([cut]))[0]
    ranked = _ranked(scores, top, max(counts), cut)
    assert ranked.numel() == min(max(counts), cut)
    assert torch.equal(ranked, torch.sort(-scores[:cut], stable=True).indices[: ranked.numel()])  # the definition
    for c in counts:
        want = ref.refill_indices(scores[None], torch.tensor([c]), torch.tensor([cut]))[0]
        assert torch.equal(ranked[:c].sort().values, want[want >= 0])
        # one count for every satellite: the same positions, unranked (ascending)
        assert torch.equal(_ranked(scores, top, c, cut, ordered=False), want[want >= 0])


@pytest.mark.parametrize("order", ["k-transposed", "token-major", "other"])
def test_reading_a_prompt_back_equals_reading_its_positions(order):
    """read_prefix's copies of the kernels' orders and its index-map path for any other order."""
    from vllm_heterocache.ops.paged import BlockLayout

    bs, d = 16, 8
    g = torch.Generator().manual_seed(1)
    if order == "other":  # a layout no kernel reads: both regions scrambled
        layout = BlockLayout(bs, d, torch.randperm(bs * d, generator=g), torch.randperm(bs * d, generator=g))
        assert layout.kernel_order is None
    else:
        layout = BlockLayout.for_kernels(bs, d, order == "k-transposed")
    cache = torch.randn(12, 2, bs, 2 * d, generator=g)
    table = torch.randperm(12, generator=g)[:5].int()
    k, v = read_prefix(cache, layout, table, 70)
    for head in range(2):
        want_k, want_v = read_positions(cache, layout, table, torch.arange(70), head)
        assert torch.equal(k[:, head], want_k) and torch.equal(v[:, head], want_v)


def test_reading_several_heads_prompts_back_head_major():
    """read_prefixes_k (prompt-end scoring's keys): single-head caches of every order, one with
    padded block strides, read into one head-major tensor equal to reading their positions."""
    from vllm_heterocache.ops.paged import BlockLayout, read_prefixes_k

    bs, d, nb, length = 16, 8, 12, 70
    g = torch.Generator().manual_seed(2)
    page = bs * 2 * d
    padded = torch.randn(nb, page + 40, generator=g).as_strided((nb, 1, bs, 2 * d), (page + 40, page, 2 * d, 1))
    caches = [torch.randn(nb, 1, bs, 2 * d, generator=g), padded, torch.randn(nb, 1, bs, 2 * d, generator=g)]
    layouts = [BlockLayout.for_kernels(bs, d, True), BlockLayout.for_kernels(bs, d, False),
               BlockLayout(bs, d, torch.randperm(bs * d, generator=g), torch.randperm(bs * d, generator=g))]
    rows = [torch.randperm(nb, generator=g)[:5].int() for _ in caches]
    got = read_prefixes_k(caches, layouts, rows, length)
    assert got.shape == (3, length, d)
    for i, (cache, layout, row) in enumerate(zip(caches, layouts, rows)):
        assert torch.equal(got[i], read_positions(cache, layout, row, torch.arange(length))[0])


@pytest.mark.parametrize("order", ["k-transposed", "token-major", "other"])
def test_slot_writes_and_block_copies_between_layouts(order):
    """write_slots (the compressed pools' cache write: vLLM's slot mapping, negative slots skipped)
    writes what write_positions does; copy_blocks into another layout (the staging for vLLM's
    kernel) keeps every position's K and V."""
    from vllm_heterocache.ops.paged import BlockLayout, copy_blocks, write_slots

    bs, d, nb = 16, 8, 12
    g = torch.Generator().manual_seed(2)
    if order == "other":
        layout = BlockLayout(bs, d, torch.randperm(bs * d, generator=g), torch.randperm(bs * d, generator=g))
    else:
        layout = BlockLayout.for_kernels(bs, d, order == "k-transposed")
    slots = torch.tensor([3, 17, -1, 40, 191, 100])
    k, v = torch.randn(6, d, generator=g), torch.randn(6, d, generator=g)
    by_slot, by_position = torch.zeros(nb, 1, bs, 2 * d), torch.zeros(nb, 1, bs, 2 * d)
    write_slots(by_slot, layout, slots, k, v)
    kept = slots >= 0
    write_positions(by_position, layout, torch.arange(nb).int(), slots[kept], k[kept], v[kept])
    assert torch.equal(by_slot, by_position)
    src = torch.randn(nb, 1, bs, 2 * d, generator=g)
    blocks = torch.tensor([7, 2, 11, 5])
    for dst_layout in (BlockLayout.for_kernels(bs, d, True), BlockLayout.for_kernels(bs, d, False), layout):
        dst = torch.zeros(6, 1, bs, 2 * d)
        copy_blocks(src, layout, blocks, dst, dst_layout)
        everything = torch.arange(4 * bs)
        want = read_positions(src, layout, blocks.int(), everything)
        got = read_positions(dst, dst_layout, torch.arange(4).int(), everything)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
