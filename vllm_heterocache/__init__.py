"""vllm-heterocache: HeteroCache (arXiv 2601.13684) heterogeneous KV-cache compression for vLLM.

This module holds only :func:`register`, vLLM's general-plugin entry point
(``vllm.general_plugins`` in pyproject.toml). It is cheap and imports nothing heavy.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point; vLLM calls it in every process it starts.

    Registers the ``heterocache`` attention backend (``--attention-backend heterocache``).
    Idempotent; imports vLLM's registry only (vLLM is already imported when it runs).
    """
    from vllm_heterocache.vllm_adapter.registration import register as _register

    _register()
