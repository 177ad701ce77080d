"""The HETEROCACHE attention backend for vLLM 0.32 (CPU platform).

Plan/run split: the metadata builders plan each engine step once (which request each row is,
where its prompt ends; ``HeteroCacheRuntime.plan_rows``); the impl runs each layer.

Each KV head of a layer has a cache of its own (``vllm_adapter.pools``): head 0 the layer's, the
others companion cache layers; full heads' caches are in the full pool's KV cache group,
compressed heads' in their budget class's. Per step and layer:

1. cache write: each head's cache gets its new K/V at vLLM's slot mapping of its group;
   satellites' prompt K/V is mirrored to the host tier;
2. full heads attend over their caches with vLLM's CPU kernel; compressed heads too when the
   step has prefill rows (exact: the prompt is still whole in their caches then). A step of
   single-token decode rows runs the full heads in the compiled gather kernel instead, together
   with the compressed heads (one call per layer, step 4);
3. a row holding the last prompt token: compressed heads select their budget and compact it,
   pivots record their reference top-K (``runtime.layer.select_and_compact``);
4. decode rows: compressed heads attend over their kept tokens only, after waiting for their
   pending refill; pivots buffer queries and check drift, starting refills from the host tier.

When nothing is compressed (ratio 1 or an all-full profile) the layer's cache is not split and
the backend is vLLM's CPU backend, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_heterocache.runtime.layer import (
    LayerPools,
    decode_attention,
    kernel_decodes,
    mirror_to_host,
    select_and_compact,
    track_drift,
)
from vllm_heterocache.runtime.model import HeteroCacheRuntime, LayerHeads, Row
from vllm_heterocache.runtime.paged import LayerCache
from vllm_heterocache.vllm_adapter.layout import probe_layout
from vllm_heterocache.vllm_adapter.pools import head_cache_name
from vllm_heterocache.vllm_adapter.registration import BACKEND_NAME
from vllm_heterocache.vllm_adapter.startup import check_layer, runtime_for


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
    rows: tuple[Row, ...] = ()
    isa: str = ""  # the CPU kernels' ISA for this pool's block size


class HeteroCacheMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU metadata for one pool (its query heads are those of the pool's KV heads) + the rows."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime: HeteroCacheRuntime = runtime_for(vllm_config)
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        group = model.get_num_attention_heads(parallel) // model.get_num_kv_heads(parallel)
        self.num_heads = kv_cache_spec.num_kv_heads * group

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        rows = ()
        if self.runtime.compresses:
            cm = common_attn_metadata
            n = cm.num_reqs
            rows = self.runtime.plan_rows(cm.query_start_loc_cpu[: n + 1].tolist(), cm.seq_lens[:n].cpu().tolist())
        return HeteroCacheMetadata(**vars(base), rows=rows, isa=self.isa)


@dataclass(frozen=True)
class _Pool:
    cache: torch.Tensor  # one KV head: [num_blocks, 1, block_size, 2 * D]
    metadata: HeteroCacheMetadata | None
    slot_mapping: torch.Tensor | None


class HeteroCacheImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        check_layer(attn_type, sliding_window, alibi_slopes, sinks, logits_soft_cap, kv_cache_dtype,
                    kv_sharing_target_layer_name)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.runtime = runtime_for(get_current_vllm_config())
        self._heads: LayerHeads | None = None
        self._layer_index = -1

    # -- which pools this layer has ------------------------------------------------------------

    def _layer(self, layer) -> tuple[int, LayerHeads]:
        if self._heads is None:
            self._layer_index = extract_layer_index(layer.layer_name)
            self._heads = self.runtime.layers[self._layer_index]
        return self._layer_index, self._heads

    def _pools(self, layer, kv_cache, own_slots) -> list[_Pool]:
        """The cache of each local KV head of this layer in the current step."""
        ctx = get_forward_context()
        meta = ctx.attn_metadata if isinstance(ctx.attn_metadata, dict) else {}
        slots = ctx.slot_mapping if isinstance(ctx.slot_mapping, dict) else {}
        pools = [_Pool(kv_cache, meta.get(layer.layer_name), own_slots)]
        for j in range(1, self.num_kv_heads):
            name = head_cache_name(layer.layer_name, j)
            pools.append(_Pool(ctx.no_compile_layers[name].kv_cache, meta.get(name), slots.get(name)))
        return pools

    # -- 1. cache write ------------------------------------------------------------------------

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.runtime.compresses:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        _, heads = self._layer(layer)
        pools = self._pools(layer, kv_cache, slot_mapping)
        for j, pool in enumerate(pools):
            self._write(layer, key[:, j : j + 1], value[:, j : j + 1], pool)
        meta = pools[0].metadata
        if meta is not None:
            for row in meta.rows:
                mirror_to_host(self.runtime, heads, row, key, value)

    def _write(self, layer, key, value, pool: _Pool) -> None:
        nb, h, bs, _ = pool.cache.shape
        key_cache, value_cache = pool.cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
        isa = pool.metadata.isa if pool.metadata is not None else layer.isa
        ops.cpu_attn_reshape_and_cache(
            key.contiguous(), value.contiguous(), key_cache, value_cache, pool.slot_mapping, isa,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype,
        )

    # -- 2-4. attention ------------------------------------------------------------------------

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        rt = self.runtime
        if attn_metadata is None or not rt.compresses:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        li, heads = self._layer(layer)
        per_head = self._pools(layer, kv_cache, None)
        pools = LayerPools(tuple(self._cache(p) for p in per_head), tuple(p.metadata.block_table for p in per_head))
        rows = attn_metadata.rows
        prefill = not rows or any(not row.decoding for row in rows)
        fused = not prefill and kernel_decodes(list(rows), pools)  # full heads in the gather kernel
        for j, pool in enumerate(per_head):
            if prefill or (j in heads.full and not fused):
                self._attend(layer, query, j, pool, output)
        for row in rows:
            if row.ends_prompt:
                select_and_compact(rt, li, heads, row, query, self.num_kv_heads, pools)
        decoding = [row for row in rows if row.decoding]
        for row in decoding:
            rt.refills.wait(row.state.key, li)
        if decoding and (heads.compressed or fused):
            decode_attention(heads, decoding, query, self.num_kv_heads, pools, li, self.scale, output, full=fused)
        if rt.config.refill and heads.pivots:
            for row in decoding:
                track_drift(rt, li, heads, row, query, self.num_kv_heads, pools)
        return output

    def _attend(self, layer, query, head: int, pool: _Pool, output) -> None:
        """vLLM's CPU kernel for the query heads of KV head ``head`` over its cache."""
        meta = pool.metadata
        n = meta.num_actual_tokens
        hkv, d = self.num_kv_heads, self.head_size
        g = self.num_heads // hkv
        q = query[:n].view(n, hkv, g, d)[:, head]  # [n, G, D], strided
        out = torch.empty(n, g, d, dtype=output.dtype)
        nb, h, bs, _ = pool.cache.shape
        key_cache, value_cache = pool.cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
        ops.cpu_attention_with_kv_cache(
            query=q.contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=self.scale, causal=meta.causal,
            alibi_slopes=None, sliding_window=self.sliding_window, block_table=meta.block_table,
            softcap=self.logits_soft_cap, scheduler_metadata=meta.scheduler_metadata, s_aux=None,
            dynamic_causal=meta.dynamic_causal, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        output[:n].view(n, hkv, g, -1)[:, head] = out

    def _cache(self, pool: _Pool) -> LayerCache:
        kv = pool.cache
        return LayerCache(kv, probe_layout(pool.metadata.isa, kv.dtype, kv.shape[2], kv.shape[3] // 2))
