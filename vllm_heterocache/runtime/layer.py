"""The per-layer steps of HeteroCache on one batch row (algorithm.md sections 3 and 4).

All functions read K/V from the layer's paged cache and record selections in its selection bits
(``runtime.paged.LayerCache``). Shapes: ``query`` is the step's ``[num_tokens, H_q, D]``; a row's tokens
are ``query[row.start : row.start + row.q_len]`` at positions ``seq_len - q_len .. seq_len - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_heterocache.ops import reference as ref
from vllm_heterocache.runtime.model import HeteroCacheRuntime, LayerHeads
from vllm_heterocache.runtime.paged import LayerCache, read_bits, write_bits
from vllm_heterocache.runtime.requests import RequestState


@dataclass(frozen=True)
class Row:
    """One request's part of an engine step (planned once per step by the metadata builder)."""

    start: int  # index of the row's first query token in the step
    q_len: int
    seq_len: int  # tokens of the sequence once this step's tokens are written
    block_row: torch.Tensor  # int [max_blocks]: the request's block table
    prefilling: bool  # the tokens are prompt tokens (a prefill chunk)
    state: RequestState
    steps_before: int  # tokens processed after the prompt before this step (decode rows)


def select_after_prefill(
    rt: HeteroCacheRuntime, layer: int, heads: LayerHeads, row: Row, query: torch.Tensor,
    cache: LayerCache,
) -> None:
    """End of a prefill chunk: compressed heads choose their budget; pivots record references.

    Scoring uses the last ``window`` queries of the chunk (fewer if the chunk is shorter). If a
    later chunk extends the prompt, it is redone over the longer prompt.
    """
    plan = row.state.plan
    L, W = plan.prompt_len, plan.window
    cut = L - W
    w = max(1, min(rt.config.window, row.q_len))
    q = query[row.start + row.q_len - w : row.start + row.q_len]
    k, _ = cache.gather(row.block_row, L)
    scores = ref.prefill_scores(q, k, rt.config.pool_kernel)  # [H_kv, L]
    if heads.compressed:
        c = list(heads.compressed)
        chosen = ref.select_tokens(scores[c], plan.budgets[layer, c], W)
        for i, h in enumerate(c):
            write_bits(cache.bits, row.block_row, h, cut, chosen[i])
    if heads.pivots:
        p = list(heads.pivots)
        n = len(p)
        row.state.references[layer] = ref.topk_positions(
            scores[p], torch.full((n,), plan.reference_topk), torch.full((n,), cut)
        )
        g = query.shape[1] // cache.num_kv_heads
        row.state.query_ring[layer] = torch.zeros(n, rt.config.drift_interval, g, query.shape[2])
    rt.counters.prefill_selections += 1


def track_drift(
    rt: HeteroCacheRuntime, layer: int, heads: LayerHeads, row: Row, query: torch.Tensor,
    cache: LayerCache,
) -> None:
    """Buffer the pivots' queries; every ``drift_interval`` steps check drift and refill satellites."""
    state, plan = row.state, row.state.plan
    ring = state.query_ring.get(layer)
    if ring is None:
        return
    n_steps = rt.config.drift_interval
    hkv = cache.num_kv_heads
    g = query.shape[1] // hkv
    p = list(heads.pivots)
    cut = plan.prompt_len - plan.window
    for j in range(row.q_len):
        step = row.steps_before + j
        slot = step % n_steps
        ring[:, slot] = query[row.start + j].view(hkv, g, -1)[p].float()
        if (step + 1) % n_steps:
            continue
        visible = row.seq_len - (row.q_len - 1 - j)
        k, _ = cache.gather(row.block_row, visible, heads=p)
        keys = k.permute(1, 0, 2)  # [P, T, D]
        npiv = len(p)
        result = ref.drift_check(
            ring.roll(-(slot + 1), dims=1),  # oldest .. newest
            keys,
            torch.full((npiv,), visible),
            torch.full((npiv,), cut),
            state.references[layer],
            torch.full((npiv,), plan.reference_topk),
            rt.threshold,
            rt.config.pool_kernel,
        )
        rt.counters.drift_checks += 1
        for i, pivot in enumerate(p):
            if not bool(result.drift[i]):
                continue
            rt.counters.drifts += 1
            state.references[layer][i] = result.latest_topk[i]
            for sat in heads.satellites.get(pivot, ()):
                count = int(plan.budgets[layer, sat]) - plan.window
                chosen = ref.refill_indices(
                    result.latest_scores[i : i + 1], torch.tensor([count]), torch.tensor([cut])
                )
                write_bits(cache.bits, row.block_row, sat, cut, chosen[0])
                rt.counters.refilled_heads += 1


def compressed_attention(
    heads: LayerHeads, row: Row, query: torch.Tensor, cache: LayerCache, scale: float, output: torch.Tensor,
) -> None:
    """Attention of the compressed heads of a decode row over their kept tokens only.

    Kept: the selected prompt tokens (bits), the window, and every token after the prompt. Only
    those tokens are read from the cache. Writes the compressed heads' slice of ``output``
    (``[num_tokens, H_q, D_v]``); full heads' output (computed by the base backend over all
    tokens) is left as is.
    """
    plan = row.state.plan
    s, qn = row.seq_len, row.q_len
    hkv = cache.num_kv_heads
    g = query.shape[1] // hkv
    pos = torch.arange(s)
    always = pos >= plan.prompt_len - plan.window  # window and generated tokens
    bits = read_bits(cache.bits, row.block_row, s)
    qpos = torch.arange(s - qn, s)
    q_all = query[row.start : row.start + qn].view(qn, hkv, g, -1)
    dst = output[row.start : row.start + qn].view(qn, hkv, g, -1)
    for h in heads.compressed:
        kept = torch.nonzero(bits[h] | always).flatten()  # ascending positions
        k, v = cache.gather_positions(row.block_row, h, kept)
        logits = torch.einsum("qgd,nd->qgn", q_all[:, h].float(), k.float()) * scale
        logits = logits.masked_fill((kept[None, :] > qpos[:, None])[:, None, :], float("-inf"))
        dst[:, h] = torch.einsum("qgn,nd->qgd", logits.softmax(-1), v.float()).to(output.dtype)
