"""Pure-PyTorch reference operations of HeteroCache (the oracle for kernels and the backend).

Conventions (shared with the kernels):

- GQA: query head ``q`` reads KV head ``q // G`` with ``G = Hq // Hkv`` (vLLM/HF order).
- Index sets are int64 tensors padded on the right with ``-1``; valid entries are ascending
  positions. Ties in scores go to the LOWER position (deterministic).
- Scores are attention probabilities in float32: softmax(q k^T / sqrt(D)) per query head,
  averaged over the queries of one step (or window), average-pooled over positions with an odd
  ``pool_kernel`` (stride 1, zero-free edges: ``count_include_pad=False``), then reduced over the
  GQA group by max.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vllm_heterocache.taxonomy import median

PAD = -1


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool ``[..., T]`` scores over positions (odd ``kernel``; 1 = identity), as
    ``F.avg_pool1d(..., stride=1, padding=kernel // 2, count_include_pad=False)``: a sum of the
    ``kernel`` shifted copies, divided by the positions each window covers (the CPU's avg_pool1d
    took 0.20 ms for 8 x 3.3K scores, this 0.09 ms)."""
    t = scores.shape[-1]
    if kernel == 1 or t == 0:
        return scores
    half = kernel // 2
    padded = F.pad(scores, (half, half))
    total = padded[..., :t].clone()
    for i in range(1, kernel):
        total += padded[..., i : i + t]
    at = torch.arange(t)
    covered = (at + half).clamp_(max=t - 1) - (at - half).clamp_(min=0) + 1
    return total.div_(covered.to(total.dtype))


def gqa_max(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[Hq, T]`` per-query-head scores -> ``[Hkv, T]``, max over each GQA group."""
    hq, t = scores.shape
    return scores.reshape(num_kv_heads, hq // num_kv_heads, t).amax(dim=1)


# prefill_scores computes logits up to SCORE_WHOLE_BYTES in one piece (they stay in the
# last-level cache: the same time as chunks at 8K keys x 8 heads), larger ones in chunks of keys
# of about SCORE_CHUNK_BYTES (all queries).
SCORE_WHOLE_BYTES = 16 << 20
SCORE_CHUNK_BYTES = 2 << 20


def prefill_scores(query: torch.Tensor, key: torch.Tensor, pool_kernel: int = 5) -> torch.Tensor:
    """Token importance of a prompt for each KV head, from its last queries.

    Args:
        query: ``[W, Hq, D]``, the queries of the last W prompt positions (L-W .. L-1).
        key: ``[L, Hkv, D]``, the prompt's keys (after RoPE, as cached); any strides, fastest
            as a view of head-major keys (``[Hkv, L, D]`` transposed: each head's ``[L, D]``
            contiguous, the matrix product's fast layout).
        pool_kernel: odd width of the positional average pooling.

    Returns:
        float32 ``[Hkv, L]``: softmax attention (causal: query i sees keys <= L-W+i) averaged over
        the W queries, pooled, max over the GQA group.

    The logits are the largest tensor of a long prompt's selection (W x L per query head). Up to
    ``SCORE_WHOLE_BYTES`` of them (32 queries of 8 heads over 16K keys) are one piece, normalized
    by torch's fused softmax and summed over the W queries: at 32 queries of 8 heads over 3.3K
    keys, 0.7 ms after the logits' 1.0 ms, against 1.4 ms for exponentials taken in place and a
    weighted sum. Beyond that they are computed in chunks of keys, each chunk's exponentials taken
    in place against its own row maxima while it is in cache, and the softmax's normalization
    and the mean over the W queries are one weighted sum over them, whose weights also rescale
    each chunk's maxima to its rows'. 32 queries of 9 heads over 32K keys took 27 instead of 46
    ms with glibc's allocator (the one piece, 38 MiB, is mapped afresh and faulted in at each
    call), and 26 instead of 31 ms with an allocator that keeps its memory.
    """
    w, hq, d = query.shape
    length, hkv, _ = key.shape
    q, keys = window_operands(query, key)
    per_key = 4 * hq * max(1, w)  # bytes of logits per key
    if per_key * length <= SCORE_WHOLE_BYTES:  # one piece: torch's fused softmax, then the mean
        logits = _window_logits(q, keys, 0, length, hq, w)
        # in place (torch's CPU softmax reads each element before writing it; the brute-force
        # test of this path checks it): a second piece of that size would be faulted in afresh
        # at each call when the allocator returns it (glibc: 3.9 instead of 1.9 ms a call)
        probs = torch.softmax(logits, dim=-1, out=logits).sum(dim=1).div_(max(1, w))  # [Hq, L]
        return gqa_max(pool_scores(probs, pool_kernel), hkv)
    chunk = max(256, SCORE_CHUNK_BYTES // per_key)
    bounds = [(c0, min(length, c0 + chunk)) for c0 in range(0, length, chunk)]
    exps, maxima, sums = [], [], []
    for c0, c1 in bounds:
        logits = _window_logits(q, keys, c0, c1, hq, w)  # [Hq, W, C]
        m = logits.amax(dim=-1, keepdim=True)  # [Hq, W, 1]; -inf where a query sees no key of the chunk
        exps.append(logits.sub_(m.clamp(min=torch.finfo(torch.float32).min)).exp_())  # (those rows: 0)
        maxima.append(m)
        sums.append(exps[-1].sum(dim=-1, keepdim=True))
    # [chunks, Hq, W, 1]: each chunk's maxima against its rows', then
    # the weights rescale / (W * the row's softmax denominator)
    maxima_ = torch.stack(maxima)
    rescale = (maxima_ - maxima_.amax(dim=0)).exp_()
    weights = rescale.div_((torch.stack(sums) * rescale).sum(dim=0) * w).unbind(0)
    probs = torch.empty(hq, 1, length)  # the mean over the W queries of each softmax
    for (c0, c1), exp, weight in zip(bounds, exps, weights):
        torch.bmm(weight.transpose(1, 2), exp, out=probs[:, :, c0:c1])
    return gqa_max(pool_scores(probs.view(hq, length), pool_kernel), hkv)


def window_operands(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefill_scores`'s ``query`` and ``key`` as the factors of its logits: float32
    ``[Hkv, G*W, D]`` queries scaled by 1/sqrt(D) (row ``g * W + w``: query head ``g`` of the KV
    head's group, window query ``w``) and ``[Hkv, D, L]`` keys (a view)."""
    w, hq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    q = (query.float() / d**0.5).view(w, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * w, d)
    return q, key.float().permute(1, 2, 0)


def _window_logits(q: torch.Tensor, keys: torch.Tensor, c0: int, c1: int, hq: int, w: int) -> torch.Tensor:
    """``[Hq, W, c1 - c0]``: the logits of ``prefill_scores``'s queries (``q``, ``[Hkv, G*W, D]``)
    for keys ``c0 .. c1 - 1`` (``keys``, ``[Hkv, D, L]``), causal: query i, at position L-W+i,
    sees keys <= L-W+i (-inf at the others)."""
    length, n = keys.shape[2], c1 - c0
    logits = torch.bmm(q, keys[:, :, c0:c1]).view(hq, w, n)
    if c1 > length - w:  # columns of the window's positions: masked above the diagonal
        lo = max(c0, length - w)
        logits[..., lo - c0 :].masked_fill_(torch.ones(w, c1 - lo, dtype=torch.bool).triu(1 - (lo - (length - w))),
                                            float("-inf"))
    return logits


def topk_positions(scores: torch.Tensor, counts: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """The ``counts[i]`` highest-scoring positions among the first ``limits[i]`` of each row.

    Args:
        scores: float ``[N, T]``.
        counts: int64 ``[N]``, how many to take (clamped to ``limits``).
        limits: int64 ``[N]``, only positions ``< limits[i]`` are candidates.

    Returns:
        int64 ``[N, max(counts)]``, ascending positions, padded with -1.
    """
    n, t = scores.shape
    counts = torch.minimum(counts, limits).clamp_min(0)
    width = int(counts.max()) if n else 0
    out = torch.full((n, width), PAD, dtype=torch.int64)
    for i in range(n):
        c = int(counts[i])
        if c == 0:
            continue
        if c == int(limits[i]):  # every candidate
            out[i, :c] = torch.arange(c)
            continue
        row = scores[i, : int(limits[i])].float()
        kth = torch.topk(row, c, sorted=False).values.min()  # the c-th highest score
        chosen = row > kth
        ties = torch.nonzero(row == kth)[: c - int(chosen.sum()), 0]  # ties: lower positions first
        chosen[ties] = True
        out[i, :c] = torch.nonzero(chosen)[:, 0]
    return out


def select_tokens(scores: torch.Tensor, budgets: torch.Tensor, window: int) -> torch.Tensor:
    """Prefill selection: each head keeps its last ``window`` positions plus its top-scoring rest.

    Args:
        scores: float ``[Hkv, L]`` from :func:`prefill_scores`.
        budgets: int64 ``[Hkv]``, tokens each head keeps (window included; ``L`` keeps all).
        window: recent positions always kept (clamped to L).

    Returns:
        int64 ``[Hkv, max(budgets)]`` ascending positions, -1 padded.
    """
    h, length = scores.shape
    window = min(window, length)
    budgets = budgets.clamp(max=length)
    head = topk_positions(
        scores,
        (budgets - window).clamp_min(0),
        torch.full((h,), length - window, dtype=torch.int64),
    )
    out = torch.full((h, int(budgets.max()) if h else 0), PAD, dtype=torch.int64)
    recent = torch.arange(length - window, length)
    for i in range(h):
        chosen = head[i][head[i] >= 0]
        keep = torch.cat([chosen, recent[: max(0, int(budgets[i]) - chosen.numel())]])
        out[i, : keep.numel()] = keep
    return out


def recent_tokens(budgets: torch.Tensor, length: int, sinks: int) -> torch.Tensor:
    """StreamingLLM's selection: each head keeps the first ``sinks`` positions (attention sinks)
    and its most recent others.

    Args:
        budgets: int64 ``[Hkv]``, tokens each head keeps (``length`` keeps all).
        length: L, the prompt length.
        sinks: first positions kept (the rest of the budget is the most recent positions).

    Returns:
        int64 ``[Hkv, max(budgets)]`` ascending positions, -1 padded (as :func:`select_tokens`).
    """
    budgets = budgets.clamp(0, length)
    out = torch.full((budgets.numel(), int(budgets.max()) if budgets.numel() else 0), PAD, dtype=torch.int64)
    for i, b in enumerate(budgets.tolist()):
        front = min(sinks, b)
        out[i, :b] = torch.cat([torch.arange(front), torch.arange(length - (b - front), length)])
    return out


def overlap_coefficient(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A n B| / min(|A|, |B|) of -1-padded index sets ``[..., Ka]`` and ``[..., Kb]`` -> ``[...]``.

    Two empty sets overlap 1 (nothing drifted)."""
    va, vb = a >= 0, b >= 0
    hit = ((a[..., :, None] == b[..., None, :]) & vb[..., None, :]).any(-1) & va
    size = torch.minimum(va.sum(-1), vb.sum(-1))
    inter = hit.sum(-1).float()
    return torch.where(size > 0, inter / size.clamp_min(1).float(), torch.ones_like(inter))


class DriftResult(NamedTuple):
    drift: torch.Tensor  # bool [P]
    median_overlap: torch.Tensor  # float32 [P]
    latest_topk: torch.Tensor  # int64 [P, max K], -1 padded: top-K of the last buffered step
    latest_scores: torch.Tensor  # float32 [P, T]: pooled, GQA-maxed scores of the last step


def drift_check(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_lens: torch.Tensor,
    candidates: torch.Tensor,
    reference: torch.Tensor,
    topk: torch.Tensor,
    threshold: float,
    pool_kernel: int = 5,
) -> DriftResult:
    """Drift decision for a batch of P pivots (algorithm.md section 4).

    Args:
        queries: ``[P, N, G, D]``, each pivot's buffered queries of its G query heads over the
            last N decode steps.
        keys: ``[P, T, D]``, each pivot's keys (padded on the right to a common T).
        key_lens: int64 ``[P]``: valid keys of each pivot; the softmax runs over them.
        candidates: int64 ``[P]``, ``<= key_lens``: only positions ``< candidates[p]`` (the
            retrievable tokens) enter the top-K sets.
        reference: int64 ``[P, K]``, -1 padded: each pivot's reference top-K set.
        topk: int64 ``[P]``: K per pivot.
        threshold: drift when the median overlap over the N steps is below it.

    Returns:
        :class:`DriftResult`.
    """
    p, n, g, d = queries.shape
    t = keys.shape[1]
    logits = torch.einsum("pngd,ptd->pngt", queries.float(), keys.float()) / d**0.5
    pos = torch.arange(t)
    valid = pos[None, :] < key_lens[:, None]  # [P, T]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)  # a pivot with no keys: zeros
    scores = pool_scores(probs, pool_kernel).amax(dim=2)  # [P, N, T]
    overlaps = torch.empty(p, n)
    latest = None
    for step in range(n):
        cur = topk_positions(scores[:, step], topk, candidates)
        overlaps[:, step] = overlap_coefficient(cur, reference)
        latest = cur
    med = median(overlaps, dim=-1)
    return DriftResult(med < threshold, med, latest, scores[:, -1])


def refill_indices(pivot_scores: torch.Tensor, counts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Which positions a satellite's budget slots get after its pivot drifted.

    Args:
        pivot_scores: float ``[S, T]``: for each satellite, its pivot's latest scores.
        counts: int64 ``[S]``: refillable slots of each satellite (budget minus window).
        candidates: int64 ``[S]``: retrievable positions are ``< candidates`` (prompt minus window).

    Returns:
        int64 ``[S, max(counts)]`` ascending positions, -1 padded.
    """
    return topk_positions(pivot_scores, counts, candidates)


def refill_slots(held: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Which budget slots a refill rewrites: a satellite keeps the chosen positions it already
    holds where they are, and writes the others into the slots of the positions it drops.

    Args:
        held: int64 ``[S, W]``: the position each slot of a satellite holds (-1: none); only
            slots ``i < counts[s]`` are refillable (the window and beyond are not).
        chosen: int64 ``[S, W]``: the new selection (:func:`refill_indices`), -1 padded.
        counts: int64 ``[S]``: refillable slots of each satellite.

    Returns:
        int64 ``[S, W]``: the position slot ``i`` gets, or -1 where the slot keeps what it holds.
        Afterwards the refillable slots hold every chosen position once; when fewer are chosen
        than there are slots, the slots left over keep positions of the old selection.
    """
    s, w = chosen.shape
    refillable = torch.arange(w) < counts[:, None]
    old = torch.where(refillable, held, -1)
    span = int(max(old.max(), chosen.max())) + 2

    def members(positions: torch.Tensor) -> torch.Tensor:  # [S, span]: column p + 1 set when p is in the row
        return torch.zeros(s, span, dtype=torch.bool).scatter_(1, positions + 1, True)

    stays = members(chosen).gather(1, old + 1) & (old >= 0)
    new = ~members(old).gather(1, chosen + 1) & (chosen >= 0)
    free = refillable & ~stays
    out = torch.full_like(chosen, -1)
    for r in range(s):  # the k-th new position goes to the k-th free slot (there are at least as many)
        positions = chosen[r][new[r]]
        out[r, torch.nonzero(free[r])[: positions.numel(), 0]] = positions
    return out



def refill_rows(held: torch.Tensor, moves: torch.Tensor, rows: torch.Tensor, others: torch.Tensor, start: int,
                shared_len: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a satellite whose selection points into shared prompt blocks reads each slot after a
    refill, and which slots of its private region get which prompt position.

    A slot ``i`` of such a satellite (``RequestState.fronts``) is read at row position
    ``rows[i]``: a position below ``shared_len`` in place (a shared block), else a slot of its
    private region (row positions ``start .. start + capacity - 1``). After :func:`refill_slots`
    says which slots change to which position, a slot that now holds a shared position points at
    it (nothing is copied), and one that holds another position gets a free private slot (one
    no unchanged slot uses), into which the position is copied.

    Args:
        held: int64 ``[W]``: the position each slot holds (-1: none).
        moves: int64 ``[W]``: :func:`refill_slots`'s row for the satellite (-1: unchanged).
        rows: int32 ``[W]``: the row position each slot is read at (-1: none).
        others: int32 ``[n]``: the row positions of the satellite's other slots (the window's,
            never refilled), whose private slots stay theirs.

    Returns:
        ``(rows, copies)``: int32 ``[W]`` the slots' new row positions, and int64 ``[capacity]``
        the prompt position each private slot gets copied (-1: none).
    """
    changed = moves >= 0
    position = torch.where(changed, moves, held)
    private = position >= shared_len
    kept = ~changed & (rows >= start)  # unchanged slots that keep their private slot
    used = torch.zeros(capacity, dtype=torch.bool)
    used[rows[kept].long() - start] = True
    used[others[others >= start].long() - start] = True
    need = changed & private
    slots = torch.nonzero(~used)[: int(need.sum()), 0]
    if slots.numel() < int(need.sum()):
        raise RuntimeError("heterocache: a refill needs more private slots than its region holds (a bug)")
    out = torch.where(changed, position, rows.long())
    out[need] = start + slots
    copies = torch.full((capacity,), -1, dtype=torch.int64)
    copies[slots] = position[need]
    return out.to(torch.int32), copies


def subset_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention where every KV head attends only to its own token subset.

    Args:
        query: ``[B, Hq, D]``, one new query per sequence.
        key: ``[B, T, Hkv, D]``, value: ``[B, T, Hkv, Dv]``, padded on T.
        indices: int64 ``[B, Hkv, S]``, -1 padded positions each head attends to.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, Hq, Dv]`` in the query's dtype, computed in float32; a head with an empty subset
        outputs zeros.
    """
    b, hq, d = query.shape
    t, hkv = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    mask = torch.zeros(b, hkv, t + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(indices >= 0, indices, t), True)
    mask = mask[..., :t].repeat_interleave(g, dim=1)  # [B, Hq, T]
    k = key.float().repeat_interleave(g, dim=2)  # [B, T, Hq, D]
    v = value.float().repeat_interleave(g, dim=2)
    logits = torch.einsum("bhd,bthd->bht", query.float(), k) * scale
    probs = torch.nan_to_num(logits.masked_fill(~mask, float("-inf")).softmax(-1), nan=0.0)
    return torch.einsum("bht,bthd->bhd", probs, v).to(query.dtype)
