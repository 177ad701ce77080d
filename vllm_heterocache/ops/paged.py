"""Paged KV caches in the CPU backend's layout: the one place that turns positions into addresses.

A KV cache (vLLM CPU_ATTN layout; HeteroCache keeps one per KV head, ``H = 1``)::

    kv_cache  [num_blocks, H, block_size, 2 * D]

whose last two dims hold, per (block, head), a K region then a V region of ``block_size * D``
elements each. Inside a region the kernels pick their own order, which depends on the ISA: the
AVX2 ``vec`` kernels store K transposed, ``[D, block_size]``, and V as ``[block_size, D]``.
A :class:`BlockLayout` holds that order as index maps: measured by writing a probe with vLLM's
own cache-write op (``vllm_adapter.block_layout``), or one of the two orders the compiled kernels
read (:meth:`BlockLayout.for_kernels`; the compressed pools keep K token-major, as V). Blocks may
be further apart than their size (vLLM pads the pages of layers whose pages do not divide the
largest one): every view honours the block stride.

A request's token at (pool) position ``p`` lives in block ``block_row[p // block_size]`` at
offset ``p % block_size``. Used by the PyTorch reference ops (``ops.kernels``), the PyTorch
paths of the runtime, and prefill selection.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Where token ``t``, dim ``d`` of K (V) sits in a block's K (V) region of ``bs * D`` elements.

    ``k_index[t * D + d]`` / ``v_index[t * D + d]``: int64 offsets into the region.
    """

    block_size: int
    head_size: int
    k_index: torch.Tensor
    v_index: torch.Tensor
    kernel_order: bool | None = field(init=False)
    """For the compiled kernels (csrc/gather_attention.h): True if K is ``[D, block_size]`` and V
    ``[block_size, D]``, False if both are ``[block_size, D]``, None if neither (no kernel)."""

    def __post_init__(self) -> None:
        token_major = _token_major(self.block_size, self.head_size)
        order = None
        if torch.equal(self.v_index, token_major):
            if torch.equal(self.k_index, token_major):
                order = False
            elif torch.equal(self.k_index, _transposed(self.block_size, self.head_size)):
                order = True
        object.__setattr__(self, "kernel_order", order)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def for_kernels(block_size: int, head_size: int, k_transposed: bool) -> BlockLayout:
        """The layout the compiled kernels read with ``k_transposed``."""
        k = _transposed(block_size, head_size) if k_transposed else _token_major(block_size, head_size)
        return BlockLayout(block_size, head_size, k, _token_major(block_size, head_size))


def _token_major(bs: int, d: int) -> torch.Tensor:
    return torch.arange(bs * d)


def _transposed(bs: int, d: int) -> torch.Tensor:
    return (torch.arange(d)[None, :] * bs + torch.arange(bs)[:, None]).reshape(-1)


def _flat(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as one flat view (block stride honoured)."""
    nb, h, bs, d2 = kv_cache.shape
    s0, s1, s2, s3 = kv_cache.stride()
    if (s1, s2, s3) != (bs * d2, d2, 1):
        raise ValueError(f"KV cache with unexpected strides {kv_cache.stride()} for shape {tuple(kv_cache.shape)}")
    return kv_cache.as_strided(((nb - 1) * s0 + h * bs * d2,), (1,))


def _offsets(kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor, positions: torch.Tensor,
             head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``[n, D]`` in :func:`_flat` of K and of V of ``head`` at ``positions``."""
    _, _, bs, d2 = kv_cache.shape
    d = d2 // 2
    blocks = block_row[positions // bs].long()
    inside = (positions % bs)[:, None] * d + torch.arange(d)
    region = blocks * kv_cache.stride(0) + head * bs * d2  # start of the (block, head) K region
    return region[:, None] + layout.k_index[inside], (region + bs * d)[:, None] + layout.v_index[inside]


def read_positions(kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor, positions: torch.Tensor,
                   head: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[n, D]`` (copies) of one head at int64 ``positions`` ``[n]`` of a request whose
    block ids are ``block_row``."""
    k_at, v_at = _offsets(kv_cache, layout, block_row, positions, head)
    flat = _flat(kv_cache)
    return flat[k_at], flat[v_at]


def write_positions(kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor, positions: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, head: int = 0) -> None:
    """Write K and V ``[n, D]`` of one head at ``positions`` (in place)."""
    k_at, v_at = _offsets(kv_cache, layout, block_row, positions, head)
    flat = _flat(kv_cache)
    flat[k_at] = k.to(flat.dtype)
    flat[v_at] = v.to(flat.dtype)


def write_slots(kv_cache: torch.Tensor, layout: BlockLayout, slots: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Write K and V ``[n, D]`` of the cache's one head at int64 ``slots`` ``[n]`` (``block *
    block_size + offset``, vLLM's slot mapping; a negative slot is skipped, as vLLM's write does)."""
    nb, h, bs, d2 = kv_cache.shape
    if h != 1:
        raise ValueError(f"write_slots writes single-head caches, got {h} heads")
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    if layout.kernel_order is False:  # token-major K and V: [bs, D] rows
        regions = _regions(kv_cache)  # [nb, 2, bs, D]
        blocks, offsets = slots // bs, slots % bs
        regions[blocks, 0, offsets] = k.to(kv_cache.dtype)
        regions[blocks, 1, offsets] = v.to(kv_cache.dtype)
        return
    write_positions(kv_cache, layout, torch.arange(nb), slots, k, v)  # (slot = position in block order)


def copy_blocks(src: torch.Tensor, src_layout: BlockLayout, blocks: torch.Tensor, dst: torch.Tensor,
                dst_layout: BlockLayout) -> None:
    """``dst[i] = src[blocks[i]]``, re-laid out from ``src_layout`` to ``dst_layout`` (single-head
    caches of one block size and head size; ``dst`` holds at least ``len(blocks)`` blocks)."""
    n = blocks.numel()
    bs, d = src_layout.block_size, src_layout.head_size
    got = _regions(src)[blocks.long()].view(n, 2, bs * d)  # [n, K|V, bs * D], src order
    out = _regions(dst)[:n].view(n, 2, bs * d)
    orders = ((src_layout.k_index, dst_layout.k_index), (src_layout.v_index, dst_layout.v_index))
    for which, (si, di) in enumerate(orders):  # region offsets of the same (token, dim) elements
        if torch.equal(si, di):
            out[:, which] = got[:, which]
        else:
            out[:, which, di] = got[:, which, si]


def _regions(kv_cache: torch.Tensor) -> torch.Tensor:
    """A single-head cache as ``[num_blocks, 2, block_size, D]`` (each block's K region, then its V
    region, read as token-major rows whatever their order; block stride honoured)."""
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    _flat(kv_cache)  # (checks the strides)
    return kv_cache.as_strided((nb, 2, bs, d), (kv_cache.stride(0), bs * d, d, 1))


def read_prefix(kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions ``0 .. length-1`` of every head: two ``[length, H, D]`` copies
    (reads whole blocks, cheaper than :func:`read_positions` for a prefix)."""
    return _read_region(kv_cache, layout, block_row, length, 0), _read_region(kv_cache, layout, block_row, length, 1)


def read_prefixes_k(kv_caches, layouts, block_rows, length: int) -> torch.Tensor:
    """K of positions ``0 .. length-1`` of several single-head caches (each with its layout and
    block row): head-major ``[n, length, D]``, each head's one copy (token-major K is gathered
    block by block straight into it: 0.19 instead of 0.45 ms for 2 heads of 3.3K tokens)."""
    first = kv_caches[0]
    bs, d = first.shape[2], first.shape[3] // 2
    nblk = -(-length // bs)
    out = torch.empty(len(kv_caches), nblk * bs, d, dtype=first.dtype, device=first.device)
    for i, (cache, layout, row) in enumerate(zip(kv_caches, layouts, block_rows)):
        nb, h = cache.shape[:2]
        if h == 1 and layout.kernel_order is False:  # [bs, D] rows, as out holds them
            torch.index_select(cache.view(nb, 2, bs * d)[:, 0], 0, row[:nblk].long(), out=out[i].view(nblk, bs * d))
        else:
            out[i, :length] = _read_region(cache, layout, row, length, 0)[:, 0]
    return out[:, :length]


def _read_region(kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor, length: int,
                 which: int) -> torch.Tensor:
    """K (``which`` 0) or V (1) of positions ``0 .. length-1``: ``[length, H, D]``. The orders the
    kernels read (K transposed or token-major, V token-major) are one strided copy; any other
    goes through the layout's index map."""
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    nblk = -(-length // bs)
    region = kv_cache.view(nb, h, 2, bs * d)[block_row[:nblk].long(), :, which]  # [nblk, H, bs*D]
    if which == 0 and layout.kernel_order is True:  # K transposed: [D, bs] per block
        x = region.view(nblk, h, d, bs).permute(0, 3, 1, 2)
    elif layout.kernel_order is not None:  # token-major: [bs, D] per block
        x = region.view(nblk, h, bs, d).permute(0, 2, 1, 3)
    else:
        x = region[..., layout.k_index if which == 0 else layout.v_index].view(nblk, h, bs, d).permute(0, 2, 1, 3)
    return x.reshape(nblk * bs, h, d)[:length]
