"""One engine step, planned once before the layers run (the plan half of plan/run).

The model runner's step hook admits the step's requests (``HeteroCacheRuntime.begin_step``,
which has the side effects: request states, host-tier blocks) and then calls :func:`plan_step`,
a pure function of the rows and the model's heads. Every layer of the step reads the same
:class:`StepPlan`, which travels in the step's attention metadata (``vllm_adapter.backend``);
nothing in it changes after planning, and executing it reads no other per-step state, so plans
of later steps may be made before it runs.

Rows and tokens. Row ``i`` of a step is one request's ``q_len`` new tokens at positions
``first .. seq_len - 1`` (``first = seq_len - q_len``), stored at ``query[start : start + q_len]``
of every layer. A row is

- *prefilling* while ``first`` is inside the prompt (``first < prompt_len``); the row that holds
  the last prompt token *ends the prompt*: after it, compressed heads select and compact;
- *decoding* once ``first >= prompt_len`` (one token in steady state; several when vLLM
  recomputes a preempted request's generated tokens in chunks).

Attention of a step (``runtime.layer.attend``):

- A step with any prefilling row runs vLLM's kernel for every head over its prefilling rows
  (exact: a prompt is whole in every pool until it ends) and for full heads over every row; the
  gather kernel runs the decoding rows' compressed heads over their kept tokens only. When the
  step also has decoding rows (a *mixed* step), vLLM's kernel runs compressed heads over
  :attr:`StepPlan.prefilling` only, with metadata of its own.
- A *fused* step -- every row decoding one token, and the compiled kernels read the cache
  layouts -- runs the gather kernel per layer for every head (full heads over all their
  positions) and no vLLM kernel at all; vLLM's per-pool attention metadata is not built.
- Otherwise (multi-token decoding rows, or a layout the kernels do not read), full heads run
  vLLM's kernel and compressed heads the gather kernel (or its PyTorch reference).

Work items (``StepPlan.work[layer]``, int64 ``[n, 8]``, contract of
``ops.kernels.gather_attention``): ``(token, kv_head, row, n_front, gen_start, gen_end,
front_start, front_list)``, one per decoding token and head that the gather kernel runs, in row
positions of the head's pool (``placement``). A compressed head ``h`` of a request with prompt
length ``L`` and budget ``B_h`` attends over its selection -- slots ``0 .. B_h - 1`` from
``front_start`` on, or, when its selection points into shared prompt blocks, the ``B_h`` row
positions of its row of ``RequestState.fronts`` (``front_list``: where that row starts in the
layer's fronts of the step, :attr:`StepPlan.fronts`) -- and its generated tokens ``L .. p`` (up
to the token's own position ``p``), which sit ``shift`` positions further; a full head, or a
head of a pool that keeps the request's tokens at their own positions, over ``0 .. p``. The
per-request columns are fixed when the request is admitted (:func:`work_template`); a step
fills in token, row, ``p + 1`` and where the request's fronts start.

Cache writes (``StepPlan.moved``): a generated token of a compressed pool that keeps its tokens
away from their positions is written at ``p + shift``; per pool, the step lists those tokens,
their rows and row positions, and the adapter turns them into the pool's slot mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_heterocache.budget import Budgets
from vllm_heterocache.placement import RowPlacement
from vllm_heterocache.runtime.requests import RequestState

WORK_COLUMNS = 8  # (token, kv_head, row, n_front, gen_start, gen_end, front_start, front_list): csrc/gather_attention.h


@dataclass(frozen=True)
class Row:
    """One request's part of a step: ``query[start : start + q_len]``, positions
    ``seq_len - q_len .. seq_len - 1``; ``index`` is its row in the step's block tables."""

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
        """The row holds the last prompt token of a request whose compressed heads keep a
        selection: they select and copy it after this row (``placement``; a request whose heads
        keep every token, each at its own position, selects nothing)."""
        return self.first < self.state.prompt_len <= self.seq_len and self.state.selects

    @property
    def decoding(self) -> bool:
        return self.first >= self.state.prompt_len


@dataclass(frozen=True)
class RowSubset:
    """Some rows of a step as vLLM's kernel takes them: their tokens of the step's ``query``
    (a slice when they are consecutive), their rows of the step's block tables, and their
    int32 ``query_start_loc`` ``[n + 1]`` (re-based to 0) and ``seq_lens`` ``[n]``."""

    rows: tuple[Row, ...]
    tokens: slice | torch.Tensor
    index: torch.Tensor  # int64 [n]
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def max_query_len(self) -> int:
        return max(r.q_len for r in self.rows)

    @property
    def max_seq_len(self) -> int:
        return max(r.seq_len for r in self.rows)

    @classmethod
    def of(cls, rows: tuple[Row, ...]) -> RowSubset:
        q_lens = torch.tensor([r.q_len for r in rows], dtype=torch.int32)
        query_start_loc = torch.zeros(len(rows) + 1, dtype=torch.int32)
        torch.cumsum(q_lens, 0, out=query_start_loc[1:])
        consecutive = all(a.start + a.q_len == b.start for a, b in zip(rows, rows[1:]))
        if consecutive:
            tokens = slice(rows[0].start, rows[-1].start + rows[-1].q_len)
        else:
            tokens = torch.cat([torch.arange(r.start, r.start + r.q_len) for r in rows])
        return cls(rows, tokens, torch.tensor([r.index for r in rows], dtype=torch.int64), query_start_loc,
                   torch.tensor([r.seq_len for r in rows], dtype=torch.int32))


@dataclass(frozen=True)
class DriftCheck:
    """A decoding row whose pivots check for drift after a phase: their ring is full, and the
    keys are the row's positions ``0 .. key_len - 1``."""

    row: Row
    key_len: int


@dataclass(frozen=True)
class DriftPhase:
    """The decoding tokens whose pivot queries go into the query rings (``runtime.rings``) at
    once: token ``tokens[i]`` of the step (int64 ``[n]``) at place ``places[i]`` of ring slot
    ``slots[i]``; then the rows in ``checks`` check for drift. A step has one phase per token
    of its longest tracked decoding row (one in steady state): phase ``j`` holds token ``j`` of
    every row, so a row's checks see its queries in order."""

    tokens: torch.Tensor
    slots: torch.Tensor
    places: torch.Tensor
    checks: tuple[DriftCheck, ...]


@dataclass(frozen=True)
class MovedWrites:
    """The tokens of a step that one compressed pool stores away from their own positions
    (generated tokens, ``placement``): token ``tokens[i]`` of the step (int64 ``[n]``), of block-
    table row ``rows[i]``, at row position ``positions[i]``."""

    tokens: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class StepPlan:
    """Everything about one step that the layers share (see the module docstring).

    Attributes:
        rows: the step's rows with a request (dummy runs have none).
        ends_prompt: rows holding their last prompt token.
        continues_prompt: rows of requests that select, prefilling a chunk of their prompt that is
            not its last (``runtime.layer.keep_window_queries``).
        decoding: rows past their prompt.
        prefill: some row is prefilling: vLLM's kernel runs every head (full heads over every
            row, compressed heads over ``prefilling`` when it is set, else over every row).
        prefilling: in a mixed step (prefilling and decoding rows), the prefilling rows; else None.
        fused: every row decodes one token and the kernels read the layouts: the gather kernel
            runs every head (one call per layer and cache layout), vLLM's kernel none.
        work: per layer, int64 ``[n, 8]`` gather-kernel work items (``n`` may be 0).
        drift: the drift tracking of the decoding rows of requests that hold a query ring, in
            phases (the same in every layer with pivots).
        moved: per compressed pool class, its :class:`MovedWrites` (None: every token of the
            step at its own position in that pool).
        fronts: the decoding rows whose selections point into shared prompt blocks, in the order
            their ``RequestState.fronts[layer]`` are concatenated for the gather kernel.
    """

    rows: tuple[Row, ...]
    ends_prompt: tuple[Row, ...]
    decoding: tuple[Row, ...]
    prefill: bool
    fused: bool
    work: tuple[torch.Tensor, ...]
    drift: tuple[DriftPhase, ...] = ()
    prefilling: RowSubset | None = None
    moved: tuple[MovedWrites | None, ...] = ()
    fronts: tuple[Row, ...] = ()
    continues_prompt: tuple[Row, ...] = ()


def _no_work(num_layers: int) -> tuple[torch.Tensor, ...]:
    return (torch.empty(0, WORK_COLUMNS, dtype=torch.int64),) * num_layers


def empty_plan(num_layers: int) -> StepPlan:
    """A step without requests (vLLM's dummy runs): vLLM's kernel runs every head."""
    return StepPlan((), (), (), prefill=True, fused=False, work=_no_work(num_layers))


def plan_step(rows: tuple[Row, ...], full: torch.Tensor, kernels_read_layout: bool, drift_interval: int,
              num_pools: int = 0) -> StepPlan:
    """The plan of a step of ``rows``.

    Args:
        rows: the step's rows, in batch order.
        full: bool ``[num_layers, H_kv]``, the local heads that keep their full KV (every
            request's ``Budgets.full``).
        kernels_read_layout: the compiled gather kernel reads this engine's cache layout (else
            its PyTorch reference runs the work items, and full heads stay with vLLM's kernel).
        drift_interval: N, the queries a ring holds (``runtime.rings``).
        num_pools: the compressed pool classes (each request's ``RequestState.placements``).
    """
    num_layers, hkv = full.shape
    decoding = tuple(r for r in rows if r.decoding)
    prefill = len(decoding) < len(rows) or not rows
    fused = not prefill and kernels_read_layout and all(r.q_len == 1 for r in decoding)
    continues = tuple(r for r in rows if r.seq_len < r.state.prompt_len and r.state.selects)
    if not decoding:
        return StepPlan(rows, tuple(r for r in rows if r.ends_prompt), (), prefill, fused, _no_work(num_layers),
                        continues_prompt=continues)
    # one entry per decoding token: [token, row, position + 1] and its request's item template
    tokens = torch.tensor([(r.start + j, r.index, r.first + j + 1) for r in decoding for j in range(r.q_len)],
                          dtype=torch.int64)
    templates = [r.state.work_template for r in decoding for _ in range(r.q_len)]
    items = torch.stack(templates, dim=1)  # [layers, n, H, 8]
    items[..., 0] = tokens[:, 0, None]
    items[..., 2] = tokens[:, 1, None]
    items[..., 5] += tokens[:, 2, None]  # the template holds the generated tokens' shift
    pointing = tuple(r for r in decoding if r.state.fronts is not None)
    if pointing:  # where each request's fronts start in a layer's concatenation (the same in every layer)
        sizes = torch.tensor([r.state.fronts[0].numel() for r in pointing])
        bases = dict(zip((r.state.key for r in pointing), (torch.cumsum(sizes, 0) - sizes).tolist()))
        base = torch.tensor([bases.get(r.state.key, 0) for r in decoding for _ in range(r.q_len)])
        lists = items[..., 7] >= 0
        items[..., 7] += torch.where(lists, base[:, None], 0)
    if fused:
        work = tuple(items.reshape(num_layers, -1, WORK_COLUMNS))
    else:
        compressed = ~full
        work = tuple(items[layer][:, compressed[layer]].reshape(-1, WORK_COLUMNS) for layer in range(num_layers))
    prefilling = RowSubset.of(tuple(r for r in rows if not r.decoding)) if prefill else None
    return StepPlan(rows, tuple(r for r in rows if r.ends_prompt), decoding, prefill, fused, work,
                    _drift_phases(decoding, drift_interval), prefilling, moved=_moved(decoding, tokens, num_pools),
                    fronts=pointing, continues_prompt=continues)


def _moved(decoding: tuple[Row, ...], tokens: torch.Tensor, num_pools: int) -> tuple[MovedWrites | None, ...]:
    """Per pool class, the decoding tokens it stores at shifted positions (``StepPlan.moved``);
    ``tokens``: int64 ``[n, 3]`` (token, row, position + 1) of the decoding tokens."""
    if not num_pools:
        return ()
    shifts = torch.stack([r.state.shifts for r in decoding for _ in range(r.q_len)])  # [n, pools]; -1: in place
    out = []
    for c in range(num_pools):
        moved = shifts[:, c] >= 0
        if not bool(moved.any()):
            out.append(None)
            continue
        out.append(MovedWrites(tokens[moved, 0], tokens[moved, 1], tokens[moved, 2] - 1 + shifts[moved, c]))
    return tuple(out)


def _drift_phases(decoding: tuple[Row, ...], interval: int) -> tuple[DriftPhase, ...]:
    tracked = [r for r in decoding if r.state.ring is not None]
    phases = []
    for j in range(max((r.q_len for r in tracked), default=0)):
        rows = [r for r in tracked if r.q_len > j]
        places = [(r.state.buffered + j) % interval for r in rows]
        phases.append(DriftPhase(
            tokens=torch.tensor([r.start + j for r in rows], dtype=torch.int64),
            slots=torch.tensor([r.state.ring for r in rows], dtype=torch.int64),
            places=torch.tensor(places, dtype=torch.int64),
            checks=tuple(DriftCheck(r, r.first + j + 1) for r, n in zip(rows, places) if n == interval - 1),
        ))
    return tuple(phases)


def work_template(budgets: Budgets, store_of: torch.Tensor, placements: tuple[RowPlacement, ...]) -> torch.Tensor:
    """A request's gather-kernel items, int64 ``[layers, H, 8]``, without the per-token columns
    (token, row, and ``p + 1`` added to ``gen_end``, which holds the shift).

    A head attends over its kept prompt tokens and its generated tokens, where its store (the pool
    of its cache) keeps them (``placement``): in a store that keeps a selection for the request,
    ``B_h`` slots from ``front_start`` (or, after a prefix-cache hit, the row positions of its row
    of ``RequestState.fronts``: ``front_list``) and generated tokens from ``L + shift``; in a
    store that keeps every token at its own position, ``0 .. p`` -- or, for a head that keeps
    ``B_h < L`` prompt tokens there (a compressed head in a full pool's cache, with tensor
    parallelism), the ``B_h`` positions its fronts row points at and ``L .. p``.

    ``store_of``: int64 ``[layers, H]``, each local head's store (``LayerHeads.store``;
    ``FULL_POOL``, -1, for full caches); ``placements``: the request's placement in each pool class."""
    num_layers, hkv = budgets.per_head.shape
    items = torch.zeros(num_layers, hkv, WORK_COLUMNS, dtype=torch.int64)
    items[..., 1] = torch.arange(hkv)
    L = budgets.prompt_len
    selecting = torch.tensor([False] + [not p.positional for p in placements])[store_of + 1]  # [layers, H]
    in_place = ~selecting & (budgets.per_head < L)  # kept tokens read where they are, in a positional store
    pointing = torch.tensor([False] + [p.shared_blocks > 0 for p in placements])[store_of + 1] | in_place
    shift = torch.tensor([0] + [p.shift for p in placements], dtype=torch.int64)[store_of + 1]
    start = placements[0].selection_start if placements else 0  # (the same in every pool: after the prompt)
    items[..., 3] = torch.where(selecting | in_place, budgets.per_head, 0)
    items[..., 4] = torch.where(selecting | in_place, L + shift, 0)
    items[..., 5] = torch.where(selecting, shift, 0)
    items[..., 6] = torch.where(selecting, start, 0)
    # a pointing head's row of its request's fronts (RequestState.fronts), within the layer's
    items[..., 7] = torch.where(pointing, torch.arange(hkv) * front_width(budgets), -1)
    return items


def front_width(budgets: Budgets) -> int:
    """The width of a request's ``RequestState.fronts``: its largest compressed head's budget."""
    compressed = budgets.per_head[~budgets.full]
    return int(compressed.max()) if compressed.numel() else 0
