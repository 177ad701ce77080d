"""Runtime state of HeteroCache inside a serving engine: per-request state, the paged-cache views
and the per-layer algorithm steps. Imports torch and the pure layer, never vLLM."""
