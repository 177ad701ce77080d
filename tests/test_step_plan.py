"""The step plan (runtime.step): which kernel runs which head, and the gather kernel's items."""

import pytest
import torch

from vllm_heterocache.placement import RowPlacement
from vllm_heterocache.runtime.requests import RequestState
from vllm_heterocache.runtime.step import Row, empty_plan, front_width, plan_step, work_template

FULL = torch.tensor([[True, False, False], [False, False, True]])  # 2 layers x 3 KV heads
POOL = torch.where(FULL, -1, 0)  # the compressed heads in one pool class
BS = 16  # block size: a 20- or 30-token prompt fills columns 0-1, its 9 selection slots row
# positions 32-40, its generated tokens from 41 on (a: token p at p + 21; b: at p + 11)


def state(key: str, prompt_len: int, selection_len: int = 9, store=POOL) -> RequestState:
    """``selection_len`` 0: a request whose policy keeps every token (its pool keeps them in
    place); ``store``: the pool of each head's cache."""
    kept = torch.tensor([[5, 7, 9], [4, 6, 8]]) if selection_len else prompt_len
    per_head = torch.where(FULL, prompt_len, kept)
    budgets = type("Budgets", (), {"prompt_len": prompt_len, "per_head": per_head, "full": FULL,
                                   "keeps_all": not selection_len})()
    placements = (RowPlacement(prompt_len, BS, selection_len),)
    template = work_template(budgets, store, placements)
    fronts = torch.full((2, 3, front_width(budgets)), -1, dtype=torch.int32) if bool((template[..., 7] >= 0).any()) else None
    return RequestState(key, budgets, template, placements=placements, fronts=fronts)


def test_a_step_of_single_decode_tokens_is_fused_when_the_kernels_read_the_layout():
    a, b = state("a", 20), state("b", 30)
    rows = (Row(0, 1, 25, 0, a), Row(1, 1, 31, 1, b))
    plan = plan_step(rows, FULL, kernels_read_layout=True, drift_interval=4, num_pools=1)
    assert plan.fused and not plan.prefill and plan.decoding == rows and not plan.ends_prompt
    # every head of every decoding token: compressed heads over their selection (from row position
    # 32) + generated tokens (after the selection's 9 slots), full heads over all
    assert plan.work[0].tolist() == [
        [0, 0, 0, 0, 0, 25, 0, -1], [0, 1, 0, 7, 41, 46, 32, -1], [0, 2, 0, 9, 41, 46, 32, -1],
        [1, 0, 1, 0, 0, 31, 0, -1], [1, 1, 1, 7, 41, 42, 32, -1], [1, 2, 1, 9, 41, 42, 32, -1],
    ]
    assert plan.work[1][:, 1].tolist() == [0, 1, 2, 0, 1, 2] and plan.work[1][0, 3:].tolist() == [4, 41, 46, 32, -1]
    # the compressed pool stores both generated tokens at their row positions
    moved = plan.moved[0]
    assert moved.tokens.tolist() == [0, 1] and moved.rows.tolist() == [0, 1] and moved.positions.tolist() == [45, 41]
    unfused = plan_step(rows, FULL, kernels_read_layout=False, drift_interval=4)  # full heads stay with vLLM's kernel
    assert not unfused.fused and unfused.work[0][:, 1].tolist() == [1, 2, 1, 2]


def test_a_step_with_a_prefilling_row_runs_vllms_kernel_and_gathers_only_compressed_heads():
    a, b = state("a", 20), state("b", 30)
    rows = (Row(0, 3, 23, 0, a), Row(3, 10, 30, 1, b))  # a: 3 generated tokens at once; b: ends its prompt
    plan = plan_step(rows, FULL, kernels_read_layout=True, drift_interval=4)
    assert plan.prefill and not plan.fused and plan.ends_prompt == (rows[1],) and plan.decoding == (rows[0],)
    # causal among a's tokens: token j sees positions up to 20 + j
    assert plan.work[0].tolist() == [
        [0, 1, 0, 7, 41, 42, 32, -1], [0, 2, 0, 9, 41, 42, 32, -1],
        [1, 1, 0, 7, 41, 43, 32, -1], [1, 2, 0, 9, 41, 43, 32, -1],
        [2, 1, 0, 7, 41, 44, 32, -1], [2, 2, 0, 9, 41, 44, 32, -1],
    ]
    assert plan.work[1][:, 1].tolist() == [0, 1, 0, 1, 0, 1]
    # vLLM's kernel runs compressed heads over the prefilling row only: b's 10 tokens, re-based
    sub = plan.prefilling
    assert sub.rows == (rows[1],) and sub.tokens == slice(3, 13) and sub.index.tolist() == [1]
    assert sub.query_start_loc.tolist() == [0, 10] and sub.seq_lens.tolist() == [30]
    assert (sub.num_tokens, sub.max_query_len, sub.max_seq_len) == (10, 10, 30)


def test_a_pool_that_keeps_a_request_whole_addresses_it_by_position():
    a = state("a", 20, selection_len=0)  # e.g. a request whose policy keeps every head full
    plan = plan_step((Row(0, 1, 25, 0, a),), FULL, kernels_read_layout=True, drift_interval=4, num_pools=1)
    assert plan.work[0].tolist() == [[0, 0, 0, 0, 0, 25, 0, -1], [0, 1, 0, 0, 0, 25, 0, -1], [0, 2, 0, 0, 0, 25, 0, -1]]
    assert plan.moved == (None,) and not plan.ends_prompt


def test_compressed_heads_in_a_full_cache_read_their_selection_in_place():
    """With tensor parallelism a compressed head may sit in a full pool's cache (``sharding``):
    its kept prompt tokens stay where they are and its front is a list of their positions."""
    a = state("a", 20, store=torch.tensor([[-1, -1, 0], [0, 0, -1]]))  # layer 0 head 1: compressed, full cache
    plan = plan_step((Row(0, 1, 25, 0, a),), FULL, kernels_read_layout=True, drift_interval=4, num_pools=1)
    assert plan.work[0].tolist() == [[0, 0, 0, 0, 0, 25, 0, -1], [0, 1, 0, 7, 20, 25, 0, 9],
                                     [0, 2, 0, 9, 41, 46, 32, -1]]
    assert plan.fronts == (plan.rows[0],)  # (RequestState.fronts of 9 slots per head: head 1's from 9)


def test_prefilling_rows_between_decoding_rows_take_their_tokens_by_index():
    a, b, c, d = state("a", 20), state("b", 30), state("c", 20), state("d", 40)
    rows = (Row(0, 4, 4, 0, a), Row(4, 1, 31, 1, b), Row(5, 6, 16, 2, c), Row(11, 1, 41, 3, d))
    sub = plan_step(rows, FULL, kernels_read_layout=True, drift_interval=4).prefilling
    assert sub.tokens.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10] and sub.index.tolist() == [0, 2]
    assert sub.query_start_loc.tolist() == [0, 4, 10] and sub.seq_lens.tolist() == [4, 16]
    # a step without decoding rows runs every row through vLLM's kernel: no subset
    assert plan_step(rows[:1], FULL, kernels_read_layout=True, drift_interval=4).prefilling is None


def test_templates_are_not_changed_by_a_step_and_dummy_steps_run_nothing_of_ours():
    a = state("a", 20)
    before = a.work_template.clone()
    plan_step((Row(0, 1, 21, 0, a),), FULL, kernels_read_layout=True, drift_interval=4)
    assert torch.equal(a.work_template, before)
    dummy = empty_plan(2)
    assert dummy.prefill and not dummy.fused and all(w.numel() == 0 for w in dummy.work)
    assert plan_step((), FULL, kernels_read_layout=True, drift_interval=4).prefill


def test_drift_phases_buffer_one_token_per_row_and_check_full_rings():
    a, b, c = state("a", 20), state("b", 30), state("c", 20)
    a.ring, a.buffered = 2, 3  # a's next query fills its ring (N = 4): a checks
    b.ring, b.buffered = 0, 1  # b's 3 tokens go to places 1, 2, 3: b checks after its third
    rows = (Row(0, 1, 25, 0, a), Row(1, 3, 40, 1, b), Row(4, 1, 22, 2, c))  # c: no ring, not tracked
    phases = plan_step(rows, FULL, kernels_read_layout=True, drift_interval=4).drift
    assert [p.tokens.tolist() for p in phases] == [[0, 1], [2], [3]]
    assert [p.slots.tolist() for p in phases] == [[2, 0], [0], [0]]
    assert [p.places.tolist() for p in phases] == [[3, 1], [2], [3]]
    assert [[(ch.row, ch.key_len) for ch in p.checks] for p in phases] == [[(rows[0], 25)], [], [(rows[1], 40)]]
    prefill_only = (Row(0, 5, 5, 0, a),)
    assert plan_step(prefill_only, FULL, kernels_read_layout=True, drift_interval=4).drift == ()


def test_query_rings_hand_out_lowest_slots_and_keep_contents_when_they_grow():
    from vllm_heterocache.runtime.rings import QueryRings

    rings = QueryRings([2, 0], interval=3)
    assert [rings.acquire(f"r{i}") for i in range(3)] == [0, 1, 2]
    layer0 = rings.of_layer(0, 4, 8)
    assert layer0.shape == (8, 2, 3, 4, 8) and rings.of_layer(1, 4, 8).shape == (8, 0, 3, 4, 8)
    layer0[2] = 5.0
    rings.release("r1")
    assert rings.acquire("r9") == 1 and len(rings) == 3
    for i in range(3, 9):  # slots 3..7, then the tensors double
        rings.acquire(f"r{i}")
    grown = rings.of_layer(0, 4, 8)
    assert grown.shape[0] == 16 and bool((grown[2] == 5.0).all()) and bool((grown[:2] == 0).all())
    with pytest.raises(RuntimeError, match="already holds"):
        rings.acquire("r9")
