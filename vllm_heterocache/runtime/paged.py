"""Views of one paged KV pool in the CPU backend's layout: gather and scatter by position.

A KV pool of one layer (vLLM CPU_ATTN layout)::

    kv_cache  [num_blocks, H_pool, block_size, 2 * D]

whose last two dims hold, per (block, head), a K region then a V region of ``block_size * D``
elements each. Inside a region the CPU kernels pick their own order, which depends on the ISA
(e.g. the AVX2 ``vec`` kernels store K transposed, ``[D, block_size]``, and V as
``[block_size, D]``). A :class:`BlockLayout` holds that order as index maps, measured by writing
a probe with vLLM's own cache-write op (``vllm_adapter.layout``), so these views never guess.

A request's token at (pool) position ``p`` lives in block ``block_row[p // block_size]`` at
offset ``p % block_size``. In the full pool positions are token positions; in the compressed pool
the first positions of a request hold its compacted selection (``runtime.layer``).
"""

from __future__ import annotations

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
        bs, d = self.block_size, self.head_size
        token_major = torch.arange(bs * d)
        transposed = (torch.arange(d)[None, :] * bs + torch.arange(bs)[:, None]).reshape(-1)
        order = None
        if torch.equal(self.v_index, token_major):
            order = False if torch.equal(self.k_index, token_major) else True if torch.equal(self.k_index, transposed) else None
        object.__setattr__(self, "kernel_order", order)


def gather_kv(
    kv_cache: torch.Tensor, layout: BlockLayout, block_row: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions ``0 .. length-1``: two ``[length, H, D]`` tensors (copies)."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    nblk = (length + bs - 1) // bs
    regions = kv_cache.view(nb, hkv, 2, bs * d)[block_row[:nblk].long()]  # [nblk, H, 2, bs*D]
    h = hkv

    def tokens(region: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x = region[..., index].view(nblk, h, bs, d)  # token-major inside each block
        return x.permute(0, 2, 1, 3).reshape(nblk * bs, h, d)[:length]

    return tokens(regions[:, :, 0], layout.k_index), tokens(regions[:, :, 1], layout.v_index)


@dataclass(frozen=True)
class LayerCache:
    """One paged KV cache (the backend keeps one per KV head) with its layout."""

    kv: torch.Tensor  # [num_blocks, H, block_size, 2 * D]
    layout: BlockLayout

    @property
    def num_kv_heads(self) -> int:
        return self.kv.shape[1]

    def gather(self, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return gather_kv(self.kv, self.layout, block_row, length)

    def gather_positions(self, block_row: torch.Tensor, head: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one KV head at the given positions: two ``[n, D]`` tensors (copies).

        Reads only those tokens (one flat gather), unlike :meth:`gather`, which reads a prefix.
        """
        k_at, v_at = self._flat_index(block_row, head, positions)
        flat = self._flat()
        return flat[k_at], flat[v_at]

    def scatter_positions(
        self, block_row: torch.Tensor, head: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write ``[n, D]`` K and V of one KV head to the given positions (in place)."""
        k_at, v_at = self._flat_index(block_row, head, positions)
        flat = self._flat()
        flat[k_at] = k.to(flat.dtype)
        flat[v_at] = v.to(flat.dtype)

    def _flat(self) -> torch.Tensor:
        """The pool as one flat view. Blocks may be further apart than their size (vLLM pads the
        pages of layers whose pages do not divide the largest one), so stride 0 is honoured."""
        nb, hkv, bs, d2 = self.kv.shape
        s0, s1, s2, s3 = self.kv.stride()
        if (s1, s2, s3) != (bs * d2, d2, 1):
            raise ValueError(f"KV pool with unexpected strides {self.kv.stride()} for shape {tuple(self.kv.shape)}")
        return self.kv.as_strided(((nb - 1) * s0 + hkv * bs * d2,), (1,))

    def _flat_index(self, block_row: torch.Tensor, head: int, positions: torch.Tensor):
        """Offsets ``[n, D]`` in :meth:`_flat` of K and of V of ``head`` at ``positions``."""
        nb, hkv, bs, d2 = self.kv.shape
        d = d2 // 2
        blocks = block_row[positions // bs].long()
        offsets = (positions % bs) * d
        region = blocks * self.kv.stride(0) + head * 2 * (bs * d)  # start of the (block, head) K region
        dims = torch.arange(d)
        k_at = region[:, None] + self.layout.k_index[offsets[:, None] + dims]
        v_at = (region + bs * d)[:, None] + self.layout.v_index[offsets[:, None] + dims]
        return k_at, v_at
