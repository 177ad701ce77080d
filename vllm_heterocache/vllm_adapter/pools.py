"""Separate KV pools for full and compressed heads, carved from vLLM's own KV cache budget.

Each attention layer's KV cache spec is split per KV head (``split_kv_cache_specs``, applied to
the model runner's specs by ``runner_hooks``) into the layer's caches (``LayerHeads.cache_pools``,
one per local head; with tensor parallelism padded to the same caches on every rank, see
``sharding``): cache 0 is the layer's own, cache ``j > 0`` a companion cache layer
``<layer>.heterocache.<j in letters>``, each holding one head:

- full heads (volatile, pivot): a ``FullAttentionSpec``: every token, the stock block manager;
- compressed heads (anchor, satellite): a ``CompressedPoolSpec`` of the head's budget class,
  whose block manager (``CompressedPoolManager``) lays each request's row out as
  ``placement.RowPlacement`` says: the prompt at its own positions (so prefill peak memory is
  NOT reduced, as in the reference code), a private selection region of ``ceil(B_max / bs)``
  blocks that comes with the prompt's last block, then the generated tokens. Once the prompt is
  processed (the worker has copied each head's selection by then, ``runtime.layer``), it
  releases the prompt's blocks. A request's budget follows its policy and ratio
  (``vllm_xargs``): the manager reads them from the request when the scheduler first allocates
  its slots (:func:`note_request`), by the same function as the workers
  (``budget.request_terms``).

Prefix caching. Every pool shares prompt blocks through vLLM's own prefix cache (block hashes,
its LRU): a compressed pool hashes the blocks of its prompt region only -- never its selection,
which depends on the request -- so a released prompt block stays cached, intact, for the next
request with the same prefix. A prefix-cache hit stops at ``L - window`` (:func:`hit_limit`):
the observation window's queries are computed, never taken from another request, so a request
selects the same tokens with a hit as without one. (A later request that extends this one, a
chat's next turn, hits its prompt; its generated tokens are computed again, as the compressed
pools do not hash blocks that mix prompt and generated tokens.)

One head per cache makes every page the same size (no padding when vLLM unifies pages), and
vLLM groups the caches by spec into KV cache groups (block tables) of one size: the full pool's
caches in some, each budget class's in others (``budget.Budgeter.capacity_classes`` sizes
the classes so that few slots are padded). It sizes one block pool for all groups from
``VLLM_CPU_KVCACHE_SPACE`` (or
``gpu_memory_utilization``), so its scheduler admits requests against the real footprint and its
block accounting stays honest. Nothing is allocated behind vLLM's back except the host tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec

from vllm_heterocache.budget import PoolCapacity, ServerTerms, request_terms
from vllm_heterocache.placement import RowPlacement
from vllm_heterocache.runtime.core import HeteroCacheRuntime
from vllm_heterocache.sharding import FULL_POOL
from vllm_heterocache.vllm_adapter import BACKEND_NAME, compat

COMPANION_INFIX = ".heterocache."


@dataclass(frozen=True, kw_only=True)
class CompressedPoolSpec(AttentionSpec):
    """KV of one compressed head of a budget class: every prompt token during prefill, then the
    class's largest budget plus the generated tokens (``capacity`` says how many for a prompt
    of the server's policy; :meth:`placement_for`, where a request's own are)."""

    terms: ServerTerms  # the server's terms of this pool's class alone (``ServerTerms.of_class``)
    # one of the budget classes it holds (``HeteroCacheRuntime.capacities``): classes of equal
    # terms have equal specs, which vLLM puts in one KV cache group, and lay a request's tokens
    # out alike (``placement``)
    pool: int = field(compare=False)

    @property
    def capacity(self) -> PoolCapacity:
        return self.terms.capacities[0]

    def placement_for(self, prompt_len: int, extra_args, hit: int = 0) -> RowPlacement:
        """Where a request with ``SamplingParams.extra_args`` ``extra_args`` keeps its tokens in
        this class's pool (``placement``), ``hit`` of its prompt tokens from the prefix cache."""
        terms = request_terms(self.terms, extra_args)  # (the worker logs arguments that do not parse)
        return terms.placement(0, prompt_len, self.block_size, hit)

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # block-table columns of any request's row (released prompt columns keep their places):
        # a request's own policy or ratio (vllm_xargs) may select more than the server's, up to
        # its whole prompt
        return RowPlacement.max_row_blocks(max_len, self.block_size)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # A request's peak is the step of its prompt's last chunk: its prompt and its selection
        # region (afterwards the prompt's blocks are released), for the server's policy and ratio
        # (vLLM's startup check); the scheduler allocates what each request's own placement needs.
        placement = self.capacity.placement(vllm_config.model_config.max_model_len, self.block_size)
        return placement.peak_blocks * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(s, CompressedPoolSpec) and s.terms == self.terms
            for s in kv_cache_specs.values()
        )


class CompressedPoolManager(FullAttentionManager):
    """A compressed pool's blocks, laid out per request by its ``RowPlacement``: columns for the
    prompt (hashed and shared like any pool's), the selection region (with the prompt's last
    block; never hashed) and the generated tokens; the prompt's blocks are released once the
    prompt is processed (they stay in the prefix cache). The released columns become vLLM's null
    block, as for sliding-window layers, so later columns keep their block-table slots.
    """

    supports_fine_grained_hash_lookup = False  # hits on whole blocks only

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.placements: dict[str, RowPlacement] = {}  # request id -> its placement (note_request)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               *args, **kwargs):
        # A hit fills the prompt region, which is laid out as a full-attention row.
        full = FullAttentionSpec(block_size=kv_cache_spec.block_size, num_kv_heads=kv_cache_spec.num_kv_heads,
                                 head_size=kv_cache_spec.head_size, head_size_v=kv_cache_spec.head_size_v,
                                 dtype=kv_cache_spec.dtype)
        return super().find_longest_cache_hit(block_hashes, max_length, kv_cache_group_ids, block_pool, full,
                                               *args, **kwargs)

    def _slots(self, request_id: str, num_tokens: int) -> int:
        """Row positions covering tokens ``0 .. num_tokens - 1`` (vLLM's managers count blocks as
        ``cdiv(num_tokens, block_size)``)."""
        placement = self.placements.get(request_id)
        return num_tokens if placement is None else placement.blocks_for(num_tokens) * self.block_size

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, self._slots(request_id, num_tokens), *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        return super().allocate_new_blocks(request_id, self._slots(request_id, num_tokens),
                                           self._slots(request_id, num_tokens_main_model), *args, **kwargs)

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        placement = self.placements.get(request.request_id)
        if placement is None or placement.positional:
            return super().cache_blocks(request, num_tokens, *args, **kwargs)
        cached = self.num_cached_block.get(request.request_id, 0)
        columns = placement.token_block_columns(num_tokens // self.block_size)
        if cached >= len(columns):
            return
        row = self.req_to_blocks[request.request_id]
        self.block_pool.cache_full_blocks(
            request=request, blocks=[row[c] for c in columns], num_cached_blocks=cached, num_full_blocks=len(columns),
            block_size=self.block_size, kv_cache_group_id=self.kv_cache_group_id,
        )
        self.num_cached_block[request.request_id] = len(columns)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        placement = self.placements.get(request_id)
        if placement is None or processed_computed_tokens < placement.prompt_len or not placement.released:
            return  # (every request is noted before its first allocation; an unknown one keeps its blocks)
        compat.remove_blocks_in_range(self, request_id, placement.released.start, placement.released.stop)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.placements.pop(request_id, None)


def note_request(kv_cache_manager, request, hit: int) -> None:
    """Before the scheduler allocates slots for ``request``, ``hit`` of its tokens from the
    prefix cache: the compressed pools' managers note its placement when it has no blocks yet
    (at admission; a preempted request is freed and noted again; an admission that found no room
    is noted again at the next, whose hit may differ)."""
    for manager in compat.single_type_managers(kv_cache_manager):
        if isinstance(manager, CompressedPoolManager) and not manager.req_to_blocks.get(request.request_id):
            spec: CompressedPoolSpec = manager.kv_cache_spec
            manager.placements[request.request_id] = spec.placement_for(request.num_prompt_tokens,
                                                                        compat.request_extra_args(request), hit)


def hit_limit(kv_cache_manager, request) -> int | None:
    """The longest prefix-cache hit ``request`` may take: its prompt up to the observation window
    (``L - window``, down to a block boundary) when a compressed pool selects for it, so that the
    window's queries are computed by this request; None when no pool selects for it."""
    for manager in compat.single_type_managers(kv_cache_manager):
        if isinstance(manager, CompressedPoolManager):
            spec: CompressedPoolSpec = manager.kv_cache_spec
            L = request.num_prompt_tokens
            if not spec.placement_for(L, compat.request_extra_args(request)).positional:
                return max(0, L - spec.capacity.window) // spec.block_size * spec.block_size
    return None


def register_pool_spec() -> None:
    """Map :class:`CompressedPoolSpec` to its manager in vLLM's KV cache spec registry (every
    process that may build KV cache managers; ``registration.register``)."""
    compat.register_kv_cache_spec(CompressedPoolSpec, CompressedPoolManager)
    compat.observe_kv_allocation(note_request)
    compat.limit_prefix_hits(hit_limit)


class HeadCacheLayer(nn.Module, AttentionLayerBase):
    """A companion cache layer holding one KV head of an attention layer. It computes nothing:
    the attention layer reads and writes its ``kv_cache``."""

    def __init__(self, name: str, spec: AttentionSpec, num_heads: int, backend: type):
        super().__init__()
        self.layer_name = name
        self.spec = spec
        self.num_heads = num_heads  # query heads of its KV heads (vLLM groups builders by it)
        self.backend = backend  # its attention layer's backend (builds its metadata)
        self.kv_cache = torch.tensor([])

    def get_kv_cache_spec(self, vllm_config) -> AttentionSpec:
        return self.spec

    def get_attn_backend(self):
        return self.backend


def is_heterocache_layer(module) -> bool:
    """An attention layer served by this backend."""
    backend = getattr(module, "attn_backend", None)
    return backend is not None and backend.get_name() == BACKEND_NAME


def head_cache_name(layer_name: str, cache: int) -> str:
    """The name of cache ``cache`` of attention layer ``layer_name`` (``LayerHeads.cache_of``).

    The cache is spelled in letters (1 -> "b", 26 -> "ba"): vLLM reads the layer index as the
    only integer in a layer name."""
    if cache == 0:
        return layer_name
    letters = ""
    while True:
        cache, digit = divmod(cache, 26)
        letters = chr(ord("a") + digit) + letters
        if cache == 0:
            return f"{layer_name}{COMPANION_INFIX}{letters}"


def split_kv_cache_specs(rt: HeteroCacheRuntime, specs: dict[str, KVCacheSpec], forward_context: dict) -> dict[str, KVCacheSpec]:
    """The runner's per-layer specs with each HeteroCache layer split into its single-head caches.

    Registers the companion layers in ``forward_context`` (vLLM binds their caches and builds
    their metadata like any attention layer's).
    """
    out: dict[str, KVCacheSpec] = {}
    for name, spec in specs.items():
        module = forward_context.get(name)
        if not is_heterocache_layer(module) or not isinstance(spec, AttentionSpec):
            out[name] = spec
            continue
        heads = rt.layers[compat.layer_index(name)]
        group = module.num_heads // spec.num_kv_heads
        for c, pool in enumerate(heads.cache_pools):
            head_spec = replace(spec, num_kv_heads=1) if pool == FULL_POOL else CompressedPoolSpec(
                block_size=spec.block_size,
                num_kv_heads=1,
                head_size=spec.head_size,
                head_size_v=spec.head_size_v,
                dtype=spec.dtype,
                pool=pool,
                terms=rt.terms.of_class(pool),
            )
            store = head_cache_name(name, c)
            if c and store not in forward_context:
                forward_context[store] = HeadCacheLayer(store, head_spec, group, module.attn_backend)
            out[store] = head_spec
    return out
