"""Per-request HeteroCache state, keyed by the request's first KV block.

The attention backend sees batch rows, not request ids. A running request owns its first KV block
until it finishes or is preempted (prefix caching is refused at startup, so blocks are never
shared), and a new request always starts at position 0. So a request is identified by the block
id at the head of its block table, and a row that starts at position 0 begins a new state.

Lifetime: a state is dropped when its key block shows up inside another request's block table
(the block was freed and reused) or when a new request starts on that block; the table also holds
at most ``capacity`` states, dropping the least recently scheduled (a state needed again after
that raises, loudly). States are small: the budget plan, pivot references and query buffers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from vllm_heterocache.budget import BudgetPlan

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    key: int  # first KV block id
    plan: BudgetPlan | None = None  # budgets of the prompt selected over (set after prefill chunks)
    decode_steps: int = 0  # tokens processed since the prompt
    references: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [P, K] int64, -1 pad
    query_ring: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [P, N, G, D] float32


class StateLost(RuntimeError):
    pass


class RequestTable:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._states: OrderedDict[int, RequestState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def begin(self, key: int) -> RequestState:
        """A request starts (its first prefill chunk): a fresh state replaces any old one."""
        state = RequestState(key)
        self._states.pop(key, None)
        self._states[key] = state
        while len(self._states) > self.capacity:
            old, _ = self._states.popitem(last=False)
            log.warning("heterocache: dropped the state of an unscheduled request (first block %d): table full", old)
        return state

    def get(self, key: int) -> RequestState:
        state = self._states.get(key)
        if state is None:
            raise StateLost(
                f"heterocache: no state for the request whose first KV block is {key}; it was "
                "dropped (more than heterocache's state capacity of requests were unscheduled "
                "at once). This is a bug or an overload: report it with the engine log."
            )
        self._states.move_to_end(key)
        return state

    def forget_reused(self, block_tables: torch.Tensor, num_blocks_used: torch.Tensor) -> None:
        """Drop states whose key block now sits inside some request's block table (after the head)."""
        if not self._states:
            return
        inner = set()
        for row, n in zip(block_tables.tolist(), num_blocks_used.tolist()):
            inner.update(row[1:n])
        for key in [k for k in self._states if k in inner]:
            del self._states[key]
