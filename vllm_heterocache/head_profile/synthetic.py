"""Profiles written by hand rather than measured: a head layout given as letters per layer.

For the tiny random-weight model (which has no attention statistics to profile) and for tests
and benchmarks that need a chosen mix of head types on a real model's shape. A layout is a list
of strings, one letter per KV head: ``P`` pivot, ``S`` satellite, ``A`` anchor, ``V`` volatile;
layer ``l`` takes ``pattern[l % len(pattern)]``. Pure layer: no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_heterocache.head_profile.fingerprint import ModelFingerprint
from vllm_heterocache.head_profile.schema import HeadProfile

_NAMES = {"P": "pivot", "S": "satellite", "A": "anchor", "V": "volatile"}


def synthetic_profile(config: dict, pattern: list[str], name: str = "synthetic") -> HeadProfile:
    """A profile for the model of HF ``config`` whose layer ``l`` has the types ``pattern[l %
    len(pattern)]``; satellites join the layer's first pivot; every budget ratio is 1."""
    fp = ModelFingerprint.from_hf_config(config, name=name)
    unknown = sorted({c for row in pattern for c in row} - set(_NAMES))
    if unknown or any(len(row) != fp.num_kv_heads for row in pattern):
        raise ValueError(f"a synthetic layout has {fp.num_kv_heads} letters of {''.join(_NAMES)} per layer, "
                         f"got {pattern}")
    types = [[_NAMES[c] for c in pattern[l % len(pattern)]] for l in range(fp.num_layers)]
    clusters = []
    for l, row in enumerate(types):
        pivots = [h for h, t in enumerate(row) if t == "pivot"]
        sats = [h for h, t in enumerate(row) if t == "satellite"]
        if pivots:
            clusters.append({"layer": l, "pivot": pivots[0], "satellites": sats})
    data = {
        "schema_version": 1,
        "model": fp.to_json(),
        "head_types": types,
        "clusters": clusters,
        "budget_ratios": [[1.0 if t in ("anchor", "satellite") else None for t in row] for row in types],
        "stability": None,
        "similarity": None,
        "calibration": {"topk": 8, "tau_stable": 0.5, "tau_sim": 0.5},
        "provenance": {"tool": "vllm_heterocache.head_profile.synthetic", "tool_version": "0",
                       "command": f"synthetic_profile({pattern})", "created": ""},
    }
    return HeadProfile.from_json(data, source=f"<synthetic {','.join(pattern)}>")


def save_synthetic_profile(model_dir: Path, pattern: list[str], out: Path) -> Path:
    """:func:`synthetic_profile` for the model in ``model_dir``, saved to ``out``; returns ``out``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    synthetic_profile(config, pattern, name=Path(model_dir).name).save(out)
    return out
