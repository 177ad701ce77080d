"""The reference ops against brute-force restatements of their definitions."""

import pytest
import torch
import torch.nn.functional as F

from vllm_heterocache.ops import reference as ref


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pool_scores_edges_do_not_count_padding():
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0, 6.0]])
    pooled = ref.pool_scores(x, 3)
    assert pooled.tolist() == [[1.5, 1.0, 0.0, 2.0, 3.0]]
    assert torch.equal(ref.pool_scores(x, 1), x)


def _brute_force_scores(q: torch.Tensor, k: torch.Tensor, pool_kernel: int) -> torch.Tensor:
    """prefill_scores by its definition: one causal softmax per (query head, window query)."""
    (w, hq, d), (L, hkv, _) = q.shape, k.shape
    want = torch.empty(hkv, L)
    for kv in range(hkv):
        per_head = []
        for qh in range(kv * (hq // hkv), (kv + 1) * (hq // hkv)):
            rows = []
            for i in range(w):
                pos = L - w + i
                logits = (k[: pos + 1, kv] @ q[i, qh]) / d**0.5
                rows.append(F.pad(logits.softmax(-1), (0, L - pos - 1)))
            per_head.append(ref.pool_scores(torch.stack(rows).mean(0, keepdim=True), pool_kernel)[0])
        want[kv] = torch.stack(per_head).amax(0)
    return want


@pytest.mark.parametrize("w, hq, hkv", [(1, 4, 4), (4, 9, 3), (7, 8, 1)], ids=["mha-last-query", "gqa3-window4", "mqa-window7"])
def test_prefill_scores_brute_force(w, hq, hkv):
    g = _gen(1)
    L, d = 37, 16
    q, k = torch.randn(w, hq, d, generator=g), torch.randn(L, hkv, d, generator=g)
    torch.testing.assert_close(ref.prefill_scores(q, k, pool_kernel=3), _brute_force_scores(q, k, 3))


@pytest.mark.parametrize("length", [600, 516], ids=["window-in-the-last-chunk", "window-across-two-chunks"])
def test_prefill_scores_over_several_chunks(monkeypatch, length):
    """A prompt longer than one chunk of keys: the chunks' softmaxes, rescaled to each row's
    maximum and sum, are the row's softmax (the causal window may straddle two chunks)."""
    w, hq, hkv, d = 7, 8, 2, 16
    monkeypatch.setattr(ref, "SCORE_WHOLE_BYTES", 0)
    monkeypatch.setattr(ref, "SCORE_CHUNK_BYTES", 4 * hq * w * 256)  # chunks of 256 keys
    g = _gen(2)
    q, k = torch.randn(w, hq, d, generator=g), 3 * torch.randn(length, hkv, d, generator=g)
    torch.testing.assert_close(ref.prefill_scores(q, k, pool_kernel=5), _brute_force_scores(q, k, 5))


def test_topk_ties_go_to_lower_positions():
    scores = torch.tensor([[1.0, 5.0, 5.0, 5.0, 0.0]])
    out = ref.topk_positions(scores, torch.tensor([2]), torch.tensor([5]))
    assert out.tolist() == [[1, 2]]


def test_select_tokens_keeps_window_order_and_budget():
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.7, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    ])
    out = ref.select_tokens(scores, torch.tensor([4, 2, 8]), window=2)
    assert out.tolist() == [
        [0, 2, 6, 7, -1, -1, -1, -1],  # top-2 of the first 6, then the window, ascending
        [6, 7, -1, -1, -1, -1, -1, -1],  # budget == window: the window only
        [0, 1, 2, 3, 4, 5, 6, 7],  # budget == L: everything
    ]


def test_select_tokens_window_larger_than_budget_or_prompt():
    scores = torch.rand(2, 3, generator=_gen())
    out = ref.select_tokens(scores, torch.tensor([3, 3]), window=10)
    assert out.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_overlap_coefficient_with_padding():
    a = torch.tensor([[1, 2, 3, -1], [5, 6, -1, -1], [-1, -1, -1, -1]])
    b = torch.tensor([[2, 3, 9, 10], [7, 8, 9, -1], [-1, -1, -1, -1]])
    torch.testing.assert_close(ref.overlap_coefficient(a, b), torch.tensor([2 / 3, 0.0, 1.0]))


def _pivot_case(seed, p=3, n=5, g=3, d=16, t=40):
    gen = _gen(seed)
    keys = torch.randn(p, t, d, generator=gen)
    queries = torch.randn(p, n, g, d, generator=gen) * 3
    return queries, keys


def test_drift_check_decisions_follow_the_overlap():
    queries, keys = _pivot_case(0)
    queries[0] = queries[0, :1]  # pivot 0 attends the same way at every buffered step
    p, t = keys.shape[0], keys.shape[1]
    key_lens = torch.tensor([t, t - 3, t - 7])
    cand = key_lens - 4
    k = torch.tensor([6, 6, 4])
    # the reference set of pivot 0 is its own current top-K: no drift; pivot 1 gets a disjoint
    # reference: drift; pivot 2 an empty reference (nothing to compare: overlap 1, no drift)
    first = ref.drift_check(queries, keys, key_lens, cand, torch.full((p, 6), -1), k, 0.5)
    reference = torch.full((p, 6), -1)
    reference[0, :6] = first.latest_topk[0, :6]
    cur1 = first.latest_topk[1][first.latest_topk[1] >= 0]
    others = torch.tensor([i for i in range(int(cand[1])) if i not in set(cur1.tolist())])[:6]
    reference[1, :6] = others
    res = ref.drift_check(queries, keys, key_lens, cand, reference, k, 0.5)
    assert res.drift.tolist() == [False, True, False]
    assert torch.all(res.latest_topk[res.latest_topk >= 0] < cand.max())
    for i in range(p):
        chosen = res.latest_topk[i][res.latest_topk[i] >= 0]
        assert chosen.numel() == int(k[i]) and torch.all(chosen < cand[i])
        assert torch.all(chosen[1:] > chosen[:-1])
    # median overlap is a per-pivot median over the N steps
    assert res.median_overlap[0] >= 0.5 > res.median_overlap[1]


def test_drift_check_scores_are_softmax_over_valid_keys():
    queries, keys = _pivot_case(3, p=1, n=1, g=1, d=8, t=12)
    res = ref.drift_check(queries, keys, torch.tensor([9]), torch.tensor([9]), torch.full((1, 3), -1), torch.tensor([3]), 0.5, pool_kernel=1)
    probs = ((keys[0, :9] @ queries[0, 0, 0]) / 8**0.5).softmax(-1)
    torch.testing.assert_close(res.latest_scores[0, :9], probs)
    assert torch.all(res.latest_scores[0, 9:] == 0)


def test_refill_indices_are_the_pivots_top_positions():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.5, 0.99], [0.1, 0.9, 0.3, 0.8, 0.5, 0.99]])
    out = ref.refill_indices(scores, torch.tensor([2, 3]), torch.tensor([5, 6]))
    assert out.tolist() == [[1, 3, -1], [1, 3, 5]]


def test_refill_slots_move_only_the_positions_a_satellite_lacks():
    held = torch.tensor([[2, 5, 7, 9], [4, 6, -1, 11], [1, 2, 20, 21]])
    chosen = torch.tensor([[5, 6, 9, 12], [3, 4, 6, 8], [2, 3, -1, -1]])
    counts = torch.tensor([4, 4, 2])  # slots from counts[s] on (the window) are never rewritten
    moves = ref.refill_slots(held, chosen, counts)
    assert moves.tolist() == [[6, -1, 12, -1], [-1, -1, 3, 8], [3, -1, -1, -1]]


def test_refill_slots_leave_every_chosen_position_in_one_slot():
    """Oracle on random cases: after the moves the refillable slots hold exactly the chosen set
    (plus old positions in slots left over when fewer are chosen), the rest is untouched, and
    only positions not held before are moved."""
    g = _gen(3)
    for _ in range(50):
        s, w, span = 3, 12, 40
        counts = torch.randint(0, w + 1, (s,), generator=g)
        held = torch.stack([torch.randperm(span, generator=g)[:w] for _ in range(s)])
        chosen = torch.full((s, w), -1)
        for i in range(s):
            n = int(torch.randint(0, int(counts[i]) + 1, (1,), generator=g))
            chosen[i, :n] = torch.randperm(span, generator=g)[:n].sort().values
        moves = ref.refill_slots(held, chosen, counts)
        after = torch.where(moves >= 0, moves, held)
        for i in range(s):
            c, want = int(counts[i]), set(chosen[i][chosen[i] >= 0].tolist())
            slots = after[i, :c].tolist()
            assert len(set(slots)) == c and want <= set(slots)
            assert set(slots) - want <= set(held[i, :c].tolist())
            assert torch.equal(after[i, c:], held[i, c:])
            assert set(moves[i][moves[i] >= 0].tolist()) == want - set(held[i, :c].tolist())


def _dense(q, k, v, mask):
    """Standard attention with a boolean mask, through torch's SDPA."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    kk = k.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    m = mask.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
    return F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=m)[:, :, 0]


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
def test_subset_attention_equals_masked_dense_attention(hq, hkv):
    g = _gen(7)
    b, t, d = 3, 21, 32
    q = torch.randn(b, hq, d, generator=g)
    k, v = torch.randn(b, t, hkv, d, generator=g), torch.randn(b, t, hkv, d, generator=g)
    mask = torch.rand(b, hkv, t, generator=g) < 0.4
    mask[..., 0] = True  # no empty head in this case
    s = int(mask.sum(-1).max())
    idx = torch.full((b, hkv, s), -1)
    for i in range(b):
        for h in range(hkv):
            pos = torch.nonzero(mask[i, h]).flatten()
            idx[i, h, : pos.numel()] = pos[torch.randperm(pos.numel(), generator=g)]  # order must not matter
    torch.testing.assert_close(ref.subset_attention(q, k, v, idx), _dense(q, k, v, mask))
    full = torch.arange(t).expand(b, hkv, t)
    torch.testing.assert_close(ref.subset_attention(q, k, v, full), _dense(q, k, v, torch.ones(b, hkv, t, dtype=torch.bool)))


def test_subset_attention_empty_and_single_token_heads():
    g = _gen(8)
    q, k, v = torch.randn(1, 2, 8, generator=g), torch.randn(1, 5, 2, 8, generator=g), torch.randn(1, 5, 2, 8, generator=g)
    idx = torch.tensor([[[3, -1], [-1, -1]]])
    out = ref.subset_attention(q, k, v, idx)
    torch.testing.assert_close(out[0, 0], v[0, 3, 0])
    assert torch.all(out[0, 1] == 0)
