"""Tensor parallelism: which KV heads a rank holds, and one KV cache layout for all ranks. Pure.

Heads. Each rank holds a contiguous slice of the KV heads (or, when there are more ranks than KV
heads, one replicated head), as vLLM's ``QKVParallelLinear`` splits them.

Caches. HeteroCache gives every KV head a cache of its own, in the pool of its type: the full
pool or a budget class (``runtime.core``). vLLM lays out one set of KV caches, with the same
names and specs, on every rank, but a profile's head types are not spread evenly: with
Llama-3.1-8B at TP=2, rank 0 may hold three full heads of a layer where rank 1 holds one. A
cache can hold a head that keeps less than its pool (a full cache any head, a budget class the
heads of smaller classes), so each layer gets as many caches as a rank has heads, of the pools
that fit every rank's mix (:func:`layer_caches`), and no cache is left empty; what it costs is
compressed heads kept in a full cache or a larger class on the ranks whose mix differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_heterocache.errors import ProfileError


def local_kv_heads(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, ...]:
    """Global indices of the KV heads held by ``tp_rank`` of ``tp_size`` ranks."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel position: rank {tp_rank} of {tp_size}")
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ProfileError(
                f"{num_kv_heads} KV heads cannot be split evenly over tensor_parallel_size={tp_size}"
            )
        n = num_kv_heads // tp_size
        return tuple(range(tp_rank * n, (tp_rank + 1) * n))
    if tp_size % num_kv_heads:
        raise ProfileError(
            f"tensor_parallel_size={tp_size} is not a multiple of the model's {num_kv_heads} KV heads"
        )
    return (tp_rank // (tp_size // num_kv_heads),)


def rank_of_heads(num_kv_heads: int, tp_size: int) -> list[set[int]]:
    """For each global KV head, the set of ranks that hold it."""
    ranks: list[set[int]] = [set() for _ in range(num_kv_heads)]
    for rank in range(tp_size):
        for h in local_kv_heads(num_kv_heads, rank, tp_size):
            ranks[h].add(rank)
    return ranks


FULL_POOL = -1  # the KV pool of full heads; compressed heads are in budget classes 0, 1, ... (larger: more room)


def _room(pool: int) -> float:
    """Pools by how much of a request they keep: a cache can hold a head of its pool or of any
    pool with less room (a full cache holds every token)."""
    return float("inf") if pool == FULL_POOL else pool


@dataclass(frozen=True)
class CacheAssignment:
    """The KV caches of one attention layer, the same on every rank.

    ``pools[c]`` is the pool of cache ``c``; ``cache_of[r][j]`` the cache of local KV head ``j``
    of rank ``r``, of the head's own pool or of one with more room. When every rank holds the
    same pools in the same order, head ``j`` is cache ``j`` everywhere.
    """

    pools: tuple[int, ...]
    cache_of: tuple[tuple[int, ...], ...]

    def moved(self, rank: int, head_pools: tuple[int, ...]) -> tuple[int, int]:
        """Of rank ``rank``'s heads (pools ``head_pools``): how many compressed ones sit in a full
        cache (their KV is not reduced), and in a larger budget class."""
        to_full = to_class = 0
        for pool, c in zip(head_pools, self.cache_of[rank]):
            if self.pools[c] != pool:
                to_full += self.pools[c] == FULL_POOL
                to_class += self.pools[c] != FULL_POOL
        return to_full, to_class


def layer_caches(pools_by_rank: Sequence[tuple[int, ...]]) -> CacheAssignment:
    """The caches of a layer whose rank ``r`` holds local heads of pools ``pools_by_rank[r]``
    (each rank as many).

    Uneven ranks: for every pool ``p``, the caches with at least ``p``'s room are as many as the
    most heads any rank has with at least that room; a rank's heads, most room first, take the
    caches in that order. No cache is left empty, full heads get full caches, and a compressed
    head lands in a cache with room for it (a larger class, or a full cache, when its rank has
    fewer heads of its own pool than another rank has).
    """
    first = tuple(pools_by_rank[0])
    if all(tuple(p) == first for p in pools_by_rank):
        return CacheAssignment(first, tuple(tuple(range(len(first))) for _ in pools_by_rank))
    kinds = sorted({p for pools in pools_by_rank for p in pools}, key=_room, reverse=True)
    layout: list[int] = []
    for kind in kinds:
        at_least = max(sum(_room(p) >= _room(kind) for p in pools) for pools in pools_by_rank)
        layout += [kind] * (at_least - len(layout))
    cache_of = []
    for pools in pools_by_rank:
        order = sorted(range(len(pools)), key=lambda j: _room(pools[j]), reverse=True)  # stable
        slots = [0] * len(pools)
        for c, j in enumerate(order):
            slots[j] = c
        cache_of.append(tuple(slots))
    return CacheAssignment(tuple(layout), tuple(cache_of))


def model_caches(pool_of: Callable[[int, int], int], num_layers: int, num_kv_heads: int,
                 tp_size: int) -> list[CacheAssignment]:
    """:func:`layer_caches` of every layer; ``pool_of(layer, global_head)`` names a head's pool."""
    ranks = [local_kv_heads(num_kv_heads, r, tp_size) for r in range(tp_size)]
    return [layer_caches([tuple(pool_of(layer, h) for h in heads) for heads in ranks]) for layer in range(num_layers)]


def sharing_summary(pool_of: Callable[[int, int], int], caches: Sequence[CacheAssignment], num_kv_heads: int,
                    tp_size: int) -> str:
    """One line: how many compressed heads (over all ranks and layers) are served from a cache
    with more room than their own pool, the price of one cache layout for all ranks."""
    to_full = to_class = 0
    for r in range(tp_size):
        heads = local_kv_heads(num_kv_heads, r, tp_size)
        for layer, lc in enumerate(caches):
            f, k = lc.moved(r, tuple(pool_of(layer, h) for h in heads))
            to_full, to_class = to_full + f, to_class + k
    total = len(caches) * len(caches[0].cache_of[0]) * tp_size
    if not to_full + to_class:
        return f"tensor_parallel_size={tp_size}: every head is in a cache of its own pool"
    return (
        f"tensor_parallel_size={tp_size}: of the {total} (layer, KV head, rank) caches, {to_full} hold a compressed "
        f"head in a full cache (its KV is not reduced) and {to_class} one in a larger budget class, because "
        "ranks hold different mixes of head types and vLLM needs one cache layout on every rank"
    )


def away_from_pivot(cluster, holders: list[set[int]]) -> list[int]:
    """The satellites of a pivot cluster not held by exactly its pivot's ranks (``holders``:
    :func:`rank_of_heads`); a cluster with any crosses ranks."""
    return [s for s in cluster.satellites if holders[s] != holders[cluster.pivot]]


def clusters_across(clusters, holders: list[set[int]]) -> tuple[list, list]:
    """``clusters`` split into those inside their pivot's ranks and those across ranks (sorted by
    pivot: every rank lists them in the same order, for the exchange of their drift decisions)."""
    inside = [c for c in clusters if not away_from_pivot(c, holders)]
    across = sorted((c for c in clusters if away_from_pivot(c, holders)), key=lambda c: c.pivot)
    return inside, across


def crossing_clusters(profile, tp_size: int) -> list[str]:
    """The profile's pivot clusters whose satellites are not all on their pivot's ranks."""
    holders = rank_of_heads(profile.num_kv_heads, tp_size)
    return [f"layer {c.layer} pivot {c.pivot} -> satellites {away}"
            for c in profile.clusters if (away := away_from_pivot(c, holders))]
