"""Where a compressed pool keeps a request's tokens (vllm_heterocache/placement.py): the
arithmetic that the scheduler's block manager and the workers both follow."""

import pytest

from vllm_heterocache.placement import RowPlacement

BS = 16


def test_prompt_then_the_selection_and_the_generated_tokens_packed_after_it():
    p = RowPlacement.of(40, BS, max_budget=20, keeps_prompt=False)  # prompt columns 0-2
    assert (p.prompt_blocks, p.selection_len, p.selection_start) == (3, 20, 48)
    # selection slots at row positions 48-67, generated tokens from 68 on
    assert p.shift == 28 and p.row_position(40) == 68 and p.row_position(39) == 39
    assert list(p.released) == [0, 1, 2]  # every prompt column, once the prompt is processed
    assert p.peak_blocks == 3 + 2  # the step of the prompt's last chunk: prompt and selection


def test_only_the_prompts_whole_blocks_are_hashed():
    assert RowPlacement.of(32, BS, 20, False).token_block_columns(5) == [0, 1]
    assert RowPlacement.of(40, BS, 20, False).token_block_columns(5) == [0, 1]
    assert RowPlacement.of(40, BS, 40, True).token_block_columns(4) == [0, 1, 2, 3]  # positional: as any pool


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40, 64, 100])
def test_blocks_grow_with_the_tokens_and_bring_the_selection_with_the_last_prompt_block(length):
    p = RowPlacement.of(length, BS, max_budget=max(1, length // 3), keeps_prompt=False)
    last_block = (length - 1) // BS * BS
    counts = [p.blocks_for(n) for n in range(1, length + 40)]
    assert counts == sorted(counts)  # the scheduler only ever appends blocks
    for n in range(1, length + 40):
        if n <= last_block:  # before the prompt's last block: as any pool
            assert p.blocks_for(n) == -(-n // BS)
        elif n <= length:  # the chunk with the prompt's last block brings the selection's blocks
            assert p.blocks_for(n) == p.peak_blocks
        else:  # every generated token has a slot, right after the selection
            assert p.blocks_for(n) == p.row_position(n - 1) // BS + 1 >= p.peak_blocks


def test_a_prefix_cache_hit_is_kept_and_only_the_rest_is_copied():
    p = RowPlacement.of(100, BS, max_budget=30, keeps_prompt=False, hit=64)
    # the hit's 4 blocks are shared and stay; at most 30 of the 36 prompt tokens of its own are copied
    assert (p.shared_blocks, p.shared_len, p.selection_len) == (4, 64, 30)
    assert list(p.released) == [4, 5, 6]
    assert RowPlacement.of(100, BS, max_budget=20, keeps_prompt=False, hit=64).selection_len == 20
    # a hit that is not a whole number of blocks shares its whole blocks only
    assert RowPlacement.of(100, BS, max_budget=30, keeps_prompt=False, hit=70).shared_blocks == 4


def test_a_hit_whose_own_part_fits_the_selection_keeps_everything_in_place():
    """Copying 36 own tokens into 36 slots would hold as much and copy for nothing: the row is a
    full pool's (the heads point at what they select), nothing is released, nothing moves."""
    p = RowPlacement.of(100, BS, max_budget=40, keeps_prompt=False, hit=64)
    assert p.positional and p.shift == 0 and not p.released and p.blocks_for(120) == 8


def test_a_pool_that_keeps_every_prompt_token_is_a_full_pool_row():
    p = RowPlacement.of(40, BS, max_budget=40, keeps_prompt=True, hit=32)
    assert p.positional and p.shift == 0 and p.shared_blocks == 0 and not p.released
    assert [p.blocks_for(n) for n in (1, 40, 41, 49)] == [1, 3, 3, 4]
    assert p.row_position(45) == 45


def test_a_server_that_copies_shared_prefixes_copies_the_hit_too():
    from vllm_heterocache.budget import Budgeter
    from vllm_heterocache.config import HeteroCacheConfig
    from vllm_heterocache.errors import ConfigError
    from vllm_heterocache.head_profile import load_profile

    from conftest import ROOT

    profile = load_profile(ROOT / "profiles" / "SmolLM2-135M-Instruct.json")
    for mode, shared in (("point", 16), ("copy", 0)):
        budgeter = Budgeter(profile, HeteroCacheConfig(compression_ratio=0.5, shared_prefixes=mode), block_size=128)
        capacities, _ = budgeter.pools()
        placement = capacities[0].placement(4096, 128, hit=1024)
        assert capacities[0].max_budget(4096) < 3072  # the own part does not fit the selection: not in place
        assert placement.shared_blocks == shared // 2 and placement.selection_len == min(
            capacities[0].max_budget(4096), 4096 - shared // 2 * 128)
    with pytest.raises(ConfigError, match="heterocache.shared_prefixes='share': choose 'point' or 'copy'"):
        HeteroCacheConfig(shared_prefixes="share")


@pytest.mark.parametrize("max_len", [1, 127, 128, 129, 2048, 8064])
def test_every_placement_fits_the_widest_row(max_len):
    """vLLM sizes block-table rows once (``CompressedPoolSpec.max_num_blocks_per_req``), while a
    request's own policy or ratio may select up to its whole prompt: no placement of any prompt
    up to ``max_len`` ever needs more columns than ``max_row_blocks``."""
    bs = 128
    widest = RowPlacement.max_row_blocks(max_len, bs)
    for L in sorted({1, max_len // 3, max_len - 1, max_len} - {0}):
        for hit in sorted({0, L // 2 // bs * bs, (L - 1) // bs * bs}):
            for budget in sorted({1, L // 4, L - 1, L} - {0}):
                placement = RowPlacement.of(L, bs, budget, keeps_prompt=False, hit=hit)
                assert max(placement.blocks_for(n) for n in range(1, max_len + 1)) <= widest, (L, hit, budget)
