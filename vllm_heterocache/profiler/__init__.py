"""Offline head profiler: runs a Hugging Face model on calibration text and writes a head profile.

    python -m vllm_heterocache.profiler --model DIR --output profile.json [--heatmap map.png]

Layers: ``collect`` (model forward passes -> per-head top-k sets), ``build`` (top-k sets ->
validated :class:`~vllm_heterocache.head_profile.HeadProfile` via :mod:`vllm_heterocache.taxonomy`),
``heatmap`` (PNG), ``__main__`` (command line).
"""
