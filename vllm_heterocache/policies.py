"""KV-compression policies: which heads keep their full KV, how many prompt tokens the others
keep, and how they choose them. Pure layer: no vLLM import.

A policy maps the model's head profile to its *roles*, a :class:`HeadProfile` whose head types
say what each head does under the policy -- volatile: keeps every token; anchor: keeps a
budget chosen at prefill; pivot and satellite (HeteroCache only): drift-tracked refills -- and
whose budget ratios spread the compressed heads' budgets (they average 1, so every policy keeps
the same total fraction of the KV cache for a ratio, ``budget``). Everything downstream (budget
budgeter, pools, kernels, errors for infeasible budgets) reads the roles, the same for every
policy. Each policy chooses its compressed heads' tokens itself (:meth:`Policy.select`); two
rules are in use:

- by scores: the last ``window`` prompt tokens plus the best-scored others, scored by the
  window's queries and pooled over positions (SnapKV's rule, HeteroCache's prefill selection);
- :class:`SinksAndRecent`: the first :data:`SINK_TOKENS` prompt tokens (attention sinks) plus the
  most recent ones (StreamingLLM's rule).

A new policy is one class here (its roles and, if it differs, its selection) and its tests.

Per request (``vllm_xargs`` ``heterocache_policy`` / ``heterocache_ratio``, :class:`RequestRules`):
a request may take any policy whose roles the server's pools hold -- a head in the server's
full pool cannot drop tokens, a head in a compressed pool may keep any number, and only the
server's own roles track drift (:func:`fits`) -- at any feasible ratio.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_heterocache.head_profile.schema import HeadProfile, HeadType
from vllm_heterocache.ops import reference as ref

#: Attention-sink tokens the "recent" selection keeps (StreamingLLM's default).
SINK_TOKENS = 4
#: PyramidKV's beta: the top layer keeps 1 / beta of the average budget (the paper's default).
PYRAMID_BETA = 20.0

#: Request arguments (``vllm_xargs``) with this prefix are this plugin's: unknown ones are refused.
REQUEST_KEY_PREFIX = "heterocache_"
POLICY_KEY = REQUEST_KEY_PREFIX + "policy"
RATIO_KEY = REQUEST_KEY_PREFIX + "ratio"
REQUEST_KEYS = (POLICY_KEY, RATIO_KEY)


class Policy:
    """A compression policy: the :meth:`roles` it gives a profile's heads, and how its compressed
    heads choose their prompt tokens (:meth:`select`; by default the best-scored, SnapKV's rule)."""

    name: ClassVar[str]
    paper: ClassVar[str]  # the method it implements
    scores_prompt: ClassVar[bool] = True  # :meth:`select` takes the window's scores of the prompt

    def roles(self, profile: HeadProfile) -> HeadProfile:
        raise NotImplementedError

    def select(self, budgets: torch.Tensor, prompt_len: int, window: int,
               scores: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt positions that compressed heads keep, int64 ``[n, max(budgets)]``, ascending,
        -1 padded. ``budgets``: int64 ``[n]``, tokens each keeps (its last ``window`` included);
        ``scores``: float ``[n, prompt_len]``, the observation window's pooled scores
        (``ops.reference.prefill_scores``), when :attr:`scores_prompt`."""
        return ref.select_tokens(scores, budgets, window)

    @staticmethod
    def _uniform(profile: HeadProfile, full: list[list[bool]], ratios: list[list[float]] | None = None) -> HeadProfile:
        """Roles without clusters: heads in ``full`` volatile, the others anchors with budget
        ratios ``ratios`` (default 1)."""
        L, H = profile.num_layers, profile.num_kv_heads
        types = tuple(tuple(HeadType.VOLATILE if full[l][h] else HeadType.ANCHOR for h in range(H)) for l in range(L))
        budget = tuple(
            tuple(None if full[l][h] else (1.0 if ratios is None else ratios[l][h]) for h in range(H)) for l in range(L)
        )
        return dataclasses.replace(profile, head_types=types, clusters=(), budget_ratios=budget)

    @classmethod
    def _all_compressed(cls, profile: HeadProfile, ratios: list[list[float]] | None = None) -> HeadProfile:
        return cls._uniform(profile, [[False] * profile.num_kv_heads for _ in range(profile.num_layers)], ratios)


class SinksAndRecent(Policy):
    """Compressed heads keep the attention sinks and the most recent tokens (StreamingLLM's rule:
    nothing is scored)."""

    scores_prompt = False

    def select(self, budgets, prompt_len, window, scores=None):
        return ref.recent_tokens(budgets, prompt_len, SINK_TOKENS)


class Full(Policy):
    """Every head keeps every token (vLLM's own attention)."""

    name = "full"
    paper = "no compression"

    def roles(self, profile):
        return self._uniform(profile, [[True] * profile.num_kv_heads for _ in range(profile.num_layers)])


class StreamingLLM(SinksAndRecent):
    """Every head keeps the attention sinks and the most recent tokens."""

    name = "streamingllm"
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"

    def roles(self, profile):
        return self._all_compressed(profile)


class SnapKV(Policy):
    """Every head keeps the same budget, chosen by the observation window's pooled scores."""

    name = "snapkv"
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"

    def roles(self, profile):
        return self._all_compressed(profile)


class PyramidKV(Policy):
    """SnapKV's selection with layer budgets falling linearly with depth: the bottom layer keeps
    ``2 - 1/beta`` times the average, the top ``1/beta`` (they average 1)."""

    name = "pyramidkv"
    paper = "Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling, 2024"

    def roles(self, profile):
        L, H = profile.num_layers, profile.num_kv_heads
        bottom, top = 2.0 - 1.0 / PYRAMID_BETA, 1.0 / PYRAMID_BETA
        rows = [bottom - (bottom - top) * l / (L - 1) if L > 1 else 1.0 for l in range(L)]
        return self._all_compressed(profile, [[r] * H for r in rows])


class Duo(SinksAndRecent):
    """The profile's full heads (volatile, pivot) keep every token, the others sinks and recent
    tokens (DuoAttention's retrieval and streaming heads, with the profile choosing them)."""

    name = "duo"
    paper = "Xiao et al., DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads, ICLR 2025"

    def roles(self, profile):
        return self._uniform(profile, [[t.is_full for t in row] for row in profile.head_types])


class HeteroCache(Policy):
    """The profile as it is: volatile and pivot heads full, anchors and satellites with budgets
    by stability, satellites refilled when their pivot drifts."""

    name = "heterocache"
    paper = "HeteroCache, arXiv 2601.13684 (ACL 2026)"

    def roles(self, profile):
        return profile


POLICIES: dict[str, Policy] = {p.name: p for p in (Full(), StreamingLLM(), SnapKV(), PyramidKV(), Duo(), HeteroCache())}
DEFAULT_POLICY = HeteroCache.name


def full_mask(roles: HeadProfile) -> list[list[bool]]:
    return [[t.is_full for t in row] for row in roles.head_types]


def full_share(roles: HeadProfile) -> float:
    """F / H: the fraction of the KV cache the full heads of the roles keep on their own."""
    return roles.num_full_heads() / (roles.num_layers * roles.num_kv_heads)


def fits(server: HeadProfile, request: HeadProfile) -> bool:
    """The server's pools (made for the roles ``server``) can serve a request of the roles ``request``:
    every head of the server's full pool stays full, and drift tracking is the server's own."""
    stays_full = all(r or not s for srow, rrow in zip(full_mask(server), full_mask(request)) for s, r in zip(srow, rrow))
    return stays_full and (not request.clusters or request == server)


class RequestError(ValueError):
    """A request's HeteroCache arguments are invalid; ``key`` names the ``vllm_xargs`` key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class RequestChoice:
    """A request's policy and ratio (None: the server's ratio or token budget)."""

    policy: str
    ratio: float | None = None


@dataclass(frozen=True)
class RequestRules:
    """What a server takes per request (plain data: it travels to the scheduler in a KV cache
    spec, so that the scheduler and the workers read a request's arguments alike).

    Attributes:
        server_policy: the server's policy (a request without ``heterocache_policy`` gets it).
        server_ratio: the server's compression ratio; None when it sets a token budget.
        floors: ``(policy, F / H)`` of every policy the server's pools hold: a request's ratio
            must exceed its policy's floor.
    """

    server_policy: str
    server_ratio: float | None
    floors: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, profile: HeadProfile, server_policy: str, server_ratio: float | None, compresses: bool) -> RequestRules:
        """``compresses``: False when the server keeps every token (ratio 1, or policy ``full``):
        every head is in the full pool, and requests can only be full."""
        if not compresses:
            return cls(server_policy, server_ratio, ((Full.name, 0.0),))
        server = POLICIES[server_policy].roles(profile)
        floors = []
        for name, policy in POLICIES.items():
            roles = policy.roles(profile)
            if name == Full.name:
                floors.append((name, 0.0))
            elif fits(server, roles):
                floors.append((name, full_share(roles)))
        return cls(server_policy, server_ratio, tuple(floors))

    def parse(self, extra_args: Mapping[str, Any] | None) -> RequestChoice:
        """The choice of a request with ``SamplingParams.extra_args`` ``extra_args``
        (``vllm_xargs``). Raises :class:`RequestError` naming the key and what it takes."""
        args = extra_args or {}
        allowed = dict(self.floors)
        for key in args:
            if key.startswith(REQUEST_KEY_PREFIX) and key not in REQUEST_KEYS:
                raise RequestError(key, f"unknown request argument vllm_xargs.{key}: valid keys are "
                                   + ", ".join(REQUEST_KEYS))
        default = self.server_policy if self.server_policy in allowed else Full.name
        policy = args.get(POLICY_KEY, default)
        if not isinstance(policy, str) or policy not in allowed:
            why = (f"this server's KV pools (policy {self.server_policy!r}) cannot serve it"
                   if isinstance(policy, str) and policy in POLICIES else "no such policy")
            raise RequestError(POLICY_KEY, f"vllm_xargs.{POLICY_KEY}={policy!r}: {why}; this server takes "
                               + ", ".join(sorted(allowed)))
        floor = allowed[policy]
        ratio = args.get(RATIO_KEY)
        if ratio is None:
            if policy != Full.name and self.server_ratio is not None and self.server_ratio <= floor:
                raise RequestError(RATIO_KEY, f"vllm_xargs.{POLICY_KEY}={policy!r} needs vllm_xargs.{RATIO_KEY} on "
                                   f"this server: its ratio {self.server_ratio} is infeasible for that policy (its "
                                   f"full heads alone keep {floor:.4f} of the KV cache); send a ratio in "
                                   f"({floor:.4f}, 1]")
            return RequestChoice(policy)
        if isinstance(ratio, str):  # JSON clients may send numbers as strings
            try:
                ratio = float(ratio)
            except ValueError:
                pass
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise RequestError(RATIO_KEY, f"vllm_xargs.{RATIO_KEY} must be a number in (0, 1] (the fraction of the "
                               f"KV cache kept), got {ratio!r}")
        ratio = float(ratio)
        if policy == Full.name and ratio != 1.0:
            raise RequestError(RATIO_KEY, f"vllm_xargs.{RATIO_KEY}={ratio} contradicts vllm_xargs.{POLICY_KEY}="
                               "'full', which keeps every token: drop one of them")
        if not floor < ratio <= 1.0:
            raise RequestError(RATIO_KEY, f"vllm_xargs.{RATIO_KEY}={ratio} is out of range for policy {policy!r} on "
                               f"this server: it must be in ({floor:.4f}, 1] (the fraction of the KV cache kept; "
                               f"its full heads alone keep {floor:.4f})")
        return RequestChoice(policy, ratio)

    def resolve(self, extra_args: Mapping[str, Any] | None) -> tuple[RequestChoice, str | None]:
        """:meth:`parse`, for the engine: arguments that the API server let through but that do
        not parse here give ``full`` (keep everything: nothing lost) and the error to log."""
        try:
            return self.parse(extra_args), None
        except RequestError as e:
            return RequestChoice(Full.name), str(e)
