"""The HeteroCache runtime of one model instance: heads by pool, request states, host tier.

One object per engine process (per tensor-parallel rank), shared by the model-runner hooks,
the metadata builders and the attention impl of every layer. Built once from the validated
config; the cache block layout is attached when vLLM builds the attention metadata builders, the host
tier when vLLM has sized its KV cache. Per step, the runner's step hook calls
:meth:`HeteroCacheRuntime.begin_step`, which admits the step's requests (the side effects) and
plans the step once (``runtime.step``); the metadata builders put the plan in the step's
attention metadata, and the layers execute the plan they find there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import torch

from vllm_heterocache.budget import Budgeter, request_terms
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.head_profile.schema import HeadProfile, HeadType
from vllm_heterocache.ops import kernels
from vllm_heterocache.ops.paged import BlockLayout
from vllm_heterocache.runtime.heads import layer_heads
from vllm_heterocache.runtime.host import HostTier
from vllm_heterocache.runtime.layer import LayerParts
from vllm_heterocache.runtime.refill import RefillQueue, degrade
from vllm_heterocache.runtime.requests import RequestState, RequestTable
from vllm_heterocache.runtime.rings import QueryRings
from vllm_heterocache.runtime.stats import KEPT_FRACTION_BUCKETS, Counters, Histogram
from vllm_heterocache.runtime.step import Row, StepPlan, empty_plan, front_width, plan_step, work_template
from vllm_heterocache.sharding import model_caches, sharing_summary

log = logging.getLogger("vllm.heterocache")


class HeteroCacheRuntime:
    def __init__(
        self,
        profile: HeadProfile,
        config: HeteroCacheConfig,
        *,
        tp_rank: int,
        tp_size: int,
        block_size: int,
        exchange: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``exchange(t)``: ``t`` summed over the tensor-parallel ranks (every rank calls it with
        the same shape, in the same order); needed when pivot clusters cross ranks."""
        self.profile = profile
        self.config = config
        self.tp_rank, self.tp_size, self.block_size = tp_rank, tp_size, block_size
        self.budgeter = Budgeter(profile, config, tp_rank=tp_rank, tp_size=tp_size, block_size=block_size)
        self.roles = roles = self.budgeter.roles  # the policy's roles of the profile's heads (``policies``)
        self.budgeter_for = functools.lru_cache(maxsize=64)(self.budgeter.for_choice)  # RequestChoice -> its budgeter
        _, pool_of = self.budgeter.pools()
        self.caches = model_caches(pool_of, profile.num_layers, profile.num_kv_heads, tp_size)
        self._compresses = self.budgeter.compresses
        # What requests may ask for (``vllm_xargs``), and how each policy uses each pool class.
        self.terms = self.budgeter.server_terms()
        self.capacities = self.terms.capacities  # per compressed pool class
        self.sharing = sharing_summary(pool_of, self.caches, profile.num_kv_heads, tp_size) if tp_size > 1 else ""
        self.threshold = (
            config.stability_threshold
            if config.stability_threshold is not None
            else float(profile.calibration["tau_stable"])
        )
        self.requests = RequestTable()
        self.counters = Counters()
        self.kept = {name: Histogram(KEPT_FRACTION_BUCKETS) for name, _ in self.terms.rules.floors}  # by policy
        self.refills = RefillQueue()
        self.host: HostTier | None = None
        self.layouts: dict[int, BlockLayout] = {}  # store (FULL_POOL or a pool class) -> its caches' block layout
        # The plan of the step whose attention metadata vLLM builds now (begin_step): a hand-off to
        # the metadata builders, which put it in the step's metadata; the layers read it there.
        self.planned: StepPlan = empty_plan(profile.num_layers)
        self.layers, self.num_host_rows, across_satellites = layer_heads(
            roles, self.budgeter.heads, pool_of, self.caches, tp_rank, tp_size, host_rows=config.refill)
        self.store_of = torch.tensor([lh.store for lh in self.layers], dtype=torch.int64)  # [layers, H] (LayerHeads.store)
        self.rings = QueryRings([len(lh.pivots) for lh in self.layers], config.drift_interval)
        # Every rank plans the same drift checks (clusters across ranks exchange their results).
        self._tracks_drift = config.refill and any(t is HeadType.PIVOT for row in roles.head_types for t in row)
        self.exchange = exchange
        self._across = across_satellites if any(lh.shared for lh in self.layers) else []
        if self._across and exchange is None:
            raise ValueError("heterocache: pivot clusters cross tensor-parallel ranks: the runtime needs an exchange")
        self.parts = self._parts()

    def _parts(self) -> LayerParts:
        """The parts of this runtime that per-layer code uses (``runtime.layer``)."""
        return LayerParts(window=self.config.window, pool_kernel=self.config.pool_kernel, threshold=self.threshold,
                          counters=self.counters, refills=self.refills, rings=self.rings, host=self.host,
                          exchange=self.exchange)

    @property
    def compresses(self) -> bool:
        """False when every token of every head of every rank is kept (ratio 1 or an all-full
        profile): then every head is in the full pool and the backend is vLLM's CPU backend,
        unchanged. (The same on every rank: they lay out the same caches and check together.)"""
        return self._compresses

    # -- request lifecycle (called by the model-runner hooks) -----------------------------------

    def attach_host_tier(self, host: HostTier) -> None:
        self.host = host
        self.parts = self._parts()

    def attach_layout(self, store: int, layout: BlockLayout) -> bool:
        """The block layout of the caches of ``store`` (``FULL_POOL`` or a compressed pool class);
        True if it was not known yet."""
        known = self.layouts.get(store)
        if known is not None and not (
            torch.equal(layout.k_index, known.k_index) and torch.equal(layout.v_index, known.v_index)
        ):
            raise RuntimeError(f"heterocache: the KV caches of pool {store} have different block layouts")
        self.layouts[store] = layout
        return known is None

    def begin_step(self, req_ids: list[str], prompt_lens: list[int], query_start_loc: list[int],
                   seq_lens: list[int], args_of: Callable[[str], Mapping | None] = lambda key: None) -> StepPlan:
        """The step hook, before vLLM builds the step's attention metadata: row ``i`` of the step
        is request ``req_ids[i]``, its tokens ``query_start_loc[i] .. query_start_loc[i + 1] - 1``
        up to position ``seq_lens[i] - 1``; ``args_of(key)``: request ``key``'s ``vllm_xargs``
        (read when it is admitted: its policy and ratio, ``policies.RequestRules``).

        Admits the requests whose prefill starts -- at position 0, or after a prefix-cache hit at
        the row's first position -- (a fresh state, host-tier blocks for their satellites, a
        query-ring slot for their pivots), plans the step once (:attr:`planned`), and advances
        each decoding row's place in its query ring (``RequestState.buffered``): the plan holds
        the places of this step's queries (``StepPlan.drift``), so a step's layers write and check
        the same places however late they run, and the next step is planned after it.

        A row that holds a request's last prompt token and generated tokens after it (a resumed
        request recomputing its output) is planned as two rows, its prompt part and its
        generated part, when its compressed heads keep their tokens away from their own
        positions (``placement``): vLLM's kernel reads a row by position.
        """
        rows = []
        for i, key in enumerate(req_ids):
            start, q_len, seq_len = query_start_loc[i], query_start_loc[i + 1] - query_start_loc[i], seq_lens[i]
            if q_len == 0:
                continue
            first = seq_len - q_len
            if first == 0 or key not in self.requests:
                state = self._admit(key, prompt_lens[i], args_of(key), hit=first)
            else:
                state = self.requests.get(key)
            L = state.prompt_len
            if first < L < seq_len and not state.positional:
                rows.append(Row(start, L - first, L, i, state))
                start, q_len = start + L - first, seq_len - L
            rows.append(Row(start, q_len, seq_len, i, state))
        kernels_read = bool(self.layouts) and all(kernels.compiled(layout) for layout in self.layouts.values())
        plan = plan_step(tuple(rows), self.budgeter.full, kernels_read, self.config.drift_interval,
                         len(self.capacities))
        for row in plan.decoding:  # the next step's queries go to the places after these
            row.state.buffered = (row.state.buffered + row.q_len) % self.config.drift_interval
        self.planned = plan
        return plan

    def dummy_step(self) -> StepPlan:
        """vLLM's dummy runs (warm-up, profiling) have rows but no requests."""
        self.planned = empty_plan(self.profile.num_layers)
        return self.planned

    def finish(self, keys) -> None:
        """Requests finished, aborted or preempted: wait for their copies, free their state."""
        for key in keys:
            state = self.requests.pop(key)
            if state is None:
                continue
            self.rings.release(key)
            failure = self.refills.wait_request(key)
            if failure is not None:
                degrade(state, failure, self.counters)
            if self.host is not None:
                self.host.free(key)

    def _admit(self, key: str, prompt_len: int, args: Mapping | None = None, hit: int = 0) -> RequestState:
        """A request's state from its first row; ``hit``: prompt tokens vLLM's prefix cache gave it."""
        self.finish([key])
        terms = request_terms(self.terms, args)
        choice = terms.choice
        if terms.error is not None:  # the API server checks these: a client of the engine itself sent them
            log.warning("heterocache: request %s: %s; it keeps its full KV (policy full)", key, terms.error)
        budgeter = self.budgeter_for(choice)
        budgets = budgeter.budgets(prompt_len)
        placements = tuple(terms.placement(c, prompt_len, self.block_size, hit) for c in range(len(self.capacities)))
        template = work_template(budgets, self.store_of, placements)
        pointing = bool((template[..., 7] >= 0).any())
        fronts = torch.full((*budgets.per_head.shape, front_width(budgets)), -1, dtype=torch.int32) if pointing else None
        state = self.requests.begin(key, budgets, template,
                                    policy=budgeter.policy, placements=placements, hit=hit, fronts=fronts)
        if hit and state.selects:
            self.counters.prefix_cache_hit_tokens += hit
        self.kept[choice.policy].observe(budgets.kept_fraction())
        tracks = choice.policy == self.config.policy  # drift tracking is the server's roles'
        if self._tracks_drift and tracks and not budgets.keeps_all:
            state.ring = self.rings.acquire(key)
            if self._across:  # the most refill positions a cluster across ranks needs
                every = budgets.every_head
                state.shared_width = [
                    max((int(every[layer, s]) - budgets.window for sats in across for s in sats), default=0)
                    for layer, across in enumerate(self._across)
                ]
        if self.host is not None and self.num_host_rows and tracks and not budgets.keeps_all:
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
        counts = self.roles.counts()
        cfg = self.config
        budget = (
            f"compression_ratio={cfg.compression_ratio} (fraction kept)"
            if cfg.token_budget is None
            else f"token_budget={cfg.token_budget}"
        )
        budgets = self.budgeter.budgets(example_prompt)
        compressed = budgets.per_head[~budgets.full]
        span = f"{int(compressed.min())}-{int(compressed.max())}" if compressed.numel() else "all"
        return (
            f"HeteroCache attention backend: policy {cfg.policy} ({self.budgeter.policy.paper}); profile "
            f"{self.profile.source} ({self.profile.model.name}); heads: {counts['volatile']} volatile, "
            f"{counts['pivot']} pivot, {counts['anchor']} anchor, {counts['satellite']} satellite; {budget}, window={cfg.window}, min_prompt_len={cfg.min_prompt_len}; "
            f"a {example_prompt}-token prompt keeps {span} tokens per compressed head (fraction kept "
            f"{budgets.kept_fraction():.3f}); drift check every {cfg.drift_interval} steps, threshold "
            f"{self.threshold}, refill {'on' if cfg.refill else 'OFF'}; decode attention: {kernels.describe()}"
            + f"; requests may choose (vllm_xargs heterocache_policy): {', '.join(n for n, _ in self.terms.rules.floors)}"
            + (f"; {self.sharing}" if self.sharing else "")
        )
