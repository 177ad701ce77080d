"""The pivots' recent decode queries, which their drift checks score (algorithm.md section 4).

One tensor per layer holds every tracked request's ring::

    ring[layer]  float32 [slots, P_l, N, G, D]

``P_l``: the layer's local pivots; ``N``: ``drift_interval``; ``G``: query heads per KV head. When
refills are on and some layer has pivots, a request that compresses holds one slot from its
admission until it finishes; its decode queries fill places ``0 .. N - 1`` in order
(``RequestState.buffered`` counts them, the same in every layer), and the check runs when place
``N - 1`` is written, so a full ring holds the last N queries oldest first. One tensor per layer
lets a step buffer the queries of all its decoding rows with one indexed copy per layer
(``runtime.step.DriftPhase``).

Free slots are handed out last released first (fresh ones lowest first); the tensors grow
(doubling) when every slot is taken; a layer's tensor is (re)allocated when the layer next asks
for it, keeping what it held.
"""

from __future__ import annotations

import torch


class QueryRings:
    def __init__(self, pivots_per_layer: list[int], interval: int):
        self.interval = interval
        self._pivots = pivots_per_layer
        self._rings: list[torch.Tensor | None] = [None] * len(pivots_per_layer)
        self._capacity = 0
        self._free: list[int] = []  # a stack: released slots on top, fresh ones lowest first
        self._slots: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def acquire(self, key: str) -> int:
        """A slot for request ``key`` (which must not hold one)."""
        if key in self._slots:
            raise RuntimeError(f"query rings: request {key!r} already holds slot {self._slots[key]}")
        if not self._free:
            grown = max(8, 2 * self._capacity)
            self._free = list(range(grown - 1, self._capacity - 1, -1))
            self._capacity = grown
        slot = self._slots[key] = self._free.pop()
        return slot

    def release(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot)

    def of_layer(self, layer: int, group: int, head_size: int) -> torch.Tensor:
        """Layer ``layer``'s rings ``[slots, P, N, G, D]``, at least as many slots as handed out."""
        ring = self._rings[layer]
        if ring is None or ring.shape[0] < self._capacity:
            grown = torch.zeros(self._capacity, self._pivots[layer], self.interval, group, head_size)
            if ring is not None:
                grown[: ring.shape[0]] = ring
            self._rings[layer] = ring = grown
        return ring
