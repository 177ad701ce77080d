"""Measure the CPU kernels' in-block KV layout with vLLM's own cache-write op (see ops.paged)."""

from __future__ import annotations

import functools

import torch

from vllm_heterocache.ops.paged import BlockLayout
from vllm_heterocache.vllm_adapter import compat


@functools.lru_cache(maxsize=None)
def probe_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> BlockLayout:
    """Write ids through vLLM's cache-write op and read where they landed.

    Ids are written in three passes (token, dim % 128, dim // 128) so each value stays an integer
    that bf16 and fp16 represent exactly.
    """
    bs, d = block_size, head_size
    tok = torch.arange(bs)[:, None].expand(bs, d)
    dim = torch.arange(d)[None, :].expand(bs, d)
    found = []
    for values in (tok, dim % 128, dim // 128):
        cache = torch.full((1, 1, bs, 2 * d), -1.0, dtype=dtype)
        x = values.to(dtype)[:, None, :]  # [bs tokens, 1 head, D]
        compat.write_kv(x, x, cache, torch.arange(bs, dtype=torch.int64), isa)
        found.append(cache.view(2, bs * d).float().round().long())  # [K|V region, offset]
    t, dlo, dhi = found
    ident = t * d + dlo + 128 * dhi  # token-major id stored at each offset
    maps = []
    for region in range(2):
        index = torch.empty(bs * d, dtype=torch.int64)
        index[ident[region]] = torch.arange(bs * d)
        if not torch.equal(torch.sort(ident[region]).values, torch.arange(bs * d)):
            raise RuntimeError(f"heterocache: cannot read the {isa} KV cache layout ({dtype}, block {bs}, head {d})")
        maps.append(index)
    return BlockLayout(bs, d, maps[0], maps[1])
