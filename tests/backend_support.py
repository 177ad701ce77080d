"""Shared builders for backend tests: synthetic profiles and real paged caches."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_heterocache.profile import HeadProfile, ModelFingerprint

_NAMES = {"P": "pivot", "S": "satellite", "A": "anchor", "V": "volatile"}


def synthetic_profile(config: dict, pattern: list[str], name: str = "synthetic") -> HeadProfile:
    """A profile for ``config`` whose layer ``l`` has the types ``pattern[l % len(pattern)]``
    (letters P, S, A, V per KV head); satellites join the layer's first pivot; ratios are 1."""
    fp = ModelFingerprint.from_hf_config(config, name=name)
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
        "provenance": {"tool": "tests", "tool_version": "0", "command": "synthetic_profile", "created": ""},
    }
    return HeadProfile.from_json(data, source=f"<synthetic {','.join(pattern)}>")


def save_synthetic_profile(model_dir: Path, pattern: list[str], out: Path) -> Path:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    synthetic_profile(config, pattern, name=Path(model_dir).name).save(out)
    return out


def save_converted_profile(model_dir: Path, source: Path, out: Path) -> Path:
    """``source``'s head types, clusters and budget ratios for the model in ``model_dir``, which
    must have its shape (layers, KV heads): a real profile's layout on a small model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    data = json.loads(Path(source).read_text())
    data["model"] = ModelFingerprint.from_hf_config(config, name=Path(model_dir).name).to_json()
    data["provenance"] = {**data["provenance"], "command": f"tests: {Path(source).name}'s layout on {model_dir}"}
    HeadProfile.from_json(data, source=f"<{Path(source).name} on {Path(model_dir).name}>").save(out)
    return out


def write_tokens(kv_cache: torch.Tensor, isa: str, block_row: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write K/V ``[n, H_kv, D]`` of positions ``start ..`` with vLLM's own cache-write op."""
    from vllm import _custom_ops as ops

    nb, h, bs, d2 = kv_cache.shape
    pos = torch.arange(start, start + k.shape[0])
    slots = block_row[pos // bs].long() * bs + pos % bs
    key_cache, value_cache = kv_cache.view(nb, h, 2 * bs, d2 // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        k.contiguous(), v.contiguous(), key_cache, value_cache, slots, isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
