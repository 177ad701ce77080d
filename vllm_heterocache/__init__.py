"""vllm-heterocache: HeteroCache (arXiv 2601.13684) heterogeneous KV-cache compression for vLLM.

This module holds only :func:`register`, vLLM's general-plugin entry point
(``vllm.general_plugins`` in pyproject.toml). It is cheap and imports nothing heavy.

Glossary (each word means one thing in the code and its docs):

- **head profile** (``head_profile``): the versioned JSON that gives each (layer, KV head) of a
  model its head type, pivot clusters and budget ratio; written by the offline **profiler**
  (``profiler``), or shipped (``profiles/``), or made by hand (``head_profile.synthetic``).
- **head types**: *volatile* and *pivot* heads keep every token (*full* heads); *anchor* and
  *satellite* heads keep a budget (*compressed* heads). A pivot checks for **drift** (its
  attention moving away from its reference top-K) and its satellites (its **cluster**) are then
  **refilled** from the **host tier**, a copy of their prompt KV in host memory.
- **policy** (``policies``): a compression method (``heterocache``, ``snapkv``, ...). Its
  **roles** are the profile as the policy uses it (which heads are full, their budget ratios,
  its clusters); it chooses its compressed heads' tokens itself (``Policy.select``).
- **budgets** (``budget.Budgets``): the prompt tokens each head of a request keeps, from the
  **budgeter** (``budget.Budgeter``): compression ratio (fraction of the KV cache kept) or token
  budget, observation **window** (recent prompt tokens every compressed head keeps).
- **pool**: the KV caches of one kind, a KV cache group of vLLM's: the **full pool**, or a
  **pool class** (budget class) of compressed heads whose blocks hold a request's largest
  budget of the class (``vllm_adapter.pools``). A request's **capacity** in a class bounds its
  budgets there; the server's and a request's **terms** (``budget.ServerTerms``,
  ``budget.request_terms``) say what a request may ask for and what it gets.
- **cache**: one KV head's paged cache (``[num_blocks, 1, block_size, 2 * D]``); a layer's
  first is vLLM's, the others **companion cache layers**. A head's **store** is the pool of the
  cache that holds it (with tensor parallelism, sometimes one with more room).
- **block layout** (``ops.paged.BlockLayout``): where K and V of a position sit inside a cache
  block, as vLLM's CPU cache write puts them. "Layout" means only this.
- **placement** (``placement``): where a request's tokens are in a pool's block-table row --
  prompt, **selection** (the kept tokens, copied), generated tokens -- and which of them a
  **prefix-cache hit** shares; a selection that points into shared prompt blocks is read through
  the request's **fronts** (row positions per head).
- **request state** (``runtime.requests``): what the runtime keeps per request (its budgets,
  selections, query-ring slot, host-tier blocks); **request arguments** (``vllm_xargs``:
  ``heterocache_policy``, ``heterocache_ratio``) are checked in the front end
  (``vllm_adapter.request_args``).
- **step plan** (``runtime.step.StepPlan``): what one engine step runs, planned once before the
  layers run and carried in the step's attention metadata. "Plan" means only this.
- **runtime** (``runtime.core.HeteroCacheRuntime``): the per-engine-process object that admits
  requests and plans steps; per-layer code (``runtime.layer``) gets only the **parts** it uses.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point; vLLM calls it in every process it starts.

    Registers the ``heterocache`` attention backend (``--attention-backend heterocache``).
    Idempotent; imports vLLM's registry only (vLLM is already imported when it runs).
    """
    from vllm_heterocache.vllm_adapter.registration import register as _register

    _register()
