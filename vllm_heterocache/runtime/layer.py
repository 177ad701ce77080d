"""The per-layer steps of HeteroCache (algorithm.md sections 3 and 4), executing a step's plan.

Every KV head of a layer has a single-head paged cache of its own (``LayerCaches``), in one of
several pools: the full pool (volatile and pivot heads: every token at its position) or a
compressed pool of a budget class (anchor and satellite heads), whose block manager frees a
request's prompt blocks beyond the class's largest budget once the prompt is done
(``vllm_adapter.pools``). Per request and compressed head ``c`` with budget ``B_c``, its cache
holds::

    positions 0 .. B_c - 1      its kept prompt tokens (the selection in position order,
                                ending with the window); a refill rewrites those of the first
                                B_c - window slots whose tokens left the selection
    positions L .. seq_len - 1  generated tokens, at their own positions

Shapes: ``query`` is the step's ``[num_tokens, H_q, D]`` (H_q = H_kv * G, this rank's heads);
``key``/``value`` ``[num_tokens, H_kv, D]``. A row's tokens are ``query[row.start : row.start +
row.q_len]`` (``runtime.step``). What a step runs is decided once in its :class:`StepPlan`;
the functions here take one :class:`LayerStep` (the layer, its caches, the plan) and execute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_heterocache.ops import kernels
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.ops.paged import BlockLayout, read_positions, read_prefix, read_prefixes_k, write_positions
from vllm_heterocache.runtime.heads import LayerHeads
from vllm_heterocache.runtime.host import HostTier
from vllm_heterocache.runtime.refill import RefillQueue, degrade
from vllm_heterocache.runtime.rings import QueryRings
from vllm_heterocache.runtime.stats import Counters
from vllm_heterocache.runtime.step import Row, StepPlan
from vllm_heterocache.runtime.timing import section


@dataclass(frozen=True)
class LayerCaches:
    """One layer's caches, one per local KV head (``[num_blocks, 1, block_size, 2 * D]`` each),
    their block layouts (a pool's caches share one: vLLM's in the full pool, K token-major in the
    compressed pools, ``vllm_adapter.block_layout``), and this step's block tables (int32
    ``[rows, max_blocks]``, shared by the heads of a pool)."""

    per_head: tuple[torch.Tensor, ...]
    tables: tuple[torch.Tensor, ...]
    layouts: tuple[BlockLayout, ...]

    def prefix(self, heads, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``0 .. length-1`` of the given heads: ``[length, len(heads), D]`` each."""
        kv = [read_prefix(self.per_head[h], self.layouts[h], self.tables[h][row], length) for h in heads]
        return torch.cat([k for k, _ in kv], dim=1), torch.cat([v for _, v in kv], dim=1)

    def keys(self, heads, row: int, length: int) -> torch.Tensor:
        """K of positions ``0 .. length-1`` of the given heads: ``[length, len(heads), D]``, a view
        of head-major keys (each head's ``[length, D]`` contiguous, as ``ref.prefill_scores``
        reads them fastest)."""
        return read_prefixes_k([self.per_head[h] for h in heads], [self.layouts[h] for h in heads],
                               [self.tables[h][row] for h in heads], length).transpose(0, 1)

    def read(self, head: int, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return read_positions(self.per_head[head], self.layouts[head], self.tables[head][row], positions)

    def write(self, head: int, row: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_positions(self.per_head[head], self.layouts[head], self.tables[head][row], positions, k, v)

    def by_layout(self, heads) -> list[tuple[BlockLayout, tuple[int, ...]]]:
        """The given heads grouped by their caches' layout (a kernel call reads one layout; a
        pool's caches share one layout object)."""
        groups: dict[int, tuple[BlockLayout, list[int]]] = {}
        for h in heads:
            groups.setdefault(id(self.layouts[h]), (self.layouts[h], []))[1].append(h)
        return [(layout, tuple(hs)) for layout, hs in groups.values()]


@dataclass(frozen=True)
class LayerParts:
    """The parts of the engine's runtime that per-layer code uses, each owned by one object:
    settings, counters, the refill queue, the pivots' query rings, the host tier (None until vLLM
    has sized the KV cache, or without satellites) and the exchange across tensor-parallel ranks
    (``t`` summed over the ranks; None at one rank)."""

    window: int
    pool_kernel: int
    threshold: float  # tau_stable of the drift check
    counters: Counters
    refills: RefillQueue
    rings: QueryRings
    host: HostTier | None = None
    exchange: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class LayerStep:
    """One layer in one step: what every per-layer function reads."""

    parts: LayerParts
    layer: int  # model layer index
    heads: LayerHeads
    caches: LayerCaches
    plan: StepPlan
    scale: float

    @property
    def num_kv_heads(self) -> int:
        return len(self.heads.pool)


def attend(ls: LayerStep, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
           stock: Callable[[int, bool], None]) -> None:
    """The layer's attention in this step, as its plan says (``runtime.step``); ``stock(h,
    prefilling)`` runs vLLM's kernel for the query heads of KV head ``h`` over every row of the
    step, or over the plan's prefilling rows only."""
    parts, plan, heads = ls.parts, ls.plan, ls.heads
    if not plan.fused:  # (a step with a prefilling row is never fused)
        for h in heads.full:
            stock(h, False)
    if plan.prefill:
        for h in heads.compressed:
            stock(h, plan.prefilling is not None)
    for row in plan.continues_prompt:
        keep_window_queries(ls, row, query)
    for row in plan.ends_prompt:
        select_and_compact(ls, row, query, key, value)
    with section("refill_wait"):
        for row in plan.decoding:
            failure = parts.refills.wait(row.state.key, ls.layer)
            if failure is not None:
                degrade(row.state, failure, parts.counters)
    gather_decode(ls, query, output)
    if (heads.pivots or heads.shared) and plan.drift:
        with section("drift"):
            track_drift(ls, query)


def _heads_of(query: torch.Tensor, num_kv_heads: int, heads) -> torch.Tensor:
    """``[T, H_q, D]`` -> ``[T, len(heads) * G, D]``: the query heads of the given KV heads."""
    t, hq, d = query.shape
    g = hq // num_kv_heads
    return query.view(t, num_kv_heads, g, d)[:, list(heads)].reshape(t, len(heads) * g, d)


def mirror_to_host(ls: LayerStep, key: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the prompt tokens of this step's prefilling rows of the layer's satellites into the
    host tier (their host rows are consecutive, ``HeteroCacheRuntime``). A request's first row
    after a prefix-cache hit also copies the hit's tokens, read from the shared blocks, unless
    its satellites' refills point at them there (``placement``)."""
    host, rows = ls.parts.host, ls.heads.host_rows
    if not rows:
        return
    sats = list(rows)
    for row in ls.plan.rows:
        state = row.state
        end = min(row.seq_len, state.prompt_len)
        if not state.host or row.first >= end:
            continue
        if row.first == state.hit and any(_store(state, ls.heads, s)[0] < state.hit for s in sats):
            host.write(state.key, rows[sats[0]], 0, *ls.caches.prefix(sats, row.index, state.hit))
        tokens = slice(row.start, row.start + end - row.first)
        host.write(state.key, rows[sats[0]], row.first, key[tokens][:, sats], value[tokens][:, sats])


def _window_start(ls: LayerStep, state) -> int:
    """The first position of the request's observation window: its last ``window`` prompt positions."""
    return max(0, state.prompt_len - max(1, ls.parts.window))


def keep_window_queries(ls: LayerStep, row: Row, query: torch.Tensor) -> None:
    """Keep the queries of this chunk's positions in the request's observation window (a chunk
    that is not the prompt's last): scoring at the end of the prompt then uses every query of the
    window, wherever chunked prefill split it, as it does when the window is in one chunk."""
    state = row.state
    lo = max(_window_start(ls, state), row.first)
    if lo >= row.seq_len:
        return
    mine = query[row.start + lo - row.first : row.start + row.q_len].clone()
    kept = state.window_queries.get(ls.layer)
    if kept is not None and kept[0] + kept[1].shape[0] == lo:  # continues what earlier chunks kept
        state.window_queries[ls.layer] = (kept[0], torch.cat([kept[1], mine]))
    else:
        state.window_queries[ls.layer] = (lo, mine)


def select_and_compact(ls: LayerStep, row: Row, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """After the last prompt token: compressed heads choose their budget by the request's policy
    (``policies``: scored, or sinks plus recent tokens) and copy it, in prompt order, to slots of
    their pool's selection region (``placement``: never a block that the prefix cache shares) --
    but for the tokens of a prefix-cache hit, which stay where they are in the shared blocks and
    which the head's row of ``RequestState.fronts`` points at; a head whose budget is the whole
    prompt copies all of it there; pivots of a request that tracks drift record their reference
    top-K. Heads of a pool that keeps the request's tokens at their own positions are in place.

    Scoring uses the queries of the last ``window`` prompt positions that are in this row (a
    chunk boundary inside the window leaves fewer; a prefix-cache hit never reaches into the
    window, ``vllm_adapter.pools.hit_limit``). When the whole prompt is in this step, its K/V
    are the step's own ``key``/``value`` (the values just written to the caches), else they are
    read from the caches.
    """
    heads, caches, layer = ls.heads, ls.caches, ls.layer
    state = row.state
    budgets = state.budgets
    L, W = budgets.prompt_len, budgets.window
    kept_queries = state.window_queries.pop(layer, None)
    c = tuple(h for h in heads.compressed if int(budgets.per_head[layer, h]) < L)  # heads that select
    stores = {h: _store(state, heads, h) for h in heads.compressed}
    handled = tuple(h for h in heads.compressed if h in c or stores[h][2])  # (the others are in place)
    pivots = heads.pivots if state.ring is not None else ()
    if not handled and not pivots:  # (nothing to select: this rank's heads of the layer keep everything)
        return
    scored = (c if state.policy.scores_prompt else ()) + pivots
    whole = row.first == 0
    if whole:
        k_prompt, v_prompt = key[row.start : row.start + L], value[row.start : row.start + L]
    if scored:
        lo = max(_window_start(ls, state), row.first)
        q = query[row.start + lo - row.first : row.start + L - row.first]
        if kept_queries is not None and kept_queries[0] + kept_queries[1].shape[0] == lo:
            q = torch.cat([kept_queries[1], q])  # the window's queries of earlier chunks
        k = k_prompt[:, list(scored)] if whole else caches.keys(scored, row.index, L)
        scores = kernels.prefill_scores(_heads_of(q, ls.num_kv_heads, scored), k, ls.parts.pool_kernel)
    if c:
        chosen = state.policy.select(budgets.per_head[layer, list(c)], L, W,
                                     scores[: len(c)] if state.policy.scores_prompt else None)
        state.kept[layer] = _every_compressed(heads.compressed, c, chosen, L)
    everything = torch.arange(L)
    for h in handled:
        keep = chosen[c.index(h)] if h in c else everything
        keep = keep[keep >= 0]
        in_place, start, _ = stores[h]
        shared = keep[keep < in_place]  # read where they are
        copied = keep[shared.numel():]
        slots = torch.arange(copied.numel()) + start
        if copied.numel():
            kept_kv = (k_prompt[copied, h], v_prompt[copied, h]) if whole else caches.read(h, row.index, copied)
            caches.write(h, row.index, slots, *kept_kv)
        if state.work_template[layer, h, 7] >= 0:  # its front is a list of row positions
            state.fronts[layer, h, : keep.numel()] = torch.cat([shared, slots]).to(torch.int32)
    if pivots:
        n = len(pivots)
        state.references[layer] = ref.topk_positions(
            scores[len(scored) - n :], torch.full((n,), budgets.reference_topk), torch.full((n,), L - W)
        )
    if c or pivots:
        ls.parts.counters.prefill_selections += 1


def _store(state, heads: LayerHeads, h: int) -> tuple[int, int, int]:
    """Where compressed head ``h`` keeps the request's prompt tokens (``placement``), as
    ``(in_place, start, capacity)``: positions below ``in_place`` are read where they are (shared
    prompt blocks, or every position in a store that keeps them all in place); the others are
    copied into ``capacity`` slots from row position ``start``."""
    placement = state.placement(heads.store[h])
    if placement is None or placement.positional:
        return state.prompt_len, state.prompt_len, 0
    return placement.shared_len, placement.selection_start, placement.selection_len


def _every_compressed(compressed: tuple[int, ...], selected: tuple[int, ...], chosen: torch.Tensor,
                      length: int) -> torch.Tensor:
    """``RequestState.kept`` of a layer: the positions each compressed head holds, ``[C, B_max]``
    (``chosen`` rows for the ``selected`` heads, all ``length`` positions for the others)."""
    if selected == compressed:
        return chosen
    width = max(chosen.shape[1], length if len(selected) < len(compressed) else 0)
    out = torch.full((len(compressed), width), -1, dtype=torch.int64)
    for i, h in enumerate(compressed):
        if h in selected:
            row = chosen[selected.index(h)]
            out[i, : row.numel()] = row
        else:
            out[i, :length] = torch.arange(length)
    return out


def gather_decode(ls: LayerStep, query: torch.Tensor, output: torch.Tensor) -> None:
    """Run the plan's gather-kernel work items of this layer (decoding tokens' compressed heads,
    and every head in a fused step), one call per cache layout (``LayerCaches``: a fused step's
    full and compressed heads are two), writing their slices of ``output``."""
    work = ls.plan.work[ls.layer]
    if not work.numel():
        return
    d = query.shape[-1]
    caches = ls.caches
    fronts = torch.cat([r.state.fronts[ls.layer].view(-1) for r in ls.plan.fronts]) if ls.plan.fronts else None
    groups = caches.by_layout(range(ls.num_kv_heads))
    for layout, heads in groups:
        mine = work
        if len(groups) > 1:
            ours = torch.zeros(ls.num_kv_heads, dtype=torch.bool)
            ours[list(heads)] = True
            mine = work[ours[work[:, 1]]]
        if mine.numel():
            kernels.gather_attention(query.view(query.shape[0], -1, d), output.view(output.shape[0], -1, d),
                                     list(caches.per_head), list(caches.tables), mine, layout, ls.scale, fronts)


def track_drift(ls: LayerStep, query: torch.Tensor) -> None:
    """Buffer the pivots' queries of the step's decoding rows in their query rings
    (``runtime.rings``), one indexed copy per phase of the plan; a row whose ring is full checks
    its drift and, on drift, starts the refill of the pivot's satellites from the host tier
    (asynchronous; it is waited for when the layer next reads them, see ``RefillQueue``).

    Pivot clusters across tensor-parallel ranks: every rank runs this for every check of a
    layer that has one (the plans are the same on every rank), the rank that decides for a
    pivot puts its decision and ranked positions in a message, and one exchange per layer and
    step (a sum over the ranks) gives every rank the messages of all; each refills its own
    satellites from them, exactly as if the pivot were local.
    """
    parts, heads, layer, caches = ls.parts, ls.heads, ls.layer, ls.caches
    t, _, d = query.shape
    p = list(heads.pivots)
    per_head = query.view(t, ls.num_kv_heads, -1, d)  # [T, H_kv, G, D]
    rings = parts.rings.of_layer(layer, per_head.shape[2], d)
    pivot_caches, tables = [caches.per_head[h] for h in p], [caches.tables[h] for h in p]
    pivot_layout = caches.layouts[p[0]] if p else None  # (pivots keep full KV: all in the full pool)
    sent: list[tuple[Row, torch.Tensor]] = []  # clusters across ranks: per check, its message (_message)
    for phase in ls.plan.drift:  # the phase's tokens first: a mixed step's prefill tokens are not copied
        if p:
            rings[phase.slots, :, phase.places] = per_head[phase.tokens][:, p].float()
        for check in phase.checks:
            row, state = check.row, check.row.state
            budgets = state.budgets
            cut = budgets.prompt_len - budgets.window
            result = None
            if p:
                result = kernels.drift_check(
                    rings[state.ring], pivot_caches, tables, row.index, check.key_len, cut, state.references[layer],
                    budgets.reference_topk, parts.threshold, parts.pool_kernel, pivot_layout,
                )
                parts.counters.drift_checks += 1
                for i in torch.nonzero(result.drift)[:, 0].tolist():
                    parts.counters.drifts += 1
                    state.references[layer][i] = result.latest_topk[i]
                    sats = heads.satellites.get(heads.pivots[i], ())
                    if sats and state.host:
                        counts = _refill_counts(ls, row, sats)  # one count for all: the best suffice, unranked
                        _refill(ls, row, sats, _ranked(result.latest_scores[i], result.latest_topk[i], max(counts),
                                                       cut, ordered=len(set(counts)) > 1))
            if heads.shared:
                sent.append((row, _message(heads.shared, result, state.shared_width[layer], cut)))
    if sent:
        width = max(m.shape[1] for _, m in sent)
        messages = torch.zeros(len(sent), len(heads.shared), width, dtype=torch.int64)
        for n, (_, m) in enumerate(sent):
            messages[n, :, : m.shape[1]] = m
        received = parts.exchange(messages)
        for (row, _), got in zip(sent, received):
            for x, sats in enumerate(heads.shared_satellites):
                if sats and got[x, 0] and row.state.host:
                    _refill(ls, row, sats, got[x, 1:] - 1)


def _message(shared: tuple[int, ...], result: ref.DriftResult | None, width: int, cut: int) -> torch.Tensor:
    """int64 ``[X, 1 + width]``: for each cluster across ranks whose pivot this rank decides
    (``LayerHeads.shared``), 1 if it drifted and then its ``width`` best positions plus one
    (:func:`_ranked`; 0 pads); zeros for the others (they come from their ranks: the exchange sums)."""
    out = torch.zeros(len(shared), 1 + width, dtype=torch.int64)
    for x, i in enumerate(shared):
        if i >= 0 and bool(result.drift[i]):
            ranked = _ranked(result.latest_scores[i], result.latest_topk[i], width, cut)
            out[x, 0] = 1
            out[x, 1 : 1 + ranked.numel()] = ranked + 1
    return out


def _ranked(scores: torch.Tensor, top: torch.Tensor, width: int, cut: int, ordered: bool = True) -> torch.Tensor:
    """A pivot's ``width`` best positions below ``cut``, best first (equal scores: lower position
    first, as ``ref.topk_positions``), so that any satellite's selection is a prefix of them.
    Taken among its top-K (``top``, ascending, -1 padded) when they are enough, else among the
    positions scoring at least the ``width``-th best (a stable sort of all ``cut`` positions cost
    ~2 ms per drifted pivot of a 32K prompt; the ranking is the same).

    ``ordered=False``, when every satellite takes all ``width``: the same positions, ascending,
    not ranked (the stable sort of 8K top-K scores took 0.5 ms per drift on the document load of
    ``bench_serve.py``, where 88% of the checks drift, 2.8 a decode step; the set, about 0.1 ms)."""
    top = top[top >= 0]
    width = max(0, min(width, cut))
    if not ordered:
        if top.numel() >= width:  # the best of the top-K
            return top[ref.topk_positions(scores[top][None], torch.tensor([width]), torch.tensor([top.numel()]))[0]]
        return ref.topk_positions(scores[None], torch.tensor([width]), torch.tensor([cut]))[0]
    if top.numel() >= width:
        candidates = top
    else:
        kth = torch.topk(scores[:cut], width, sorted=False).values.min()  # the width-th best score
        candidates = torch.nonzero(scores[:cut] >= kth)[:, 0]  # ascending, ties at kth included
    return candidates[torch.sort(-scores[candidates], stable=True).indices[:width]]


def _refill_counts(ls: LayerStep, row: Row, sats) -> list[int]:
    """The refillable slots of each satellite: its budget minus the window."""
    budgets = row.state.budgets
    return [int(budgets.per_head[ls.layer, s]) - budgets.window for s in sats]


def _refill(ls: LayerStep, row: Row, sats, ranked: torch.Tensor) -> None:
    """Queue the copies of the satellites' new selection (each the best of its pivot's ``ranked``
    positions its budget holds, ``ref.refill_indices``) from the host tier into their slots."""
    parts, heads, layer, caches = ls.parts, ls.heads, ls.layer, ls.caches
    state = row.state
    ranked = ranked[ranked >= 0]
    counts = torch.tensor(_refill_counts(ls, row, sats)).clamp(0, ranked.numel())
    width = int(counts.max())
    if width == 0:
        return
    chosen = torch.full((len(sats), width), -1, dtype=torch.int64)
    for n, c in enumerate(counts.tolist()):
        chosen[n, :c] = ranked[:c].sort().values
    kept, compressed = state.kept[layer], [heads.compressed.index(s) for s in sats]
    host, key = parts.host, state.key
    host_rows = [heads.host_rows[s] for s in sats]
    sat_caches = [caches.per_head[s] for s in sats]
    stores = [_store(state, heads, s) for s in sats]
    # this step's rows from each satellite's selection region (slot i: column i // bs of it); the copy runs later
    bs = caches.layouts[sats[0]].block_size
    tables = [caches.tables[s][row.index][start // bs :].clone() for s, (_, start, _) in zip(sats, stores)]
    fronts = state.fronts[layer] if state.fronts is not None else None
    listed = [bool(state.work_template[layer, s, 7] >= 0) for s in sats]  # fronts given as position lists
    groups = [(layout, [sats.index(s) for s in heads]) for layout, heads in caches.by_layout(sats)]  # one copy each

    def copy() -> None:
        """On the refill thread, after this request's and layer's earlier refills: only the
        positions a satellite does not hold yet are copied (none it points at in shared
        blocks), and ``kept`` (and ``fronts``) say so once they are. (Inference mode is per
        thread, and ``kept`` was made in the engine's.)"""
        with torch.inference_mode():
            held = kept[compressed, :width]
            moves = ref.refill_slots(held, chosen, counts)
            out = []  # per satellite, the position each slot of its region gets (-1: none)
            for n, s in enumerate(sats):
                if listed[n]:  # read in place where it can be, a private slot for the rest
                    in_place, start, capacity = stores[n]
                    rows, copies = ref.refill_rows(held[n], moves[n], fronts[s, :width], fronts[s, width:], start,
                                                   in_place, capacity)
                    fronts[s, :width] = rows
                    out.append(copies)
                else:
                    out.append(moves[n])
            copies = torch.full((len(sats), max(1, *(c.numel() for c in out))), -1, dtype=torch.int64)
            for n, c in enumerate(out):
                copies[n, : c.numel()] = c
            for layout, group in groups:
                host.copy_out(key, [host_rows[n] for n in group], copies[group], [sat_caches[n] for n in group],
                              [tables[n] for n in group], layout)
            kept[compressed, :width] = torch.where(moves >= 0, moves, held)

    parts.refills.submit(key, layer, copy)
    parts.counters.refilled_heads += len(sats)
