"""The per-layer steps of HeteroCache on one batch row (algorithm.md sections 3 and 4).

Every KV head of a layer has a single-head paged pool of its own (``LayerPools``), in one of
several kinds: the full pool (volatile and pivot heads: every token at its position) or a
compressed pool of a budget class (anchor and satellite heads), whose block manager frees a
request's prompt blocks beyond the class's largest budget once the prompt is done
(``vllm_adapter.pools``). Per request and compressed head ``c`` with budget ``B_c``, its pool
holds::

    positions 0 .. B_c - 1      its kept prompt tokens, compacted in position order (the
                                selection, ending with the window); refills rewrite the first
                                B_c - window of them
    positions L .. seq_len - 1  generated tokens, at their own positions

Shapes: ``query`` is the step's ``[num_tokens, H_q, D]`` (H_q = H_kv * G, this rank's heads); a
row's tokens are ``query[row.start : row.start + row.q_len]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_heterocache.ops import kernels
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.runtime.model import HeteroCacheRuntime, LayerHeads, Row
from vllm_heterocache.runtime.paged import LayerCache


@dataclass(frozen=True)
class LayerPools:
    """One layer's pools, one per local KV head (``[num_blocks, 1, block_size, 2 * D]`` each),
    with this step's block tables (int ``[rows, max_blocks]``, shared by the heads of a kind)."""

    caches: tuple[LayerCache, ...]
    tables: tuple[torch.Tensor, ...]

    def keys(self, heads, row: int, length: int) -> torch.Tensor:
        """K of positions ``0 .. length-1`` of the given heads: ``[length, len(heads), D]``."""
        return torch.cat([self.caches[h].gather(self.tables[h][row], length)[0] for h in heads], dim=1)

    def read(self, head: int, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.caches[head].gather_positions(self.tables[head][row], 0, positions)

    def write(self, head: int, row: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.caches[head].scatter_positions(self.tables[head][row], 0, positions, k, v)


def _heads_of(query: torch.Tensor, num_kv_heads: int, heads) -> torch.Tensor:
    """``[T, H_q, D]`` -> ``[T, len(heads) * G, D]``: the query heads of the given KV heads."""
    t, hq, d = query.shape
    g = hq // num_kv_heads
    return query.view(t, num_kv_heads, g, d)[:, list(heads)].reshape(t, len(heads) * g, d)


def select_and_compact(
    rt: HeteroCacheRuntime, layer: int, heads: LayerHeads, row: Row, query: torch.Tensor,
    num_kv_heads: int, pools: LayerPools,
) -> None:
    """After the last prompt token: compressed heads choose their budget and compact it to
    positions ``0 .. B_c - 1`` of their pool; pivots record their reference top-K.

    Scoring uses the queries of the last ``window`` prompt positions that are in this row (a
    chunk boundary inside the window leaves fewer).
    """
    state = row.state
    plan = state.plan
    L, W = plan.prompt_len, plan.window
    lo = max(L - max(1, rt.config.window), row.first)
    q = query[row.start + lo - row.first : row.start + L - row.first]
    if heads.compressed:
        c = heads.compressed
        k = pools.keys(c, row.index, L)
        scores = ref.prefill_scores(_heads_of(q, num_kv_heads, c), k, rt.config.pool_kernel)
        chosen = ref.select_tokens(scores, plan.budgets[layer, list(c)], W)
        for i, h in enumerate(c):
            keep = chosen[i][chosen[i] >= 0]
            pools.write(h, row.index, torch.arange(keep.numel()), *pools.read(h, row.index, keep))
        state.kept[layer] = chosen
    if heads.pivots:
        p = heads.pivots
        k = pools.keys(p, row.index, L)
        scores = ref.prefill_scores(_heads_of(q, num_kv_heads, p), k, rt.config.pool_kernel)
        n = len(p)
        state.references[layer] = ref.topk_positions(
            scores, torch.full((n,), plan.reference_topk), torch.full((n,), L - W)
        )
        g = query.shape[1] // num_kv_heads
        state.query_ring[layer] = torch.zeros(n, rt.config.drift_interval, g, query.shape[2])
        state.buffered[layer] = 0
    rt.counters.prefill_selections += 1


def kernel_decodes(rows: list[Row], pools: LayerPools) -> bool:
    """Whether one compiled-kernel call can run a decode step's attention of every head: the
    kernels are built, they read this cache layout, and every row is one decode token."""
    return (kernels.HAVE_KERNELS and pools.caches[0].layout.kernel_order is not None
            and all(r.decoding and r.q_len == 1 for r in rows))


def decode_attention(
    heads: LayerHeads, rows: list[Row], query: torch.Tensor, num_kv_heads: int, pools: LayerPools, layer: int,
    scale: float, output: torch.Tensor, full: bool = False,
) -> None:
    """:func:`compressed_attention` of every decode row, in one compiled-kernel call for the
    rows of one token when the kernels are built and the cache layout is one they read. With
    ``full`` (only when :func:`kernel_decodes`), the same call also runs the full heads over all
    their positions."""
    order = pools.caches[0].layout.kernel_order
    single = [r for r in rows if r.q_len == 1]
    if kernels.HAVE_KERNELS and order is not None and single:
        items = [
            [r.start, h, r.index, int(r.state.plan.budgets[layer, h]), r.state.prompt_len, r.seq_len]
            for r in single
            for h in heads.compressed
        ]
        if full:
            items += [[r.start, h, r.index, r.seq_len, r.seq_len, r.seq_len] for r in single for h in heads.full]
        d = query.shape[-1]
        kernels.gather_attention(
            query.view(query.shape[0], -1, d), output.view(output.shape[0], -1, d),
            [c.kv for c in pools.caches], list(pools.tables), torch.tensor(items, dtype=torch.int64), order, scale,
        )
        rows = [r for r in rows if r.q_len != 1]
    assert not (full and rows), "full heads in the kernel call need single-token rows (kernel_decodes)"
    for row in rows:
        compressed_attention(heads, row, query, num_kv_heads, pools, layer, scale, output)


def compressed_attention(
    heads: LayerHeads, row: Row, query: torch.Tensor, num_kv_heads: int, pools: LayerPools, layer: int,
    scale: float, output: torch.Tensor,
) -> None:
    """Attention of the compressed heads of a decode row over their kept tokens only.

    Reads positions ``0 .. B_c - 1`` (kept prompt tokens) and ``L .. seq_len - 1`` (generated) of
    each compressed head's pool. Writes the compressed heads' slice of ``output``
    (``[num_tokens, H_q, D_v]``).
    """
    plan = row.state.plan
    L, s, qn = plan.prompt_len, row.seq_len, row.q_len
    g = query.shape[1] // num_kv_heads
    q_all = query[row.start : row.start + qn].view(qn, num_kv_heads, g, -1)
    dst = output[row.start : row.start + qn].view(qn, num_kv_heads, g, -1)
    qpos = torch.arange(s - qn, s)
    generated = torch.arange(L, s)
    for h in heads.compressed:
        budget = int(plan.budgets[layer, h])
        k, v = pools.read(h, row.index, torch.cat([torch.arange(budget), generated]))
        logits = torch.einsum("qgd,nd->qgn", q_all[:, h].float(), k.float()) * scale
        if qn > 1:  # causal among the row's own tokens
            future = torch.cat([torch.zeros(qn, budget, dtype=torch.bool), generated[None, :] > qpos[:, None]], -1)
            logits = logits.masked_fill(future[:, None, :], float("-inf"))
        dst[:, h] = torch.einsum("qgn,nd->qgd", logits.softmax(-1), v.float()).to(output.dtype)


def track_drift(
    rt: HeteroCacheRuntime, layer: int, heads: LayerHeads, row: Row, query: torch.Tensor,
    num_kv_heads: int, pools: LayerPools,
) -> None:
    """Buffer the pivots' queries; every ``drift_interval`` of them check drift and, on drift,
    start the refill of the pivot's satellites from the host tier (asynchronous; it is waited
    for when the layer next reads them, see ``RefillQueue``)."""
    state, plan = row.state, row.state.plan
    ring = state.query_ring.get(layer)
    if ring is None:
        return
    n_steps = rt.config.drift_interval
    g = query.shape[1] // num_kv_heads
    p = heads.pivots
    cut = plan.prompt_len - plan.window
    for j in range(row.q_len):
        slot = state.buffered[layer] % n_steps
        ring[:, slot] = query[row.start + j].view(num_kv_heads, g, -1)[list(p)].float()
        state.buffered[layer] += 1
        if state.buffered[layer] < n_steps:
            continue
        state.buffered[layer] = 0
        visible = row.seq_len - (row.q_len - 1 - j)
        result = _drift_check(rt, heads, row, ring.roll(-(slot + 1), dims=1), visible, cut, state.references[layer],
                              plan.reference_topk, pools)
        rt.counters.drift_checks += 1
        for i, pivot in enumerate(p):
            if not bool(result.drift[i]):
                continue
            rt.counters.drifts += 1
            state.references[layer][i] = result.latest_topk[i]
            sats = heads.satellites.get(pivot, ())
            if sats and state.host:
                _refill(rt, layer, heads, row, sats, result.latest_scores[i], result.latest_topk[i], pools)


def _drift_check(rt, heads: LayerHeads, row: Row, queries: torch.Tensor, visible: int, cut: int,
                 reference: torch.Tensor, topk: int, pools: LayerPools) -> ref.DriftResult:
    """Drift decision of the layer's pivots (queries ``[P, N, G, D]`` oldest to newest) over
    their first ``visible`` keys: the compiled kernel reads them in place where it can."""
    p = heads.pivots
    order = pools.caches[p[0]].layout.kernel_order
    if order is not None:
        return kernels.drift_check(queries, [pools.caches[h].kv for h in p], [pools.tables[h] for h in p], row.index,
                                   visible, cut, reference, topk, rt.threshold, rt.config.pool_kernel, order)
    n = len(p)
    return ref.drift_check(queries, pools.keys(p, row.index, visible).permute(1, 0, 2), torch.full((n,), visible),
                           torch.full((n,), cut), reference, torch.full((n,), topk), rt.threshold,
                           rt.config.pool_kernel)


def _refill(rt, layer: int, heads: LayerHeads, row: Row, sats, pivot_scores: torch.Tensor, pivot_top: torch.Tensor,
            pools: LayerPools) -> None:
    """Queue the copies of the satellites' new selection from the host tier into their slots."""
    state, plan = row.state, row.state.plan
    cut = plan.prompt_len - plan.window
    counts = torch.tensor([int(plan.budgets[layer, s]) - plan.window for s in sats])
    chosen = _refill_positions(pivot_scores, pivot_top[pivot_top >= 0], counts, cut)
    host, key = rt.host, state.key
    tables = [pools.tables[s][row.index].clone() for s in sats]  # this step's; the copy runs later
    kept = state.kept[layer]
    for n, s in enumerate(sats):
        positions = chosen[n][chosen[n] >= 0]
        kept[heads.compressed.index(s), : positions.numel()] = positions
    order = pools.caches[sats[0]].layout.kernel_order
    host_rows = [heads.host_rows[s] for s in sats]

    def copy() -> None:
        if order is not None:  # compiled (or reference) copy straight into the slots
            host.copy_out(key, host_rows, chosen, [pools.caches[s].kv for s in sats], tables, order)
            return
        for n, s in enumerate(sats):  # a layout the kernels do not read
            positions = chosen[n][chosen[n] >= 0]
            k, v = host.read(key, host_rows[n], positions)
            pools.caches[s].scatter_positions(tables[n], 0, torch.arange(positions.numel()), k, v)

    rt.refills.submit(key, layer, copy)
    rt.counters.refilled_heads += len(sats)


def _refill_positions(scores: torch.Tensor, top: torch.Tensor, counts: torch.Tensor, cut: int) -> torch.Tensor:
    """``ref.refill_indices`` of one pivot's scores for its satellites. The top ``c`` positions
    are a prefix of the pivot's top-K order (score descending, position ascending), so when every
    count fits in its top-K (ascending positions ``top``) they are chosen among those K only."""
    n = len(counts)
    if top.numel() < min(cut, int(counts.max())):
        return ref.refill_indices(scores[None].expand(n, -1), counts, torch.full((n,), cut))
    picks = ref.refill_indices(scores[top][None].expand(n, -1), counts, torch.full((n,), top.numel()))
    return torch.where(picks >= 0, top[picks.clamp_min(0)], picks)


def mirror_to_host(rt: HeteroCacheRuntime, heads: LayerHeads, row: Row, key: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this row's prompt tokens of the layer's satellites into the host tier.

    ``key``/``value``: the step's ``[num_tokens, H_kv, D]``.
    """
    state = row.state
    end = min(row.seq_len, state.prompt_len)
    if not state.host or row.first >= end or not heads.host_rows:
        return
    sats = list(heads.host_rows)  # their host rows are consecutive (HeteroCacheRuntime)
    tokens = slice(row.start, row.start + end - row.first)
    rt.host.write(state.key, heads.host_rows[sats[0]], row.first, key[tokens][:, sats], value[tokens][:, sats])
