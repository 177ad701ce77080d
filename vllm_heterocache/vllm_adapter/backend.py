"""The HETEROCACHE attention backend for vLLM 0.32 (CPU platform): a thin adapter.

Plan/run split: the runner's step hook plans each engine step once (``runtime.step``); each
pool's metadata builder returns its KV cache group's metadata with that plan in it
(:class:`HeteroCacheMetadata`); the impl reads the plan and each head's group metadata from the
step's metadata, never from the runtime, and executes the plan per layer
(``runtime.layer.attend``). So a step's plan travels with its metadata: steps whose metadata is
built before an earlier step executes (vLLM's async scheduling) each execute their own.

Each KV head of a layer has a cache of its own (``vllm_adapter.pools``): head 0 the layer's, the
others companion cache layers; full heads' caches are in the full pool's KV cache group,
compressed heads' in their budget class's. Per step and layer:

1. cache write: each head's cache gets its new K/V at its group's slot mapping (vLLM's, with the
   generated tokens of a compressed pool moved to their row positions, ``placement``), in its
   pool's layout (``block_layout``: vLLM's write for the full pool, ``ops.kernels.write_slots``
   for compressed pools, which keep K token-major); satellites' prompt K/V is mirrored to the
   host tier;
2. attention as planned: vLLM's CPU kernel per head where the plan says so (over a compressed
   pool's prefilling rows, staged into vLLM's layout first), prefill selection and compaction at
   the end of a prompt, the compiled gather kernel for decoding tokens, drift checks and
   refills.

When nothing is compressed (ratio 1 or an all-full profile) the layer's cache is not split and
the backend is vLLM's CPU backend, unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_heterocache.ops import kernels
from vllm_heterocache.ops.paged import BlockLayout
from vllm_heterocache.runtime.core import HeteroCacheRuntime
from vllm_heterocache.runtime.heads import LayerHeads
from vllm_heterocache.runtime.layer import LayerCaches, LayerStep, attend, mirror_to_host
from vllm_heterocache.runtime.step import RowSubset, StepPlan
from vllm_heterocache.runtime.timing import section
from vllm_heterocache.vllm_adapter import BACKEND_NAME, compat
from vllm_heterocache.sharding import FULL_POOL
from vllm_heterocache.vllm_adapter.block_layout import compressed_pool_layout, probe_layout
from vllm_heterocache.vllm_adapter.pools import CompressedPoolSpec, head_cache_name
from vllm_heterocache.vllm_adapter.startup import check_layer, runtime_for

log = logging.getLogger("vllm.heterocache")


class HeteroCacheBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[HeteroCacheImpl]:
        return HeteroCacheImpl

    @staticmethod
    def get_builder_cls() -> type[HeteroCacheMetadataBuilder]:
        return HeteroCacheMetadataBuilder


@dataclass
class HeteroCacheMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata of one KV cache group in one step (block table, slot mapping, and
    vLLM's kernel plan of the step's rows unless the step is fused), and what a layer reads of the
    step: its plan (the same object in the metadata of every group of the step), in a mixed
    step the group's metadata of the plan's prefilling rows, and the layout of the group's
    caches."""

    isa: str = ""  # the CPU kernels' ISA for this pool's block size
    plan: StepPlan | None = None
    prefilling: CPUAttentionMetadata | None = None
    layout: BlockLayout | None = None  # the block layout of this group's caches
    vllm_layout: BlockLayout | None = None  # vLLM's (its kernel's and cache write's) for them
    staging: Staging | None = None  # caches in a layout of their own: what vLLM's kernel reads in prefill


@dataclass(frozen=True)
class Staging:
    """How a prefill step's rows of a group whose caches are not in vLLM's layout are staged for
    vLLM's kernel (``HeteroCacheImpl._stock``), the same for every cache of the group: ``blocks``
    (int64 ``[n]``, each block the rows read, once however many rows share it, a prefix-cache
    hit) are copied to scratch blocks ``0 .. n - 1``, and ``meta`` is the rows' metadata with
    that scratch's block table."""

    blocks: torch.Tensor
    meta: CPUAttentionMetadata

    @classmethod
    def of(cls, meta: CPUAttentionMetadata, block_size: int) -> Staging:
        counts = (meta.seq_lens.long() + block_size - 1) // block_size  # [rows] blocks per row
        used = torch.arange(int(counts.max()))[None, :] < counts[:, None]  # [rows, width]
        blocks, where = torch.unique(meta.block_table[:, : used.shape[1]][used], return_inverse=True)
        table = torch.zeros(used.shape, dtype=meta.block_table.dtype)
        table[used] = where.to(table.dtype)
        return cls(blocks.long(), replace(meta, block_table=table))


class HeteroCacheMetadataBuilder(CPUAttentionMetadataBuilder):
    """The metadata of one pool's KV cache group (its query heads are those of the pool's KV
    heads) for the step that the step hook planned (``HeteroCacheRuntime.planned``). In a
    fused step no layer runs vLLM's kernel, so vLLM's kernel plan (scheduler metadata) is not
    built."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime: HeteroCacheRuntime = runtime_for(vllm_config)
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        group = model.get_num_attention_heads(parallel) // model.get_num_kv_heads(parallel)
        self.num_heads = kv_cache_spec.num_kv_heads * group
        inner = getattr(kv_cache_spec, "kv_cache_specs", None)  # (a group of several specs of one type)
        spec = next(iter(inner.values())) if inner else kv_cache_spec
        self.pool = spec.pool if isinstance(spec, CompressedPoolSpec) else None  # None: the full pool
        if self.runtime.compresses:
            self.vllm_layout = probe_layout(self.isa, kv_cache_spec.dtype, kv_cache_spec.block_size,
                                            kv_cache_spec.head_size)
            in_place = vllm_config.cache_config.enable_prefix_caching and self.runtime.config.shared_prefixes == "point"
            self.layout = (self.vllm_layout if self.pool is None
                           else compressed_pool_layout(self.vllm_layout, reads_in_place=in_place))
            if self.runtime.attach_layout(FULL_POOL if self.pool is None else self.pool, self.layout) \
                    and self.layout is not self.vllm_layout:
                log.info("heterocache: compressed pool %d keeps K token-major (selections read in place in shared "
                         "prompt blocks; prefill stages its rows into vLLM's layout)", self.pool)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        if not self.runtime.compresses:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = self.runtime.planned
        cm = common_attn_metadata
        slot_mapping = self._slot_mapping(plan, cm)
        if plan.fused:
            return HeteroCacheMetadata(
                num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor, slot_mapping=slot_mapping, scheduler_metadata=None,
                isa=self.isa, plan=plan, layout=self.layout, vllm_layout=self.vllm_layout,
            )
        meta = HeteroCacheMetadata(**vars(super().build(common_prefix_len, common_attn_metadata, fast_build)),
                                   isa=self.isa, plan=plan, layout=self.layout, vllm_layout=self.vllm_layout)
        meta.slot_mapping = slot_mapping
        if plan.prefilling is not None:
            meta.prefilling = self._prefilling(plan.prefilling, meta)
        # a compressed pool in a layout of its own: vLLM's kernel reads its prefilling rows, staged
        # (only a step with a prefilling row runs vLLM's kernel on a compressed head, runtime.layer.attend)
        if plan.prefill and self.layout is not self.vllm_layout:
            meta.staging = Staging.of(meta.prefilling or meta, self.kv_cache_spec.block_size)
        return meta

    def _slot_mapping(self, plan: StepPlan, cm: CommonAttentionMetadata) -> torch.Tensor:
        """vLLM's slot mapping of this group, with the tokens the step stores away from their
        own positions in this pool (``StepPlan.moved``) at their row positions."""
        moved = plan.moved[self.pool] if self.pool is not None and plan.moved else None
        if moved is None:
            return cm.slot_mapping
        bs = self.kv_cache_spec.block_size
        blocks = cm.block_table_tensor[moved.rows, moved.positions // bs].to(cm.slot_mapping.dtype)
        out = cm.slot_mapping.clone()
        out[moved.tokens] = blocks * bs + moved.positions % bs
        return out

    def _prefilling(self, sub: RowSubset, meta: HeteroCacheMetadata) -> CPUAttentionMetadata:
        """The group's metadata of the prefilling rows of a mixed step."""
        assert meta.dynamic_causal is None, "decoder attention: causal masks are static"
        return CPUAttentionMetadata(
            num_actual_tokens=sub.num_tokens, max_query_len=sub.max_query_len, query_start_loc=sub.query_start_loc,
            max_seq_len=sub.max_seq_len, seq_lens=sub.seq_lens, block_table=meta.block_table[sub.index],
            slot_mapping=None,  # unused: the cache write takes the whole step's
            scheduler_metadata=compat.cpu_kernel_plan(self, sub.query_start_loc, sub.seq_lens, meta.causal),
            causal=meta.causal,
        )


@dataclass(frozen=True)
class _Layer:
    """What is fixed about a layer once vLLM has bound its caches."""

    index: int  # model layer
    heads: LayerHeads
    own: torch.Tensor  # the layer's own cache (cache 0), as vLLM passes it
    caches: tuple[torch.Tensor, ...]  # local KV head j: [num_blocks, 1, block_size, 2 * D]
    names: tuple[str, ...]  # local KV head j: the name of its cache layer (its KV cache group's metadata)
    scales: tuple[float, float]


class HeteroCacheImpl(CPUAttentionBackendImpl):
    """Executes a step's plan per layer; reads only the step's metadata (``HeteroCacheMetadata``:
    the plan and each head's group metadata), its layer, and the request states the plan names."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        check_layer(attn_type, sliding_window, alibi_slopes, sinks, logits_soft_cap, kv_cache_dtype,
                    kv_sharing_target_layer_name)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.runtime = runtime_for(get_current_vllm_config())
        self._bound: _Layer | None = None

    def _layer(self, layer, kv_cache: torch.Tensor) -> _Layer:
        """The layer's index, heads and per-head caches, resolved once (again if vLLM rebinds)."""
        bound = self._bound
        if bound is None or bound.own is not kv_cache:
            index = compat.layer_index(layer.layer_name)
            heads = self.runtime.layers[index]
            names = tuple(head_cache_name(layer.layer_name, c) for c in heads.cache_of)
            others = [n for n in names if n != layer.layer_name]
            companions = dict(zip(others, compat.companion_caches(others)))
            bound = self._bound = _Layer(
                index, heads, kv_cache, tuple(kv_cache if n == layer.layer_name else companions[n] for n in names),
                names, compat.kv_scales(layer),
            )
        return bound

    @staticmethod
    def _metadata(bound: _Layer) -> tuple[HeteroCacheMetadata, ...]:
        """Each local KV head's metadata in this step: its cache's KV cache group's."""
        metas = compat.step_metadata(bound.names)
        assert all(m.plan is metas[0].plan for m in metas), "one step's metadata has one plan"
        return metas

    def _step(self, bound: _Layer, metas: tuple[HeteroCacheMetadata, ...]) -> LayerStep:
        rt = self.runtime
        caches = LayerCaches(bound.caches, tuple(m.block_table for m in metas), tuple(m.layout for m in metas))
        return LayerStep(rt.parts, bound.index, bound.heads, caches, metas[0].plan, self.scale)

    # -- 1. cache write ------------------------------------------------------------------------

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        with section("attention"):
            self._write(layer, key, value, kv_cache, slot_mapping)

    def _write(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.runtime.compresses:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        bound = self._layer(layer, kv_cache)
        metas = self._metadata(bound)
        for j, (cache, meta) in enumerate(zip(bound.caches, metas)):
            if meta.layout is meta.vllm_layout:
                compat.write_kv(key[:, j : j + 1], value[:, j : j + 1], cache, meta.slot_mapping, meta.isa,
                                bound.scales, self.kv_cache_dtype)
            else:  # a compressed pool's own layout (block_layout.compressed_pool_layout)
                n = meta.slot_mapping.numel()
                kernels.write_slots(cache, meta.layout, meta.slot_mapping, key[:n, j], value[:n, j])
        if metas[0].plan.rows and bound.heads.host_rows:
            mirror_to_host(self._step(bound, metas), key, value)

    # -- 2. attention --------------------------------------------------------------------------

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        with section("attention"):
            return self._forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale):
        if attn_metadata is None or not self.runtime.compresses:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        bound = self._layer(layer, kv_cache)
        metas = self._metadata(bound)
        step = self._step(bound, metas)

        def stock(head: int, prefilling: bool) -> None:
            self._stock(bound, metas[head], step, query, head, output, prefilling)

        attend(step, query, key, value, output, stock)
        return output

    def _stock(self, bound: _Layer, meta: HeteroCacheMetadata, step: LayerStep, query, head: int, output,
               prefilling: bool) -> None:
        """vLLM's CPU kernel for the query heads of KV head ``head`` over its cache (``meta``: its
        group's metadata), for every row of the step or for the plan's prefilling rows only. A
        cache in a layout of its own (a compressed pool's) is staged into vLLM's first."""
        cache, group = bound.caches[head], meta
        if prefilling:
            meta, tokens = meta.prefilling, step.plan.prefilling.tokens
        else:
            tokens = slice(0, meta.num_actual_tokens)
        if group.layout is not group.vllm_layout:
            assert meta is (group.prefilling or group), "a compressed pool's prefilling rows are staged"
            cache, meta = self._staged(cache, group.layout, group.vllm_layout, group.staging), group.staging.meta
        hkv, d = self.num_kv_heads, self.head_size
        g = self.num_heads // hkv
        out = torch.empty(meta.num_actual_tokens, g, d, dtype=output.dtype)
        q = query.view(query.shape[0], hkv, g, d)[tokens, head].contiguous()
        compat.cpu_attention(q, cache, out, meta, self.scale, self.sliding_window, self.logits_soft_cap,
                             bound.scales, self.kv_cache_dtype)
        output.view(output.shape[0], hkv, g, d)[tokens, head] = out

    _scratch: torch.Tensor | None = None  # staging blocks, shared by the layers (they run one at a time)

    @classmethod
    def _staged(cls, cache: torch.Tensor, layout: BlockLayout, vllm_layout: BlockLayout,
                staging: Staging) -> torch.Tensor:
        """A scratch cache in vLLM's layout holding ``staging.blocks`` of ``cache`` (a cache whose
        layout is not vLLM's), for vLLM's kernel with ``staging.meta``. A prefill reads every
        position of its rows anyway; the copy (``heterocache::stage_blocks``, at memory speed) is
        a small part of that work."""
        n = staging.blocks.numel()
        scratch = cls._scratch
        if scratch is None or scratch.shape[0] < n or scratch.shape[1:] != cache.shape[1:] \
                or scratch.dtype != cache.dtype:
            scratch = cls._scratch = torch.empty((max(n, 64), *cache.shape[1:]), dtype=cache.dtype)
        kernels.stage_blocks(cache, layout, staging.blocks, scratch, vllm_layout)
        return scratch
