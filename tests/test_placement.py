"""Where a compressed pool keeps a request's tokens (vllm_heterocache/placement.py): the
arithmetic that the scheduler's block manager and the workers both follow."""

import pytest

from vllm_heterocache.placement import RowPlacement

BS = 16


def test_prompt_then_selection_then_generated_tokens_block_aligned():
    p = RowPlacement.of(40, BS, max_budget=20, keeps_prompt=False)  # prompt columns 0-2, selection 3-4
    assert (p.prompt_blocks, p.selection_blocks, p.selection_start) == (3, 2, 48)
    # token 40 (offset 8 of token block 2) in column 5 at offset 8: one token block per column
    assert p.shift == 48 and p.row_position(40) == 88 and p.row_position(39) == 39
    assert p.row_position(48) // BS == 6 and p.row_position(48) % BS == 0
    assert list(p.released) == [0, 1, 2]  # every prompt column, once the prompt is processed


def test_a_block_aligned_prompt_keeps_no_gap_before_its_generated_tokens():
    p = RowPlacement.of(32, BS, max_budget=20, keeps_prompt=False)
    assert p.shift == 32 and p.row_position(32) == 64  # column 4: right after the selection (2-3)
    # the prefix cache hashes the prompt's blocks where they are and the generated ones after the selection
    assert p.token_block_columns(5) == [0, 1, 4, 5, 6]
    # a prompt that ends inside a block: its last block is split between prompt and generated tokens
    assert RowPlacement.of(40, BS, 20, False).token_block_columns(5) == [0, 1]


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40, 64, 100])
def test_blocks_grow_with_the_tokens_and_bring_the_selection_with_the_last_prompt_block(length):
    p = RowPlacement.of(length, BS, max_budget=max(1, length // 3), keeps_prompt=False)
    last_block = (length - 1) // BS * BS
    counts = [p.blocks_for(n) for n in range(1, length + 40)]
    assert counts == sorted(counts)  # the scheduler only ever appends blocks
    for n in range(1, length + 40):
        if n <= last_block:  # before the prompt's last block: as any pool
            assert p.blocks_for(n) == -(-n // BS)
        elif n <= length:  # the chunk with the prompt's last block brings the selection region
            assert p.blocks_for(n) == p.prompt_blocks + p.selection_blocks == p.peak_blocks
        else:  # every generated token has a column
            assert p.blocks_for(n) == p.row_position(n - 1) // BS + 1


def test_a_prefix_cache_hit_is_kept_and_only_the_rest_is_copied():
    p = RowPlacement.of(100, BS, max_budget=60, keeps_prompt=False, hit=64)
    # the hit's 4 blocks are shared and stay; at most 36 prompt tokens of the request's own are copied
    assert (p.shared_blocks, p.shared_len, p.selection_blocks) == (4, 64, 3)
    assert list(p.released) == [4, 5, 6]
    assert RowPlacement.of(100, BS, max_budget=20, keeps_prompt=False, hit=64).selection_blocks == 2
    # a hit that is not a whole number of blocks shares its whole blocks only
    assert RowPlacement.of(100, BS, max_budget=60, keeps_prompt=False, hit=70).shared_blocks == 4


def test_a_pool_that_keeps_every_prompt_token_is_a_full_pool_row():
    p = RowPlacement.of(40, BS, max_budget=40, keeps_prompt=True, hit=32)
    assert p.positional and p.shift == 0 and p.shared_blocks == 0 and not p.released
    assert [p.blocks_for(n) for n in (1, 40, 41, 49)] == [1, 3, 3, 4]
    assert p.row_position(45) == 45 and p.token_block_columns(3) == [0, 1, 2]
