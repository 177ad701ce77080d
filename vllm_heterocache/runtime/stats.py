"""What one runtime (one tensor-parallel rank) counts, and its snapshot for the metrics.

The runtime's counters only grow; the snapshot (:func:`snapshot`) is a plain JSON-able dict of
counters, gauges and histograms, which the vLLM adapter publishes for the server's ``/metrics``
(``vllm_adapter.metrics``) and writes in the engine log's stats line. Pure layer: no vLLM import.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass

# Refill waits: from a copy that is already done (microseconds) to one that stalls a step.
REFILL_WAIT_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
# The fraction of its prompt KV a request keeps (1: all of it), per policy.
KEPT_FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)


@dataclass
class Counters:
    prefill_selections: int = 0  # prompts whose compressed heads kept a selection
    prefix_cache_hit_tokens: int = 0  # prompt tokens of compressed heads that came from vLLM's prefix cache
    drift_checks: int = 0  # (request, layer) checks of a layer's pivots
    drifts: int = 0  # pivots found drifted
    refilled_heads: int = 0  # satellite refills queued
    refill_failures: int = 0  # refill copies that failed (their request went on without refills)


class Histogram:
    """Observations in cumulative buckets (upper bounds ``bounds``, then +Inf), as Prometheus
    histograms count them."""

    def __init__(self, bounds: tuple[float, ...]):
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase, got {bounds}")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def cumulative(self) -> list[int]:
        """Observations ``<= bounds[i]`` for each bound, then the total (the +Inf bucket)."""
        out, total = [], 0
        for n in self._counts:
            total += n
            out.append(total)
        return out

    def to_dict(self) -> dict:
        return {"bounds": list(self.bounds), "cumulative": self.cumulative(), "sum": self.sum}


def snapshot(rt) -> dict:
    """The runtime's counters and gauges (``rt``: a ``HeteroCacheRuntime``)::

        {"counters": {name: int}, "gauges": {name: int}, "histograms": {name: Histogram.to_dict()},
         "by_policy": {"request_kept_fraction": {policy: Histogram.to_dict()}}}

    Host-tier entries are present only when the runtime has a host tier.
    """
    counters = asdict(rt.counters)
    gauges = {"requests": len(rt.requests), "refills_pending": len(rt.refills)}
    if rt.host is not None:
        s = rt.host.stats
        counters |= {"host_tier_bytes_in": s.bytes_in, "host_tier_bytes_out": s.bytes_out,
                     "host_tier_rejections": s.rejected}
        gauges |= {"host_tier_blocks_used": rt.host.used_blocks, "host_tier_blocks_total": rt.host.num_blocks}
    return {"counters": counters, "gauges": gauges, "histograms": {"refill_wait_seconds": rt.refills.waits.to_dict()},
            "by_policy": {"request_kept_fraction": {p: h.to_dict() for p, h in rt.kept.items()}}}
