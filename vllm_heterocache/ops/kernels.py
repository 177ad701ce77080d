"""The compiled kernels (``vllm_heterocache._C``, sources in ``csrc/``) and their fallbacks.

``torch.ops.heterocache.{gather_attention, drift_check, refill_copy, stage_blocks,
window_scores, write_slots}`` when the extension is built (``setup.py``) and the cache layout is
one they read, else :func:`gather_attention_reference` / :func:`drift_check_reference` /
:func:`refill_copy_reference` / :func:`~vllm_heterocache.ops.paged.copy_blocks` /
:func:`~vllm_heterocache.ops.reference.prefill_scores` /
:func:`~vllm_heterocache.ops.paged.write_slots`, the same contracts in PyTorch over any
:class:`~vllm_heterocache.ops.paged.BlockLayout`. The functions below are the one place
that chooses; :func:`describe` is the startup line that says which runs.
"""

from __future__ import annotations

import torch

from vllm_heterocache.ops import paged
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.ops.paged import BlockLayout, copy_blocks, read_positions, write_positions

try:
    from vllm_heterocache import _C  # noqa: F401  (registers torch.ops.heterocache.*)

    HAVE_KERNELS = True
    _WHY = ""
except ImportError as e:  # not built (no torch at build time, HETEROCACHE_NO_KERNELS=1, not x86-64)
    HAVE_KERNELS = False
    _WHY = str(e)

if HAVE_KERNELS:

    @torch.library.register_fake("heterocache::gather_attention")
    def _(query, output, caches, tables, work, fronts, k_transposed, scale):
        return None

    @torch.library.register_fake("heterocache::drift_check")
    def _(queries, caches, tables, row, key_len, candidates, reference, topk, threshold, pool_kernel, k_transposed,
          drift, median, latest_topk, latest_scores):
        return None

    @torch.library.register_fake("heterocache::refill_copy")
    def _(storage, host_blocks, host_rows, positions, caches, tables, k_transposed):
        return None

    @torch.library.register_fake("heterocache::stage_blocks")
    def _(src, blocks, dst, src_k_transposed, dst_k_transposed):
        return None

    @torch.library.register_fake("heterocache::window_scores")
    def _(logits, window, pool_kernel, out):
        return None

    @torch.library.register_fake("heterocache::write_slots")
    def _(cache, slots, key, value, k_transposed):
        return None


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels (setup.py: CUDA torch + toolchain)."""
    return HAVE_KERNELS and torch._C._dispatch_has_kernel_for_dispatch_key("heterocache::gather_attention", "CUDA")


def compiled(layout: BlockLayout) -> bool:
    """Whether the compiled kernels run on caches of ``layout``."""
    return HAVE_KERNELS and layout.kernel_order is not None


def describe() -> str:
    if HAVE_KERNELS:
        cuda = "; CUDA kernels built" if has_cuda_kernels() else ""
        return f"compiled CPU kernels (vllm_heterocache._C: AVX2, OpenMP{cuda})"
    return f"PyTorch reference ops (the extension vllm_heterocache._C is not available: {_WHY})"


NO_FRONTS = torch.empty(0, dtype=torch.int32)


def gather_attention(
    query: torch.Tensor,
    output: torch.Tensor,
    caches: list[torch.Tensor],
    tables: list[torch.Tensor],
    work: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    fronts: torch.Tensor | None = None,
) -> None:
    """Decode attention of work items over paged single-head caches (contract: csrc/gather_attention.h).

    Args:
        query, output: ``[T, Hq, D]``; ``output`` is written at the items' (token, query heads).
        caches: per KV head ``[num_blocks, 1, block_size, 2 * D]`` (vLLM CPU_ATTN block layout).
        tables: per KV head int32 ``[rows, max_blocks]`` block tables.
        work: int64 ``[n, 8]``: token, KV head, row, n_front, gen_start, gen_end, front_start,
            front_list; the item attends over ``n_front`` front positions and ``gen_start ..
            gen_end - 1`` of its row (``placement``: where a head's tokens are): the front is
            ``front_start ..``, or with ``front_list >= 0`` the positions ``fronts[front_list ..]``.
        layout: the caches' block layout.
        fronts: int32 ``[m]``, the front positions the items' ``front_list`` columns index.
    """
    if fronts is None:
        fronts = NO_FRONTS if query.device.type == "cpu" else NO_FRONTS.to(query.device)
    if compiled(layout):
        torch.ops.heterocache.gather_attention(query, output, caches, tables, work, fronts, layout.kernel_order, scale)
    else:
        gather_attention_reference(query, output, caches, tables, work, layout, scale, fronts)


def gather_attention_reference(query, output, caches, tables, work, layout: BlockLayout, scale: float,
                               fronts: torch.Tensor | None = None) -> None:
    """PyTorch version of :func:`gather_attention` (the oracle of the kernel tests)."""
    hkv = len(caches)
    g = query.shape[1] // hkv
    for t, h, row, n_front, gen_start, gen_end, front_start, front_list in work.tolist():
        front = (torch.arange(front_start, front_start + n_front) if front_list < 0
                 else fronts[front_list : front_list + n_front].long())
        positions = torch.cat([front, torch.arange(gen_start, gen_end)])
        k, v = read_positions(caches[h], layout, tables[h][row], positions)
        idx = torch.arange(positions.numel())[None, None]
        out = ref.subset_attention(query[t, h * g : (h + 1) * g][None], k[None, :, None], v[None, :, None], idx, scale)
        output[t, h * g : (h + 1) * g] = out[0]


def refill_copy(
    storage: torch.Tensor,
    host_blocks: torch.Tensor,
    host_rows: torch.Tensor,
    positions: torch.Tensor,
    caches: list[torch.Tensor],
    tables: list[torch.Tensor],
    layout: BlockLayout,
) -> None:
    """Refill copies from the host tier into satellites' slots (contract: csrc/refill_copy.h).

    Args:
        storage: the host tier ``[num_blocks, rows, host_block_size, 2, D]``.
        host_blocks: int64 ``[n]``, the request's host blocks.
        host_rows: int64 ``[S]``, each satellite's host row.
        positions: int64 ``[S, width]``: slot ``i`` of satellite ``s`` gets prompt position
            ``positions[s, i]``; a slot whose entry is -1 keeps what it holds.
        caches, tables: per satellite its single-head cache and the request's int32 block-table row.
    """
    if compiled(layout):
        torch.ops.heterocache.refill_copy(storage, host_blocks, host_rows, positions, caches, tables,
                                          layout.kernel_order)
    else:
        refill_copy_reference(storage, host_blocks, host_rows, positions, caches, tables, layout)


def refill_copy_reference(storage, host_blocks, host_rows, positions, caches, tables, layout: BlockLayout) -> None:
    """PyTorch version of :func:`refill_copy`."""
    hbs = storage.shape[2]
    for s, (cache, table) in enumerate(zip(caches, tables)):
        slots = torch.nonzero(positions[s] >= 0)[:, 0]
        pos = positions[s, slots]
        kv = storage[host_blocks[pos // hbs], int(host_rows[s]), pos % hbs]  # [n, 2, D]
        write_positions(cache, layout, table, slots, kv[:, 0], kv[:, 1])


def drift_check(
    queries: torch.Tensor,
    caches: list[torch.Tensor],
    tables: list[torch.Tensor],
    row: int,
    key_len: int,
    candidates: int,
    reference: torch.Tensor,
    topk: int,
    threshold: float,
    pool_kernel: int,
    layout: BlockLayout,
) -> ref.DriftResult:
    """:func:`reference.drift_check` of P pivots whose keys are the first ``key_len`` positions of
    row ``row`` of their paged single-head caches (contract: csrc/drift_check.h).

    Args:
        queries: float32 ``[P, N, G, D]``, oldest to newest step.
        caches, tables: per pivot, as for :func:`gather_attention`.
        reference: int64 ``[P, K]`` ascending, -1 padded.
    """
    if not compiled(layout):
        return drift_check_reference(queries, caches, tables, row, key_len, candidates, reference, topk, threshold,
                                     pool_kernel, layout)
    p, dev = queries.shape[0], queries.device
    drift = torch.empty(p, dtype=torch.bool, device=dev)
    median = torch.empty(p, device=dev)
    latest = torch.empty(p, max(0, min(topk, candidates, key_len)), dtype=torch.int64, device=dev)
    scores = torch.empty(p, key_len, device=dev)
    torch.ops.heterocache.drift_check(queries.float().contiguous(), caches, tables, row, key_len, candidates,
                                      reference.contiguous(), topk, threshold, pool_kernel, layout.kernel_order, drift,
                                      median, latest, scores)
    return ref.DriftResult(drift, median, latest, scores)


def drift_check_reference(queries, caches, tables, row, key_len, candidates, reference, topk, threshold, pool_kernel,
                          layout: BlockLayout) -> ref.DriftResult:
    """PyTorch version of :func:`drift_check`."""
    p = queries.shape[0]
    positions = torch.arange(key_len)
    keys = torch.stack([read_positions(c, layout, t[row], positions)[0] for c, t in zip(caches, tables)])
    return ref.drift_check(queries, keys, torch.full((p,), key_len), torch.full((p,), candidates), reference,
                           torch.full((p,), topk), threshold, pool_kernel)


def stage_blocks(src: torch.Tensor, src_layout: BlockLayout, blocks: torch.Tensor, dst: torch.Tensor,
                 dst_layout: BlockLayout) -> None:
    """``dst[i] = src[blocks[i]]`` in ``dst_layout`` (contract: csrc/stage_blocks.h; reference
    :func:`~vllm_heterocache.ops.paged.copy_blocks`): a compressed pool's blocks staged into vLLM's
    layout for vLLM's kernel (``vllm_adapter.backend``).

    Args:
        src, dst: single-head caches ``[num_blocks, 1, block_size, 2 * D]`` of one dtype (CPU).
        blocks: int64 ``[n]``, blocks of ``src``; ``dst`` holds at least ``n``.
    """
    if compiled(src_layout) and compiled(dst_layout) and src.device.type == "cpu":
        torch.ops.heterocache.stage_blocks(src, blocks, dst, src_layout.kernel_order, dst_layout.kernel_order)
    else:
        copy_blocks(src, src_layout, blocks, dst, dst_layout)


def write_slots(kv_cache: torch.Tensor, layout: BlockLayout, slots: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """:func:`~vllm_heterocache.ops.paged.write_slots` (the same arguments and effect: K and V
    ``[n, D]`` of a single-head cache at vLLM's int64 ``slots``, negative ones skipped), compiled
    on the CPU (contract: csrc/write_slots.h): one row copy per token, where torch's indexed
    assignment took about 250 ns a row for a 2K-token prefill chunk. K and V may be one head of
    the step's ``[T, H, D]``; they are cast to the cache's dtype."""
    if not (compiled(layout) and kv_cache.device.type == "cpu"):
        return paged.write_slots(kv_cache, layout, slots, k, v)
    k, v = (x.to(kv_cache.dtype) for x in (k, v))
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    torch.ops.heterocache.write_slots(kv_cache, slots.long().contiguous(), k, v, layout.kernel_order)


def prefill_scores(query: torch.Tensor, key: torch.Tensor, pool_kernel: int = 5) -> torch.Tensor:
    """:func:`reference.prefill_scores` (same arguments and result) with the logits' matrix
    product taken by torch and the rest compiled (contract: csrc/window_scores.h): each window
    query's softmax, the mean over the window, the pooling and the GQA max, in one pass over the
    logits while a row is in L1 (CPU tensors; else the reference). The logits are made up to
    ``reference.SCORE_WHOLE_BYTES`` at a time, for whole KV heads or, when one head's are more,
    for parts of its group whose maxima are then maxed.

    32 queries of 8 heads (2 KV heads) over 3.3K keys took 1.55 ms against the reference's 1.9
    ms, over 32K keys 15.2-15.8 against 22.2-23.5 ms (one thread; most of the rest is the product).
    """
    w, hq, _ = query.shape
    length, hkv, _ = key.shape
    if not HAVE_KERNELS or query.device.type != "cpu" or w == 0 or length == 0:
        return ref.prefill_scores(query, key, pool_kernel)
    q, keys = ref.window_operands(query, key)  # [Hkv, G*W, D], [Hkv, D, L]
    g = hq // hkv
    out = torch.empty(hkv, length)
    heads = max(1, ref.SCORE_WHOLE_BYTES // (4 * w * length))  # query heads whose logits are one piece
    if heads >= g:
        step = heads // g
        for h0 in range(0, hkv, step):
            h1 = min(hkv, h0 + step)
            torch.ops.heterocache.window_scores(torch.bmm(q[h0:h1], keys[h0:h1]), w, pool_kernel, out[h0:h1])
        return out
    part = torch.empty(1, length)
    for h in range(hkv):
        for g0 in range(0, g, heads):
            g1 = min(g, g0 + heads)
            torch.ops.heterocache.window_scores(torch.mm(q[h, g0 * w : g1 * w], keys[h])[None], w, pool_kernel, part)
            out[h] = part[0] if g0 == 0 else torch.maximum(out[h], part[0])
    return out
