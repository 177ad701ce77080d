"""Per-request HeteroCache state, keyed by vLLM's request id.

The model runner tells the runtime which request each batch row belongs to and which requests
finished or were preempted (``vllm_adapter.runner_hooks``); a state is created when a request's
prefill starts at position 0 (also after a preemption: the request is recomputed from the
start) and dropped when vLLM reports the request finished, aborted or preempted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from vllm_heterocache.budget import Budgets
from vllm_heterocache.placement import RowPlacement
from vllm_heterocache.policies import DEFAULT_POLICY, POLICIES, Policy


@dataclass
class RequestState:
    key: str  # vLLM request id
    budgets: Budgets  # of its prompt (prompt_len = the request's prompt length)
    work_template: torch.Tensor  # int64 [layers, H, 8]: its gather-kernel items (runtime.step.work_template)
    policy: Policy = POLICIES[DEFAULT_POLICY]  # its policy (the server's, or its vllm_xargs'): how it selects
    placements: tuple[RowPlacement, ...] = ()  # per compressed pool class: where its tokens live there
    hit: int = 0  # its prompt tokens that came from vLLM's prefix cache (its first row starts there)
    fronts: torch.Tensor | None = None  # int32 [layers, H, B_max]: per head, the row positions of its
    # selection, when a pool's selection points into shared prompt blocks (``placement``): slot i of
    # compressed head h (``kept[layer][c, i]``) is read at ``fronts[layer, h, i]``; else None
    host: bool = False  # the host tier holds this request's satellites (else: no refills)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [C, B_max] positions in the
    # compressed slots 0.. (-1 padded; ascending at prefill, refills rewrite slots in place on the
    # refill thread: read it after RefillQueue.wait)
    window_queries: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)  # layer -> (position
    # of the first, queries [n, H_q, D]) of its observation window computed in earlier chunks of its
    # prompt (runtime.layer.keep_window_queries)
    references: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [P, K] int64, -1 pad
    ring: int | None = None  # its slot in the pivots' query rings (runtime.rings); None: no drift checks
    buffered: int = 0  # decode queries in its rings since the last check (the same in every layer)
    shared_width: list[int] = field(default_factory=list)  # per layer: refill positions a pivot cluster
    # across tensor-parallel ranks sends on drift (its satellites' largest budget minus the window)

    @property
    def prompt_len(self) -> int:
        return self.budgets.prompt_len

    @functools.cached_property
    def shifts(self) -> torch.Tensor:
        """int64 ``[pools]``: how far each pool class moves this request's generated tokens from
        their positions (``RowPlacement.shift``), -1 where it keeps them in place."""
        return torch.tensor([-1 if p.positional else p.shift for p in self.placements], dtype=torch.int64)

    @property
    def positional(self) -> bool:
        """Every pool keeps this request's tokens at their own positions (nothing is copied)."""
        return all(p.positional for p in self.placements)

    @property
    def selects(self) -> bool:
        """Its compressed heads keep a selection (else every head keeps every token in place)."""
        return not (self.positional and self.budgets.keeps_all)

    def placement(self, store: int) -> RowPlacement | None:
        """Where this request's tokens are in the caches of pool ``store`` (None: the full pool,
        every token at its own position)."""
        return None if store < 0 else self.placements[store]


class StateLost(RuntimeError):
    pass


class RequestTable:
    def __init__(self) -> None:
        self._states: dict[str, RequestState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: str) -> bool:
        return key in self._states

    def begin(self, key: str, budgets: Budgets, work_template: torch.Tensor,
              policy: Policy = POLICIES[DEFAULT_POLICY], placements: tuple[RowPlacement, ...] = (),
              hit: int = 0, fronts: torch.Tensor | None = None) -> RequestState:
        """A request starts (its first prefill chunk): a fresh state replaces any old one."""
        state = RequestState(key, budgets, work_template, policy, placements, hit, fronts)
        self._states[key] = state
        return state

    def get(self, key: str) -> RequestState:
        state = self._states.get(key)
        if state is None:
            raise StateLost(
                f"heterocache: no state for request {key!r}, which is past its first prefill chunk. "
                "This is a bug: report it with the engine log."
            )
        return state

    def pop(self, key: str) -> RequestState | None:
        return self._states.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._states)
