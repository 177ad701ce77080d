"""Budgets: per-head prompt-token budgets (algorithm.md section 2). Pure functions.

With H KV heads in the whole model (layers x KV heads), F of them full (volatile, pivot), a
prompt of L tokens and compression ratio r (fraction of the KV cache KEPT), a compressed head
(anchor, satellite) h with budget ratio rho(h) keeps

    budget(h) = min(L, max(W', floor(base * rho(h))))          W' = min(L, window)
    base      = (r * H - F) * L / (H - F)      (ratio mode; needs r * H > F)
    base      = token_budget                   (absolute mode)

prompt tokens, the most recent W' of them always among them (the window is part of the budget,
and a budget never drops below it). Prompts shorter than ``min_prompt_len`` keep every token. With ``round_to_block`` the budget is rounded up to a
multiple of the KV block size (capped at L). Full heads keep all L tokens; r = 1 keeps every
token of every head. Pivots track a reference top-K of K = min(L, max(1, floor(base))) tokens.

The budgeter applies ``config.policy`` first (``policies``): full heads, budget ratios and the
formula are those of the policy's roles of the profile's heads, the same formula for every policy.

Tensor parallelism: each rank plans the budgets of its own KV heads (``sharding``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.errors import BudgetError
from vllm_heterocache.head_profile.schema import HeadProfile
from vllm_heterocache.placement import RowPlacement
from vllm_heterocache.policies import POLICIES, RequestChoice, RequestRules
from vllm_heterocache.sharding import FULL_POOL, local_kv_heads, model_caches


@dataclass(frozen=True)
class Budgets:
    """Budgets of one request's prompt on one tensor-parallel rank.

    Attributes:
        prompt_len: L, tokens in the prompt.
        window: W' = min(L, window), recent prompt tokens every compressed head keeps.
        base: base budget of a compressed head (float; see the module docstring).
        reference_topk: K, size of a pivot's reference top-K set.
        global_heads: local KV head j -> global KV head index.
        per_head: int64 ``[num_layers, num_local_kv_heads]``: prompt tokens each head keeps
            (full heads: ``prompt_len``).
        full: bool ``[num_layers, num_local_kv_heads]``: the head keeps its full KV.
    """

    prompt_len: int
    window: int
    base: float
    reference_topk: int
    global_heads: tuple[int, ...]
    per_head: torch.Tensor
    full: torch.Tensor

    every_head: torch.Tensor  # int64 [num_layers, num_kv_heads]: the budgets of every rank's heads
    keeps_all: bool  # every head of every rank keeps every prompt token (ratio 1, a prompt below
    # min_prompt_len): nothing is selected, mirrored to the host tier or refilled for this request
    # (decided for all ranks at once: they take part in the same drift checks)

    def kept_fraction(self) -> float:
        """Fraction of this rank's prompt KV entries kept."""
        if self.prompt_len == 0:
            return 1.0
        return float(self.per_head.sum()) / (self.per_head.numel() * self.prompt_len)


def min_feasible_ratio(profile: HeadProfile) -> float:
    """The F / H bound: a compression ratio must exceed it (full heads alone keep that much)."""
    total = profile.num_layers * profile.num_kv_heads
    return profile.num_full_heads() / total


class Budgeter:
    """:func:`prompt_budgets` with the per-profile work done once (the backend asks it per request).

    ``profile`` is the model's head profile; :attr:`roles` are the policy's roles of its heads, which
    everything here reads."""

    def __init__(
        self,
        profile: HeadProfile,
        config: HeteroCacheConfig,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        block_size: int | None = None,
    ):
        if config.round_to_block and not block_size:
            raise ValueError("round_to_block needs the KV block size (block_size)")
        self.profile, self.config, self.block_size = profile, config, block_size
        self.policy = POLICIES[config.policy]
        self.roles = profile = self.policy.roles(profile)
        self.heads = local_kv_heads(profile.num_kv_heads, tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._classes: dict[int, tuple] = {}  # capacity_classes(count), computed once
        layers = range(profile.num_layers)
        every = range(profile.num_kv_heads)
        self._every_full = torch.tensor(
            [[profile.head_types[l][h].is_full for h in every] for l in layers], dtype=torch.bool
        )
        self._every_ratios = torch.tensor(
            [[profile.budget_ratios[l][h] or 0.0 for h in every] for l in layers], dtype=torch.float64
        )
        self.full, self.ratios = self._every_full[:, list(self.heads)], self._every_ratios[:, list(self.heads)]
        self.total = profile.num_layers * profile.num_kv_heads
        self.n_full = profile.num_full_heads()
        r = config.compression_ratio
        self.keep_all = config.token_budget is None and (r >= 1.0 or self.n_full == self.total)
        self.rule = PoolCapacity(
            compression_ratio=r,
            token_budget=config.token_budget,
            total_heads=self.total,
            full_heads=self.n_full,
            max_ratio=1.0,
            window=config.window,
            min_prompt_len=config.min_prompt_len,
            round_to=block_size if config.round_to_block else 0,
            keep_all=self.keep_all,
            points=config.shared_prefixes == "point",
        )
        if not self.keep_all and config.token_budget is None and r * self.total <= self.n_full:
            smallest = math.floor(min_feasible_ratio(profile) * 1000 + 1) / 1000
            raise BudgetError(
                f"heterocache.compression_ratio={r} is infeasible for policy {config.policy} with profile "
                f"{profile.source}: its {self.n_full} full heads of {self.total} alone keep {self.n_full / self.total:.4f} of the "
                f"KV cache (r * H must exceed F). The smallest feasible ratio is {smallest}; or set "
                "heterocache.token_budget instead."
            )

    def base(self, prompt_len: int) -> float:
        return self.rule.base(prompt_len)

    @property
    def compresses(self) -> bool:
        """Some head keeps fewer than every prompt token (:meth:`pools` gives it a compressed pool)."""
        return not self.keep_all and self.n_full < self.total

    def request_rules(self) -> RequestRules:
        """What a server of this budgeter takes per request (``vllm_xargs``)."""
        return RequestRules.of(self.profile, self.config.policy, self.config.compression_ratio, self.compresses)

    def server_terms(self) -> ServerTerms:
        """What a server of this budgeter takes per request, with its pool classes
        (:meth:`pools`); :func:`request_terms` reads a request's arguments by them."""
        rules = self.request_rules()
        capacities, _ = self.pools()
        return ServerTerms(rules, capacities, self.class_rules(name for name, _ in rules.floors))

    def for_choice(self, choice: RequestChoice) -> Budgeter:
        """The budgeter of a request's policy and ratio (``RequestTerms.choice``): its budgets per
        head, which the request's capacity in each class bounds (:meth:`PoolCapacity.for_request`
        applies the same rule to the class's largest budget ratio)."""
        options = {"policy": choice.policy}
        if choice.ratio is not None:
            options |= {"compression_ratio": choice.ratio, "token_budget": None}
        return Budgeter(self.profile, replace(self.config, **options), tp_rank=self.tp_rank,
                        tp_size=self.tp_size, block_size=self.block_size)

    def capacity_classes(self, count: int) -> tuple[tuple[PoolCapacity, ...], dict[tuple[int, int], int]]:
        """Compressed heads (all ranks) in at most ``count`` classes, contiguous by budget ratio.

        Returns each class's capacity (the bound of its largest budget) and ``(layer, global KV
        head) -> class``. A class's pool keeps, per request, its largest budget for each of its
        heads, so fewer, wider classes waste more memory on the heads with smaller ratios.

        Class sizes: vLLM gives every KV cache group the same number of caches (a block costs the
        largest group's bytes) and pads the last group of each pool to it
        (:func:`kv_cache_group_slots`), so classes of equal size beside a full pool of another
        size can waste a large share of every block (SmolLM2: 44% with 4 equal classes). The
        sizes chosen, among equal classes and classes in multiples of one group size, keep the
        least KV per token of a long prompt: padded slots included, each class's heads at its
        largest ratio, with 0.5% added per KV cache group (each is a block table in every step).
        """
        profile = self.roles
        heads = sorted(
            (profile.budget_ratios[l][h] or 0.0, l, h)
            for l in range(profile.num_layers)
            for h in range(profile.num_kv_heads)
            if not profile.head_types[l][h].is_full
        )
        n = len(heads)
        if n == 0:  # every head full (policy full, or an all-full profile)
            return (), {}
        count = max(1, min(count, n))
        if count in self._classes:
            return self._classes[count]
        # a compressed head's budget per prompt token: share * its ratio (module docstring, L large)
        share = 1.0 if self.keep_all or self.config.token_budget is not None else (
            (self.config.compression_ratio * self.total - self.n_full) / (self.total - self.n_full))
        ideal = self.n_full + sum(min(1.0, share * r) for r, _, _ in heads)
        best = None
        for sizes in _class_sizes(n, count):
            bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            classes = [heads[a:b] for a, b in zip(bounds, bounds[1:])]
            capacities = tuple(self._capacity(max(r for r, _, _ in cls)) for cls in classes)
            class_of = {(l, h): c for c, cls in enumerate(classes) for _, l, h in cls}
            groups, slots, caches = self.group_slots(capacities, class_of)
            kept = self.n_full + sum(len(cls) * min(1.0, share * cls[-1][0]) for cls in classes)
            rank = slots / caches * kept / ideal + 0.005 * groups
            if best is None or rank < best[0]:
                best = (rank, capacities, class_of)
        self._classes[count] = best[1], best[2]
        return self._classes[count]

    def group_slots(self, capacities, class_of) -> tuple[int, int, int]:
        """(KV cache groups, cache slots, caches) vLLM makes of this rank's caches for these classes."""
        profile = self.roles

        def pool_of(layer: int, head: int) -> int:
            return class_of.get((layer, head), FULL_POOL)

        counts: dict = {}
        for lc in model_caches(pool_of, profile.num_layers, profile.num_kv_heads, self.tp_size):
            for pool in lc.pools:  # classes of equal capacity have equal specs: one vLLM pool
                key = "full" if pool == FULL_POOL else capacities[pool]
                counts[key] = counts.get(key, 0) + 1
        groups, slots = kv_cache_group_slots(list(counts.values()))
        return groups, slots, sum(counts.values())

    def pools(self) -> tuple[tuple[PoolCapacity, ...], Callable[[int, int], int]]:
        """The KV pools: the capacities of ``config.budget_classes`` classes, and the pool of a
        ``(layer, global KV head)``: ``FULL_POOL`` (full heads, and every head when nothing is
        compressed) or its class."""
        capacities, class_of = self.capacity_classes(self.config.budget_classes)

        def pool_of(layer: int, head: int) -> int:
            return FULL_POOL if self.keep_all else class_of.get((layer, head), FULL_POOL)

        return capacities, pool_of

    def _capacity(self, max_ratio: float) -> PoolCapacity:
        return replace(self.rule, max_ratio=max_ratio)

    def class_rules(self, policies) -> tuple[tuple[ClassRule, ...], ...]:
        """Per pool class (:meth:`pools`), how the requests of each of ``policies`` (names) use
        it: their roles' full heads, the class's largest budget ratio under them, and whether they
        keeps a head of the class full (then the class keeps the whole prompt for them)."""
        _, class_of = self.capacity_classes(self.config.budget_classes)
        members: dict[int, list[tuple[int, int]]] = {}
        for head, c in class_of.items():
            members.setdefault(c, []).append(head)
        out: list[list[ClassRule]] = [[] for _ in members]
        for name in policies:
            roles = POLICIES[name].roles(self.profile)
            for c, heads in members.items():
                out[c].append(ClassRule(
                    policy=name,
                    full_heads=roles.num_full_heads(),
                    max_ratio=max(roles.budget_ratios[l][h] or 0.0 for l, h in heads),
                    keeps_all=any(roles.head_types[l][h].is_full for l, h in heads),
                    compresses=not all(roles.head_types[l][h].is_full for l, h in heads),
                ))
        return tuple(tuple(rules) for rules in out)

    def budgets(self, prompt_len: int) -> Budgets:
        """The budgets of a prompt of ``prompt_len`` tokens."""
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        L = prompt_len
        base = self.rule.base(L)
        every = torch.where(self._every_full, L, self.rule.budgets(L, self._every_ratios))  # [layers, all KV heads]
        return Budgets(
            prompt_len=L,
            window=min(L, self.config.window),
            base=base,
            reference_topk=min(L, max(1, math.floor(base))),
            global_heads=self.heads,
            per_head=every[:, list(self.heads)],
            full=self.full,
            every_head=every,
            keeps_all=bool((every >= L).all()),
        )


def kv_cache_group_slots(pool_sizes: list[int]) -> tuple[int, int]:
    """``(groups, cache slots)``: how vLLM 0.32 groups caches of several specs, ``pool_sizes[i]``
    caches of spec ``i`` (``vllm/v1/core/kv_cache_utils.py``, ``_get_kv_cache_groups_uniform_page_size``):
    every group holds the same number of caches, the smallest pool's (the largest's when every
    pool is within 1.5 times the smallest), each pool split into whole groups, the last padded.
    A padded slot costs a cache's memory in every block."""
    sizes = [n for n in pool_sizes if n]
    lo, hi = min(sizes), max(sizes)
    group = hi if hi < 1.5 * lo else lo
    groups = sum(-(-n // group) for n in sizes)
    return groups, groups * group


def _class_sizes(n: int, count: int):
    """Candidate sizes of at most ``count`` classes of ``n`` heads: equal ones, and for every
    group size ``g`` one class of ``g`` and the rest in multiples of ``g`` (only the last short)."""
    yield [n // count + (i < n % count) for i in range(count)][::-1]
    for g in range(1, n + 1):
        rest = n - g
        units = -(-rest // g)
        k = min(count - 1, units)
        if k == 0:
            if rest == 0:
                yield [g]
            continue
        per = [units // k + (i < units % k) for i in range(k)]
        sizes = [g] + [u * g for u in per]
        sizes[-1] -= sum(sizes) - n  # the last class is short by the padding
        if sizes[-1] > 0:
            yield sizes


@dataclass(frozen=True)
class ClassRule:
    """How the requests of one policy use one pool class (:meth:`PoolCapacity.for_request`)."""

    policy: str
    full_heads: int  # F of the policy's roles
    max_ratio: float  # the class's largest budget ratio under the policy
    keeps_all: bool  # the policy keeps a head of the class full
    compresses: bool = True  # the policy compresses a head of the class


def _round_up(x, multiple: int):
    return (x + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class PoolCapacity:
    """The budget rule (:meth:`budgets`, the one place the formula is written) and the largest
    budget ratio of a class of compressed heads (all TP ranks).

    Plain numbers, so it travels inside a KV cache spec to the scheduler process, whose block
    manager keeps ``max_budget(L)`` prompt slots per request in the class's pool; the budgeter
    applies the same rule (``max_ratio`` 1) to every head, so ``max_budget(L)`` is exactly the
    largest ``Budgeter.budgets(L).per_head`` of the class's heads.
    """

    compression_ratio: float
    token_budget: int | None
    total_heads: int
    full_heads: int
    max_ratio: float
    window: int
    min_prompt_len: int
    round_to: int  # 0: no rounding
    keep_all: bool
    selects: bool = True  # some head of the class may keep fewer than all prompt tokens
    points: bool = True  # selections point into a request's prefix-cache hit (HeteroCacheConfig.shared_prefixes)

    def base(self, prompt_len: int) -> float:
        """The base budget of a compressed head (module docstring)."""
        if self.token_budget is not None:
            return float(self.token_budget)
        if self.keep_all:
            return float(prompt_len)
        r, total, n_full = self.compression_ratio, self.total_heads, self.full_heads
        return (r * total - n_full) * prompt_len / (total - n_full)

    def budgets(self, prompt_len: int, ratios: torch.Tensor) -> torch.Tensor:
        """int64 budgets of compressed heads with budget ratios ``ratios`` (float64, any shape):
        the formula of the module docstring, the one place it is written."""
        L = prompt_len
        if self.keep_all or L < self.min_prompt_len:
            return torch.full(ratios.shape, L, dtype=torch.int64)
        budgets = torch.floor(self.base(L) * ratios).to(torch.int64).clamp(min=min(L, self.window), max=L)
        return _round_up(budgets, self.round_to).clamp(max=L) if self.round_to else budgets

    def for_request(self, rule: ClassRule, ratio: float | None) -> PoolCapacity:
        """This class's capacity for a request of ``rule.policy`` at compression ratio ``ratio``
        (None: the server's ratio or token budget): the bound of the budgets that
        ``Budgeter`` gives it (the same rule, the same numbers)."""
        capacity = replace(self, full_heads=rule.full_heads, max_ratio=rule.max_ratio,
                           keep_all=self.keep_all or rule.keeps_all,
                           selects=self.selects and not self.keep_all and rule.compresses)
        if ratio is not None:
            capacity = replace(capacity, compression_ratio=ratio, token_budget=None,
                               keep_all=capacity.keep_all or ratio >= 1.0, selects=capacity.selects and ratio < 1.0)
        return capacity

    def keeps_prompt(self, prompt_len: int) -> bool:
        """Every head of the class keeps every prompt token (nothing is selected)."""
        return not self.selects or prompt_len < self.min_prompt_len

    def placement(self, prompt_len: int, block_size: int, hit: int = 0) -> RowPlacement:
        """Where a request's tokens of prompt length ``prompt_len`` live in this class's pool
        (``placement``), ``hit`` of them from vLLM's prefix cache: the scheduler sizes its
        blocks by it, the workers address them by it."""
        return RowPlacement.of(prompt_len, block_size, self.max_budget(prompt_len), self.keeps_prompt(prompt_len),
                               hit if self.points else 0)

    def max_budget(self, prompt_len: int) -> int:
        """The budget of the class's largest ratio: what its pool keeps per head and request
        (asked by the class's block manager every scheduler step: cached)."""
        return _max_budget(self, prompt_len)


@dataclass(frozen=True)
class ServerTerms:
    """What a server's KV pools take per request, as plain data: it travels to the scheduler
    inside every compressed pool's KV cache spec (a spec holds the terms of its own class).

    Attributes:
        rules: the request arguments (``vllm_xargs``) the server takes (``policies.RequestRules``).
        capacities: per compressed pool class, its capacity under the server's policy and ratio.
        class_rules: per pool class, how the requests of each policy of ``rules.floors`` use it.
    """

    rules: RequestRules
    capacities: tuple[PoolCapacity, ...] = ()
    class_rules: tuple[tuple[ClassRule, ...], ...] = ()

    def of_class(self, pool: int) -> ServerTerms:
        """The terms of pool class ``pool`` alone (its class index becomes 0)."""
        return ServerTerms(self.rules, (self.capacities[pool],), (self.class_rules[pool],))


@dataclass(frozen=True)
class RequestTerms:
    """One request's policy and ratio, and its capacity in each pool class of the server.

    Attributes:
        choice: the request's policy and ratio (``policies.RequestChoice``).
        capacities: per pool class, the bound of the request's budgets there
            (:meth:`PoolCapacity.for_request`): the scheduler sizes the request's blocks by it and
            the workers address them by it (:meth:`placement`).
        error: the engine's reading of arguments that do not parse (the API server refuses them
            first): the request keeps everything (policy ``full``), and this says why.
    """

    choice: RequestChoice
    capacities: tuple[PoolCapacity, ...]
    error: str | None = None

    def placement(self, pool: int, prompt_len: int, block_size: int, hit: int = 0) -> RowPlacement:
        """Where the request's tokens live in the pool of class ``pool`` (``placement``), ``hit``
        of its ``prompt_len`` prompt tokens from vLLM's prefix cache."""
        return self.capacities[pool].placement(prompt_len, block_size, hit)


def request_terms(server: ServerTerms, extra_args: Mapping[str, Any] | None, *, strict: bool = False) -> RequestTerms:
    """A request's choice and capacities from its ``SamplingParams.extra_args`` (``vllm_xargs``):
    the one derivation that the API server (``strict``: bad arguments raise
    ``policies.RequestError`` naming the key, an HTTP 400), the scheduler (a request's blocks in
    each compressed pool) and the workers (its budgets and where its tokens are) share. Without
    ``strict``, arguments that do not parse give policy ``full`` and the error (:class:`RequestTerms`)."""
    if strict:
        choice, error = server.rules.parse(extra_args), None
    else:
        choice, error = server.rules.resolve(extra_args)
    capacities = tuple(
        capacity.for_request(next(r for r in rules if r.policy == choice.policy), choice.ratio)
        for capacity, rules in zip(server.capacities, server.class_rules)
    )
    return RequestTerms(choice, capacities, error)


@functools.lru_cache(maxsize=4096)
def _max_budget(capacity: PoolCapacity, prompt_len: int) -> int:
    return int(capacity.budgets(prompt_len, torch.tensor(capacity.max_ratio, dtype=torch.float64)))


def prompt_budgets(
    profile: HeadProfile,
    config: HeteroCacheConfig,
    prompt_len: int,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    block_size: int | None = None,
) -> Budgets:
    """Per-head token budgets for a prompt of ``prompt_len`` tokens on rank ``tp_rank``."""
    budgeter = Budgeter(profile, config, tp_rank=tp_rank, tp_size=tp_size, block_size=block_size)
    return budgeter.budgets(prompt_len)
