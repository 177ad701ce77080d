"""The HeteroCache runtime of one model instance: heads by pool, request states, host tier.

One object per engine process, shared by the model-runner hooks (which say which request each
batch row is and which requests ended), the metadata builders (which plan each step once) and
the attention impl of every layer (which runs the algorithm). Built once from the validated
config; the host tier is attached when vLLM has sized its KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vllm_heterocache.budget import BudgetPlanner, check_pools_uniform
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.ops import kernels
from vllm_heterocache.profile.schema import HeadProfile, HeadType
from vllm_heterocache.runtime.host import HostTier
from vllm_heterocache.runtime.refill import RefillQueue
from vllm_heterocache.runtime.requests import RequestState, RequestTable

log = logging.getLogger("vllm.heterocache")


FULL_POOL = -1


@dataclass(frozen=True)
class LayerHeads:
    """The local KV heads of one layer by role (indices are local to this TP rank).

    ``pool[j]``: the KV pool of local head ``j``: ``FULL_POOL``, or the budget class of a
    compressed head (``HeteroCacheRuntime.capacities``).
    """

    full: tuple[int, ...]
    compressed: tuple[int, ...]
    pivots: tuple[int, ...]
    satellites: dict[int, tuple[int, ...]]  # local pivot -> its local satellites
    host_rows: dict[int, int]  # local satellite -> its row in the host tier
    pool: tuple[int, ...]


@dataclass
class Counters:
    prefill_selections: int = 0
    drift_checks: int = 0
    drifts: int = 0
    refilled_heads: int = 0


@dataclass(frozen=True)
class Row:
    """One request's part of an engine step (planned once per step, shared by all layers).

    The row's tokens are ``query[start : start + q_len]`` at positions ``seq_len - q_len ..
    seq_len - 1``; ``index`` is the row of the step's block tables.
    """

    start: int
    q_len: int
    seq_len: int
    index: int
    state: RequestState

    @property
    def first(self) -> int:
        return self.seq_len - self.q_len

    @property
    def ends_prompt(self) -> bool:
        """The row holds the last prompt token: compressed heads select and compact after it."""
        return self.first < self.state.prompt_len <= self.seq_len

    @property
    def decoding(self) -> bool:
        return self.first >= self.state.prompt_len


class HeteroCacheRuntime:
    def __init__(
        self,
        profile: HeadProfile,
        config: HeteroCacheConfig,
        *,
        tp_rank: int,
        tp_size: int,
        block_size: int,
    ):
        self.profile = profile
        self.config = config
        self.planner = BudgetPlanner(profile, config, tp_rank=tp_rank, tp_size=tp_size, block_size=block_size)
        self.capacities, class_of = self.planner.capacity_classes(config.budget_classes)

        def pool_of(layer: int, head: int) -> int:
            return FULL_POOL if self.planner.keep_all else class_of.get((layer, head), FULL_POOL)

        check_pools_uniform(pool_of, profile.num_layers, profile.num_kv_heads, tp_size)
        self.threshold = (
            config.stability_threshold
            if config.stability_threshold is not None
            else float(profile.calibration["tau_stable"])
        )
        self.requests = RequestTable()
        self.counters = Counters()
        self.refills = RefillQueue()
        self.host: HostTier | None = None
        self._step: tuple[list[str], list[int]] | None = None
        self._rows: tuple[Row, ...] | None = None
        local = {g: j for j, g in enumerate(self.planner.heads)}
        self.layers: list[LayerHeads] = []
        rows = 0
        for layer, types in enumerate(profile.head_types):
            heads = [types[g] for g in self.planner.heads]
            pool = tuple(pool_of(layer, g) for g in self.planner.heads)
            sats = {
                local[c.pivot]: tuple(local[s] for s in c.satellites)
                for c in profile.clusters_of_layer(layer)
                if c.pivot in local
            }
            host_rows = {}  # only refills read the host tier
            for s in sorted(h for group in sats.values() for h in group) if config.refill else ():
                host_rows[s], rows = rows, rows + 1
            self.layers.append(
                LayerHeads(
                    full=tuple(j for j, p in enumerate(pool) if p == FULL_POOL),
                    compressed=tuple(j for j, p in enumerate(pool) if p != FULL_POOL),
                    pivots=tuple(j for j, t in enumerate(heads) if t is HeadType.PIVOT),
                    satellites=sats,
                    host_rows=host_rows,
                    pool=pool,
                )
            )
        self.num_host_rows = rows

    @property
    def compresses(self) -> bool:
        """False when every token of every head is kept (ratio 1 or an all-full profile): then
        every head is in the full pool and the backend is vLLM's CPU backend, unchanged."""
        return any(lh.compressed for lh in self.layers)

    # -- request lifecycle (called by the model-runner hooks) -----------------------------------

    def attach_host_tier(self, host: HostTier) -> None:
        self.host = host

    def begin_step(self, req_ids: list[str], prompt_lens: list[int]) -> None:
        """The batch of the next step: row ``i`` is request ``req_ids[i]``."""
        self._step = (list(req_ids), [int(n) for n in prompt_lens])
        self._rows = None

    def finish(self, keys) -> None:
        """Requests finished, aborted or preempted: wait for their copies, free their state."""
        for key in keys:
            state = self.requests.pop(key)
            if state is None:
                continue
            self.refills.wait_request(key)
            if self.host is not None:
                self.host.free(key)

    def plan_rows(self, query_start_loc: list[int], seq_lens: list[int]) -> tuple[Row, ...]:
        """The rows of this step (once per step; every layer and pool reuses them).

        Creates the state of a request whose prefill starts (and its host-tier blocks). A step
        without ``begin_step`` (vLLM's dummy runs) has no rows.
        """
        if self._rows is not None:
            return self._rows
        if self._step is None:
            return ()
        req_ids, prompt_lens = self._step
        rows = []
        for i in range(len(seq_lens)):
            q_len = query_start_loc[i + 1] - query_start_loc[i]
            if q_len == 0 or i >= len(req_ids):
                continue
            key, seq_len = req_ids[i], seq_lens[i]
            if seq_len == q_len:
                state = self._begin(key, prompt_lens[i])
            else:
                state = self.requests.get(key)
            rows.append(Row(query_start_loc[i], q_len, seq_len, i, state))
        self._rows = tuple(rows)
        return self._rows

    def _begin(self, key: str, prompt_len: int) -> RequestState:
        self.finish([key])
        state = self.requests.begin(key, self.planner.plan(prompt_len))
        if self.host is not None and self.num_host_rows:
            state.host = self.host.allocate(key, prompt_len)
            if not state.host:
                log.warning(
                    "heterocache: host tier full (%d of %d blocks used): request %s is served without "
                    "refills (its satellites keep their prefill selection). Raise "
                    "heterocache.host_tier_gib to avoid this.",
                    self.host.used_blocks, self.host.num_blocks, key,
                )
        return state

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
            f"{self.threshold}, refill {'on' if cfg.refill else 'OFF'}; decode attention: {kernels.describe()}"
        )
