"""Head taxonomy from attention top-k sets (algorithm.md section 1). Pure math, no model code.

Inputs are index sets of the top-k attended context positions of each KV head:

- ``prefill_topk``: int64 ``[H, k]``, the set at the end of prefill;
- ``decode_topk``:  int64 ``[T, H, k]``, the set at each of T decode steps.

Definitions (O = overlap coefficient, |A n B| / min(|A|, |B|)):

- stability S(h)    = median_t O(K_t(h), K_prefill(h))
- similarity(i, j)  = O(K_late(i), K_late(j)) at a late decode step
- clusters          = greedy star clustering of the graph similarity >= tau_sim, per layer
- types             = pivot / satellite for cluster leaders / members; unclustered heads are
                      anchor if S >= tau_stable else volatile
- budget ratios     = w(h) / sum(w) * n_compressed with w(h) = 1 / (S(h) + eps), over the
                      anchor and satellite heads of the whole model (they average 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_heterocache.head_profile.schema import Cluster, HeadType

#: eps of the inverse-stability weight 1 / (S + eps). Keeps a head with S = 0 finite: its weight
#: is then at most 1 / eps = 100 times that of a perfectly stable head.
RATIO_EPS = 1e-2


def median(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Median along ``dim``, the mean of the two middle values for an even count (as numpy)."""
    n = values.shape[dim]
    s = values.sort(dim=dim).values
    lo = s.narrow(dim, (n - 1) // 2, 1)
    hi = s.narrow(dim, n // 2, 1)
    return ((lo + hi) / 2).squeeze(dim)


def _membership(topk: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., k]`` index sets -> ``[..., length]`` bool masks."""
    mask = torch.zeros(*topk.shape[:-1], length, dtype=torch.bool, device=topk.device)
    return mask.scatter_(-1, topk, True)


def overlap_matrix(topk: torch.Tensor, length: int) -> torch.Tensor:
    """Pairwise overlap coefficients of ``H`` index sets ``[H, k]`` -> float32 ``[H, H]``."""
    m = _membership(topk, length).float()
    inter = m @ m.T
    size = m.sum(-1)
    return inter / torch.minimum(size[:, None], size[None, :]).clamp_min(1)


def stability_scores(prefill_topk: torch.Tensor, decode_topk: torch.Tensor, length: int) -> torch.Tensor:
    """S(h) for ``prefill_topk`` ``[H, k]`` and ``decode_topk`` ``[T, H, k]`` -> float32 ``[H]``.

    ``length`` bounds the indices (the prompt length).
    """
    ref = _membership(prefill_topk, length)  # [H, L]
    cur = _membership(decode_topk, length)  # [T, H, L]
    inter = (cur & ref).sum(-1).float()  # [T, H]
    size = torch.minimum(cur.sum(-1), ref.sum(-1)).clamp_min(1).float()
    return median(inter / size, dim=0)


def star_clusters(
    similarity: torch.Tensor, tau_sim: float, groups: Sequence[int] | None = None
) -> list[tuple[int, tuple[int, ...]]]:
    """Greedy star clustering of one layer's heads.

    Heads i != j are adjacent when ``similarity[i, j] >= tau_sim`` (and, if ``groups`` is given,
    ``groups[i] == groups[j]``: used to keep clusters inside one tensor-parallel rank). Repeatedly
    the unassigned head with the most unassigned neighbours (ties: lowest index) becomes a pivot
    and its unassigned neighbours its satellites, until the best degree is 0.

    Returns ``[(pivot, satellites), ...]`` in the order the pivots were picked.
    """
    h = similarity.shape[0]
    adj = (similarity >= tau_sim) & ~torch.eye(h, dtype=torch.bool)
    if groups is not None:
        g = torch.as_tensor(list(groups))
        adj &= g[:, None] == g[None, :]
    free = torch.ones(h, dtype=torch.bool)
    out = []
    while True:
        degree = (adj & free[None, :] & free[:, None]).sum(-1)
        best = int(torch.argmax(degree))  # argmax returns the first maximum: lowest index wins
        if degree[best] == 0:
            return out
        sats = tuple(int(j) for j in torch.nonzero(adj[best] & free).flatten())
        out.append((best, sats))
        free[best] = False
        free[list(sats)] = False


def classify(
    stability: torch.Tensor,
    similarity: torch.Tensor,
    tau_stable: float,
    tau_sim: float,
    groups: Sequence[int] | None = None,
) -> tuple[list[list[HeadType]], list[Cluster]]:
    """Types and clusters for all layers.

    ``stability``: float ``[L, H]``; ``similarity``: float ``[L, H, H]``.
    """
    types: list[list[HeadType]] = []
    clusters: list[Cluster] = []
    for layer in range(stability.shape[0]):
        row = [
            HeadType.ANCHOR if float(s) >= tau_stable else HeadType.VOLATILE for s in stability[layer]
        ]
        for pivot, sats in star_clusters(similarity[layer], tau_sim, groups):
            row[pivot] = HeadType.PIVOT
            for s in sats:
                row[s] = HeadType.SATELLITE
            clusters.append(Cluster(layer, pivot, tuple(sorted(sats))))
        types.append(row)
    return types, sorted(clusters, key=lambda c: (c.layer, c.pivot))


def budget_ratios(
    types: Sequence[Sequence[HeadType]], stability: torch.Tensor, eps: float = RATIO_EPS
) -> list[list[float | None]]:
    """Inverse-stability budget ratios of the compressed heads; None for full heads.

    ``stability``: float ``[L, H]``. Ratios average 1 over all compressed heads of the model.
    """
    weights = {
        (l, h): 1.0 / (float(stability[l, h]) + eps)
        for l, row in enumerate(types)
        for h, t in enumerate(row)
        if not t.is_full
    }
    total = sum(weights.values())
    n = len(weights)
    return [
        [weights[(l, h)] / total * n if (l, h) in weights else None for h in range(len(row))]
        for l, row in enumerate(types)
    ]
