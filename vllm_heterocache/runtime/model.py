"""The HeteroCache runtime of one model instance: profile, budgets, request states, counters.

One object per engine process, shared by the metadata builder (plans each step) and the
attention impl of every layer (runs the algorithm). Built once from the validated config.
"""

from __future__ import annotations

from dataclasses import dataclass


from vllm_heterocache.budget import BudgetPlanner
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.profile.schema import HeadProfile, HeadType
from vllm_heterocache.runtime.requests import RequestTable



@dataclass(frozen=True)
class LayerHeads:
    """The local KV heads of one layer by role (indices are local to this TP rank)."""

    compressed: tuple[int, ...]
    pivots: tuple[int, ...]
    satellites: dict[int, tuple[int, ...]]  # local pivot -> its local satellites


@dataclass
class Counters:
    prefill_selections: int = 0
    recomputed_rows: int = 0  # rows re-running generated tokens after a preemption
    drift_checks: int = 0
    drifts: int = 0
    refilled_heads: int = 0


class HeteroCacheRuntime:
    def __init__(
        self,
        profile: HeadProfile,
        config: HeteroCacheConfig,
        *,
        tp_rank: int,
        tp_size: int,
        block_size: int,
        max_requests: int,
    ):
        self.profile = profile
        self.config = config
        self.planner = BudgetPlanner(profile, config, tp_rank=tp_rank, tp_size=tp_size, block_size=block_size)
        self.threshold = (
            config.stability_threshold
            if config.stability_threshold is not None
            else float(profile.calibration["tau_stable"])
        )
        self.requests = RequestTable(capacity=max(64, 4 * max_requests))
        self.counters = Counters()
        local = {g: j for j, g in enumerate(self.planner.heads)}
        self.layers: list[LayerHeads] = []
        for layer, types in enumerate(profile.head_types):
            heads = [types[g] for g in self.planner.heads]
            sats = {
                local[c.pivot]: tuple(local[s] for s in c.satellites)
                for c in profile.clusters_of_layer(layer)
                if c.pivot in local
            }
            self.layers.append(
                LayerHeads(
                    compressed=tuple(j for j, t in enumerate(heads) if not t.is_full),
                    pivots=tuple(j for j, t in enumerate(heads) if t is HeadType.PIVOT),
                    satellites=sats,
                )
            )

    @property
    def compresses(self) -> bool:
        """False when every token of every head is kept (ratio 1 or an all-full profile)."""
        return not self.planner.keep_all and any(lh.compressed for lh in self.layers)

    def describe(self, example_prompt: int = 4096) -> str:
        """The startup log line: profile, head counts, budgets, drift settings."""
        counts = self.profile.counts()
        cfg = self.config
        budget = (
            f"compression_ratio={cfg.compression_ratio} (fraction kept)"
            if cfg.token_budget is None
            else f"token_budget={cfg.token_budget}"
        )
        plan = self.planner.plan(example_prompt)
        compressed = plan.budgets[~plan.full]
        span = f"{int(compressed.min())}-{int(compressed.max())}" if compressed.numel() else "all"
        return (
            f"HeteroCache attention backend: profile {self.profile.source} ({self.profile.model.name}); "
            f"heads: {counts['volatile']} volatile, {counts['pivot']} pivot, {counts['anchor']} anchor, "
            f"{counts['satellite']} satellite; {budget}, window={cfg.window}, min_prompt_len={cfg.min_prompt_len}; "
            f"a {example_prompt}-token prompt keeps {span} tokens per compressed head (fraction kept "
            f"{plan.kept_fraction():.3f}); drift check every {cfg.drift_interval} steps, threshold "
            f"{self.threshold}, refill {'on' if cfg.refill else 'OFF'}"
        )
