"""Views of a paged KV cache in the CPU backend's layout, and the per-token selection bits.

KV cache of one layer (vLLM CPU_ATTN layout)::

    kv_cache  [num_blocks, H_kv, block_size, 2 * D]      K in [..., :D], V in [..., D:]

A request's token at position ``p`` lives in block ``block_row[p // block_size]`` at offset
``p % block_size``. HeteroCache adds, per layer, one byte per (block, KV head, offset)::

    kept_bits [num_blocks, H_kv, block_size]  bool

which says whether a compressed head keeps that prompt token (1/(2*D*dtype bytes) of the KV cache
size). Only positions below ``prompt_len - window`` are read from it: the window and generated
tokens are always kept, and full heads keep everything, so bits left in a reused block by an
earlier request are never read before the new request's selection rewrites them. The bits live
and die with vLLM's blocks: no per-request allocation, nothing to free.
"""

from __future__ import annotations

import torch


def token_slots(block_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat slot index ``block * block_size + offset`` of positions ``0 .. length-1`` (int64)."""
    pos = torch.arange(length)
    return block_row[pos // block_size].long() * block_size + pos % block_size


def gather_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions ``0 .. length-1``: two ``[length, H_kv, D]`` tensors (copies)."""
    nb, hkv, bs, d2 = kv_cache.shape
    nblk = (length + bs - 1) // bs
    blocks = kv_cache[block_row[:nblk].long()]  # [nblk, H, bs, 2D]
    flat = blocks.permute(0, 2, 1, 3).reshape(nblk * bs, hkv, d2)[:length]
    d = d2 // 2
    return flat[..., :d], flat[..., d:]


def read_bits(bits: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """Selection bits of positions ``0 .. length-1`` as ``[H_kv, length]`` bool."""
    nb, hkv, bs = bits.shape
    nblk = (length + bs - 1) // bs
    return bits[block_row[:nblk].long()].permute(1, 0, 2).reshape(hkv, nblk * bs)[:, :length]


def write_bits(
    bits: torch.Tensor, block_row: torch.Tensor, head: int, length: int, keep: torch.Tensor
) -> None:
    """Set head ``head``'s bits of positions ``0 .. length-1``: 1 at positions in ``keep`` (int64,
    ascending, ``-1`` padding ignored), 0 elsewhere."""
    nb, hkv, bs = bits.shape
    slots = token_slots(block_row, length, bs)
    blocks, offsets = slots // bs, slots % bs
    bits[blocks, head, offsets] = False
    keep = keep[(keep >= 0) & (keep < length)]
    bits[blocks[keep], head, offsets[keep]] = True
