"""Every change this plugin makes to vLLM's own code, in one place.

vLLM exposes no hook for these; each patch is narrow, idempotent, applied by ``register()`` (never
at import), and listed here with the reason and when it can go.

| patch | why | remove when |
|---|---|---|
| ``CpuPlatform.get_attn_backend_cls`` | on CPU, vLLM 0.32 returns CPU_ATTN for every decoder layer whatever backend was asked for (``platforms/cpu.py``), logging only "Cannot use ... backend on CPU"; the HETEROCACHE selection would be silently replaced by the stock backend | vLLM's CPU platform honours registered custom backends |
| pickling of the ``AttentionBackendEnum.HETEROCACHE`` member | a member created at run time pickles by value, and spawned engine/worker processes unpickle the config before plugins load, so the lookup fails there | vLLM loads plugins before unpickling configs, or pickles members by name |
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


def _restore_member(name: str, path: str):
    """Unpickling hook of the run-time enum member: registers the backend first if needed."""
    from vllm_heterocache.vllm_adapter.registration import register_backend_member

    return register_backend_member(name, path)


def pickle_member_by_name(member, name: str, path: str) -> None:
    member.__reduce_ex__ = lambda protocol: (_restore_member, (name, path))
