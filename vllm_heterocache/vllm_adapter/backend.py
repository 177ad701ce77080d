"""The HETEROCACHE attention backend for vLLM 0.32 (CPU platform).

Plan/run split: the metadata builder plans each engine step once (which rows are prefill chunks,
which request state each row belongs to, budgets at the end of prefill); the impl's forward runs
the base backend over all heads and then HeteroCache's steps for this layer.

Per step and layer:
1. the base backend (vLLM's CPU_ATTN kernel) computes attention for every token and head: exact
   for prefill tokens and for full heads (volatile, pivot), which keep every token;
2. at the end of every prefill chunk, compressed heads select their budgeted tokens and pivots
   record their reference top-K (``runtime.layer.select_after_prefill``);
3. for decode tokens, pivots buffer their queries and, every ``drift_interval`` steps, check
   drift and refill their satellites' selections (``track_drift``), then compressed heads
   (anchor, satellite) re-attend over their kept tokens only and overwrite their output
   (``compressed_attention``).

Stage 0 of the design: the full KV stays in vLLM's cache, so refills re-point the selection
bits; separate pools and the host tier come next. When nothing is compressed (ratio 1 or an
all-full profile) steps 2-3 are skipped and the output is exactly the base backend's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_heterocache.runtime.layer import Row, compressed_attention, select_after_prefill, track_drift
from vllm_heterocache.runtime.model import HeteroCacheRuntime
from vllm_heterocache.runtime.paged import LayerCache
from vllm_heterocache.vllm_adapter.layout import probe_layout
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


class HeteroCacheMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        impls = [layer.impl for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()]
        runtimes = {id(i.runtime) for i in impls if isinstance(i, HeteroCacheImpl)}
        if len(runtimes) != 1:
            raise RuntimeError(f"heterocache: layers {layer_names} do not share one runtime")
        self.runtime: HeteroCacheRuntime = impls[0].runtime

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        rows = plan_rows(self.runtime, common_attn_metadata) if self.runtime.compresses else ()
        return HeteroCacheMetadata(**vars(base), rows=rows)


def plan_rows(rt: HeteroCacheRuntime, cm: CommonAttentionMetadata) -> tuple[Row, ...]:
    """Per-row plan of one engine step; creates and advances request states."""
    if cm.is_prefilling is None:
        raise RuntimeError("heterocache needs CommonAttentionMetadata.is_prefilling (vLLM >= 0.32 runners)")
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].tolist()
    seq_lens = cm.seq_lens[:n].cpu().tolist()
    prefilling = cm.is_prefilling[:n].cpu().tolist()
    table = cm.block_table_tensor[:n].cpu()
    bs = rt.planner.block_size
    rt.requests.forget_reused(table, torch.tensor([(s + bs - 1) // bs for s in seq_lens]))
    rows = []
    for i in range(n):
        q_len = qsl[i + 1] - qsl[i]
        if q_len == 0:
            continue
        seq_len = seq_lens[i]
        key = int(table[i, 0])
        if prefilling[i]:
            state = rt.requests.begin(key) if seq_len == q_len else rt.requests.get(key)
            state.plan = rt.planner.plan(seq_len)
            state.decode_steps = 0
            steps_before = 0
        else:
            state = rt.requests.get(key)
            steps_before = state.decode_steps
            state.decode_steps += q_len
            if q_len > 1:
                rt.counters.recomputed_rows += 1
        rows.append(Row(qsl[i], q_len, seq_len, table[i], bool(prefilling[i]), state, steps_before))
    return tuple(rows)


class HeteroCacheImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        check_layer(attn_type, sliding_window, alibi_slopes, sinks, logits_soft_cap, kv_cache_dtype,
                    kv_sharing_target_layer_name)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.runtime = runtime_for(get_current_vllm_config())
        self.layer_index: int | None = None
        self.kept_bits: torch.Tensor | None = None  # [num_blocks, H_kv, block_size], see runtime.paged

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if attn_metadata is None or not getattr(attn_metadata, "rows", ()):
            return output
        rt = self.runtime
        if self.layer_index is None:
            self.layer_index = extract_layer_index(layer.layer_name)
        li = self.layer_index
        heads = rt.layers[li]
        if not heads.compressed and not heads.pivots:
            return output
        cache = self._cache(layer, kv_cache)
        for row in attn_metadata.rows:
            if row.prefilling:
                select_after_prefill(rt, li, heads, row, query, cache)
                continue
            if rt.config.refill and heads.pivots:
                track_drift(rt, li, heads, row, query, cache)
            if heads.compressed:
                compressed_attention(heads, row, query, cache, self.scale, output)
        return output

    def _cache(self, layer, kv_cache: torch.Tensor) -> LayerCache:
        shape = kv_cache.shape[:3]
        if self.kept_bits is None or self.kept_bits.shape != shape:
            self.kept_bits = torch.zeros(shape, dtype=torch.bool)
        layout = probe_layout(layer.isa, kv_cache.dtype, kv_cache.shape[2], kv_cache.shape[3] // 2)
        return LayerCache(kv_cache, layout, self.kept_bits)
