"""Thin adapters between HeteroCache and vLLM 0.32: the only modules of the package that import
vLLM. Imports go one way, each module using only those before it in this chain::

    compat -> block_layout -> pools -> request_args -> metrics -> runner_hooks -> startup -> backend -> registration

``compat`` holds every private vLLM name and every patch (with its ledger row); ``registration``
is what ``vllm_heterocache.register()`` runs.
"""

BACKEND_NAME = "HETEROCACHE"  # the AttentionBackendEnum member (--attention-backend heterocache)
BACKEND_PATH = "vllm_heterocache.vllm_adapter.backend.HeteroCacheBackend"
