"""Every change this plugin makes to vLLM's own code, in one place.

vLLM exposes no hook for these; each patch is narrow, idempotent, applied by ``register()`` or,
for the model-runner hooks, when the first HeteroCache layer is built (never at import), and
listed here with the reason and when it can go.

| patch | why | remove when |
|---|---|---|
| ``CpuPlatform.get_attn_backend_cls`` | on CPU, vLLM 0.32 returns CPU_ATTN for every decoder layer whatever backend was asked for (``platforms/cpu.py``), logging only "Cannot use ... backend on CPU"; the HETEROCACHE selection would be silently replaced by the stock backend | vLLM's CPU platform honours registered custom backends |
| pickling of the ``AttentionBackendEnum.HETEROCACHE`` member | a member created at run time pickles by value, and spawned engine/worker processes unpickle the config before plugins load, so the lookup fails there | vLLM loads plugins before unpickling configs, or pickles members by name |
| ``GPUModelRunner.get_kv_cache_spec`` (CPU runner inherits it) | a backend can reshape a layer's spec only uniformly (``customize_spec`` gets no layer), but HeteroCache keeps each layer's full and compressed heads in separate pools of per-layer sizes | vLLM lets a backend build per-layer specs and companion caches |
| ``GPUModelRunner.initialize_kv_cache`` | the host tier is sized from the KV cache vLLM allocated | vLLM offers a post-allocation hook to backends |
| ``GPUModelRunner._update_states``, ``_build_attention_metadata``, ``_dummy_run`` | attention backends get no request ids and no finish/preempt callbacks (model runner V1); HeteroCache keeps per-request state and host-tier blocks | backends receive request lifecycle events (e.g. model runner V2's req_idx plus finish callbacks) |
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_APPLIED: set[str] = set()


def honour_backend_on_cpu(backend_name: str, backend_path: str) -> None:
    """Make the CPU platform return our backend's class path when it is the selected one."""
    if "cpu_platform" in _APPLIED:
        return
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and getattr(selected_backend, "name", None) == backend_name:
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise ValueError(
                    "heterocache supports standard multi-head / grouped-query attention only, not MLA "
                    "or sparse attention: serve this model without --attention-backend heterocache"
                )
            return backend_path
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    _APPLIED.add("cpu_platform")


def hook_model_runner() -> None:
    """Give the HeteroCache runtime the runner's specs, request ids and lifecycle (see table)."""
    if "model_runner" in _APPLIED:
        return
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_heterocache.vllm_adapter import runner_hooks

    get_kv_cache_spec = GPUModelRunner.get_kv_cache_spec
    initialize_kv_cache = GPUModelRunner.initialize_kv_cache
    update_states = GPUModelRunner._update_states
    build_attention_metadata = GPUModelRunner._build_attention_metadata
    dummy_run = GPUModelRunner._dummy_run

    def _get_kv_cache_spec(self):
        return runner_hooks.split_specs(self, get_kv_cache_spec(self), extract_layer_index)

    def _initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        result = initialize_kv_cache(self, kv_cache_config, *args, **kwargs)
        runner_hooks.attach_host_tier(self, kv_cache_config)
        return result

    def _update_states(self, scheduler_output):
        runner_hooks.requests_ended(self, scheduler_output)
        return update_states(self, scheduler_output)

    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        runner_hooks.step_begins(self, num_reqs)
        return build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs)

    def _dummy_run(self, *args, **kwargs):
        with runner_hooks.dummy_step(self):
            return dummy_run(self, *args, **kwargs)

    GPUModelRunner.get_kv_cache_spec = _get_kv_cache_spec
    GPUModelRunner.initialize_kv_cache = _initialize_kv_cache
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    GPUModelRunner._dummy_run = _dummy_run
    _APPLIED.add("model_runner")


def _restore_member(name: str, path: str):
    """Unpickling hook of the run-time enum member: registers the backend first if needed."""
    from vllm_heterocache.vllm_adapter.registration import register_backend_member

    return register_backend_member(name, path)


def pickle_member_by_name(member, name: str, path: str) -> None:
    member.__reduce_ex__ = lambda protocol: (_restore_member, (name, path))
