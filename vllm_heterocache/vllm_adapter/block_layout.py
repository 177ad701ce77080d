"""The caches' in-block KV layouts (see ops.paged): vLLM's CPU kernels', measured with vLLM's own
cache-write op, and the compressed pools' own."""

from __future__ import annotations

import functools

import torch

from vllm_heterocache.ops import kernels
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


def compressed_pool_layout(vllm_layout: BlockLayout, reads_in_place: bool) -> BlockLayout:
    """The layout of a compressed pool's caches: K token-major (``[block_size, D]``, as V) when
    its heads may read selections in place and the compiled kernels read vLLM's layout (they
    stage blocks between the two); else vLLM's.

    ``reads_in_place``: prefix caching is on and selections point into a hit's shared prompt
    blocks (``HeteroCacheConfig.shared_prefixes`` ``point``, ``placement``). Such a selection is
    a few scattered positions of the prompt, read every step, and vLLM's AVX2 layout stores K
    transposed, where one position's K touches a cache line per head dimension. Token-major, a
    position's K is its own rows, and the gather kernel reads only the listed positions (5.1x
    faster in float32, 3.5x in bf16, for a seventh of 32K positions,
    ``benchmarks/bench_kernels.py``). The price: a selection copied into a request's own blocks
    (every request without a hit) scores its keys from rows, which costs more compute than from
    K transposed; it shows where the selections stay in the CPU's caches (a single request at
    32K: attention 1.64 against 1.20 ms a step, README "Prefix caching"), not where decoding
    streams from memory. Without in-place reads every selection is copied, and vLLM's layout is
    the faster one.

    vLLM's CPU kernel reads its own layout only: the adapter writes token-major caches itself
    (``ops.kernels.write_slots``) and stages a prefill's rows into vLLM's layout for it
    (``backend``). The full pool keeps vLLM's layout (its heads read every position).
    """
    if not (kernels.compiled(vllm_layout) and reads_in_place):
        return vllm_layout
    return BlockLayout.for_kernels(vllm_layout.block_size, vllm_layout.head_size, k_transposed=False)
