"""The local KV heads of each layer by role, on one tensor-parallel rank (built once per engine).

Which heads keep their full KV and which a budget, which pivots track drift for which
satellites -- inside this rank, or for clusters whose satellites sit on other ranks
(``sharding.clusters_across``), whose drift decisions are exchanged -- and which host-tier row
mirrors each satellite's prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_heterocache.head_profile.schema import HeadProfile, HeadType
from vllm_heterocache.sharding import FULL_POOL, CacheAssignment, clusters_across, rank_of_heads


@dataclass(frozen=True)
class LayerHeads:
    """The local KV heads of one layer by role (indices are local to this TP rank).

    ``pool[j]``: the KV pool of local head ``j``: ``FULL_POOL``, or the budget class of a
    compressed head (``HeteroCacheRuntime.capacities``). ``cache_of[j]``: the layer's KV cache
    that holds it, of ``cache_pools`` (the layer's caches, the same on every rank: on a rank
    whose mix of pools differs from another's, a compressed head may sit in a cache with more
    room than its pool, ``sharding``).
    """

    full: tuple[int, ...]
    compressed: tuple[int, ...]
    pivots: tuple[int, ...]
    satellites: dict[int, tuple[int, ...]]  # local pivot -> its satellites (clusters inside this rank)
    host_rows: dict[int, int]  # local satellite -> its row in the host tier
    pool: tuple[int, ...]
    cache_of: tuple[int, ...]
    cache_pools: tuple[int, ...]
    # Clusters across ranks (the same list on every rank, by pivot): their drift decisions and
    # refill positions are exchanged (``runtime.layer.track_drift``). ``shared[x]``: the index in
    # ``pivots`` of cluster x's pivot if this rank decides for it (the lowest rank holding it),
    # else -1; ``shared_satellites[x]``: cluster x's satellites on this rank.
    shared: tuple[int, ...] = ()
    shared_satellites: tuple[tuple[int, ...], ...] = ()

    @property
    def store(self) -> tuple[int, ...]:
        """Local head ``j``'s store: the pool of the cache that holds it (``cache_pools[cache_of[j]]``;
        its own pool, or with tensor parallelism one with more room). The store's layout decides
        where the head's tokens are (``placement``)."""
        return tuple(self.cache_pools[c] for c in self.cache_of)


def layer_heads(roles: HeadProfile, heads: tuple[int, ...], pool_of: Callable[[int, int], int],
                caches: list[CacheAssignment], tp_rank: int, tp_size: int, *, host_rows: bool,
                ) -> tuple[list[LayerHeads], int, list[tuple[tuple[int, ...], ...]]]:
    """Every layer's :class:`LayerHeads` on rank ``tp_rank``.

    Args:
        roles: the policy's roles of the profile's heads (``policies``).
        heads: the global KV heads this rank holds (``sharding.local_kv_heads``).
        pool_of: ``(layer, global KV head)`` -> its pool (``Budgeter.pools``).
        caches: per layer, its KV caches on every rank (``sharding.model_caches``).
        host_rows: refills are on: satellites get host-tier rows (only refills read them).

    Returns:
        The layers' heads, the host-tier rows in all, and per layer, for each pivot cluster across
        ranks (by pivot), its satellites (global KV heads).
    """
    local = {g: j for j, g in enumerate(heads)}
    holders = rank_of_heads(roles.num_kv_heads, tp_size)
    layers: list[LayerHeads] = []
    across_satellites = []
    rows = 0
    for layer, types in enumerate(roles.head_types):
        pool = tuple(pool_of(layer, g) for g in heads)
        pivots = tuple(j for j, g in enumerate(heads) if types[g] is HeadType.PIVOT)
        inside, across = clusters_across(roles.clusters_of_layer(layer), holders)
        sats = {local[c.pivot]: tuple(local[s] for s in c.satellites) for c in inside if c.pivot in local}
        shared_sats = tuple(tuple(local[s] for s in c.satellites if s in local) for c in across)
        across_satellites.append(tuple(c.satellites for c in across))
        rows_of = {}
        for s in sorted({h for group in (*sats.values(), *shared_sats) for h in group}) if host_rows else ():
            rows_of[s], rows = rows, rows + 1
        layers.append(LayerHeads(
            full=tuple(j for j, p in enumerate(pool) if p == FULL_POOL),
            compressed=tuple(j for j, p in enumerate(pool) if p != FULL_POOL),
            pivots=pivots,
            satellites=sats,
            host_rows=rows_of,
            pool=pool,
            cache_of=caches[layer].cache_of[tp_rank],
            cache_pools=caches[layer].pools,
            shared=tuple(pivots.index(local[c.pivot]) if min(holders[c.pivot]) == tp_rank else -1 for c in across),
            shared_satellites=shared_sats,
        ))
    return layers, rows, across_satellites
