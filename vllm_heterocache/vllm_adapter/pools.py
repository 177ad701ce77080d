"""Separate KV pools for full and compressed heads, carved from vLLM's own KV cache budget.

Each attention layer's KV cache spec is split per KV head (``split_kv_cache_specs``, applied to
the model runner's specs by ``runner_hooks``) into the layer's caches (``LayerHeads.cache_pools``,
one per local head; with tensor parallelism padded to the same caches on every rank, see
``sharding``): cache 0 is the layer's own, cache ``j > 0`` a companion cache layer
``<layer>.heterocache.<j in letters>``, each holding one head:

- full heads (volatile, pivot): a ``FullAttentionSpec``: every token, the stock block manager;
- compressed heads (anchor, satellite): a ``CompressedPoolSpec`` of the head's budget class,
  whose block manager (``CompressedPoolManager``) holds every prompt block while the prompt is
  prefilled (so prefill peak memory is NOT reduced, as in the reference code) and, once the
  prompt is done, frees the blocks between the class's largest budget for the request and the
  end of the prompt (the worker has compacted each head's selection into the first positions by
  then, ``runtime.layer``). Generated tokens get blocks at their own positions, as usual. A
  request's budget follows its policy and ratio (``vllm_xargs``): the manager reads them from
  the request when the scheduler first allocates its slots (:func:`note_request`), by the same
  rules as the workers (``policies.RequestRules``, ``budget.PoolCapacity.for_request``).

One head per cache makes every page the same size (no padding when vLLM unifies pages), and
vLLM groups the caches by spec: one KV cache group (block table) for all full heads, one per
budget class. It sizes one block pool for all groups from ``VLLM_CPU_KVCACHE_SPACE`` (or
``gpu_memory_utilization``), so its scheduler admits requests against the real footprint and its
block accounting stays honest. Nothing is allocated behind vLLM's back except the host tier.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec

from vllm_heterocache.budget import ClassRule, PoolCapacity
from vllm_heterocache.policies import RequestRules
from vllm_heterocache.runtime.model import HeteroCacheRuntime
from vllm_heterocache.sharding import FULL_POOL
from vllm_heterocache.vllm_adapter import BACKEND_NAME, compat

COMPANION_INFIX = ".heterocache."


@dataclass(frozen=True, kw_only=True)
class CompressedPoolSpec(AttentionSpec):
    """KV of one compressed head of a budget class: every prompt token during prefill, then the
    class's largest budget plus the generated tokens (``capacity`` says how many for a prompt
    of the server's policy; :meth:`capacity_for`, for a request's own)."""

    capacity: PoolCapacity
    rules: RequestRules
    class_rules: tuple[ClassRule, ...]  # one per policy of ``rules.floors``

    def capacity_for(self, extra_args) -> PoolCapacity:
        """The class's capacity for a request with ``SamplingParams.extra_args`` ``extra_args``."""
        choice, _ = self.rules.resolve(extra_args)  # (the worker logs a bad one)
        rule = next(r for r in self.class_rules if r.policy == choice.policy)
        return self.capacity.for_request(rule, choice.ratio)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # A request's peak is its prefill, which holds every token.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(s, CompressedPoolSpec) and (s.capacity, s.class_rules) == (self.capacity, self.class_rules)
            for s in kv_cache_specs.values()
        )


class CompressedPoolManager(FullAttentionManager):
    """Frees a request's prompt blocks beyond its largest budget once its prompt is processed.

    Kept: blocks ``[0, ceil(B_max / bs))`` (the compacted selections) and, from block
    ``L // bs`` on, the block holding the first generated position and all later ones. The freed
    middle becomes vLLM's null block, as for sliding-window layers, so later positions keep
    their block-table slots.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacities: dict[str, PoolCapacity] = {}  # request id -> its capacity (note_request)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        capacity = self.capacities.get(request_id)
        if capacity is None or num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
            return  # (every request is noted before its first allocation; an unknown one keeps its blocks)
        kept = cdiv(capacity.max_budget(num_prompt_tokens), self.block_size)
        compat.remove_blocks_in_range(self, request_id, kept, num_prompt_tokens // self.block_size)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.capacities.pop(request_id, None)


def note_request(kv_cache_manager, request) -> None:
    """Before the scheduler allocates slots for ``request``: the compressed pools' managers note
    its capacity (once per admission: a preempted request is freed and noted again)."""
    for manager in compat.single_type_managers(kv_cache_manager):
        if isinstance(manager, CompressedPoolManager) and request.request_id not in manager.capacities:
            spec: CompressedPoolSpec = manager.kv_cache_spec
            manager.capacities[request.request_id] = spec.capacity_for(compat.request_extra_args(request))


def register_pool_spec() -> None:
    """Map :class:`CompressedPoolSpec` to its manager in vLLM's KV cache spec registry (every
    process that may build KV cache managers; ``registration.register``)."""
    compat.register_kv_cache_spec(CompressedPoolSpec, CompressedPoolManager)
    compat.observe_kv_allocation(note_request)


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
                capacity=rt.capacities[pool],
                rules=rt.request_rules,
                class_rules=rt.class_rules[pool],
            )
            store = head_cache_name(name, c)
            if c and store not in forward_context:
                forward_context[store] = HeadCacheLayer(store, head_spec, group, module.attn_backend)
            out[store] = head_spec
    return out
