"""Shared builders for backend tests: a real profile's layout on a small model, real paged caches
(synthetic profiles: ``vllm_heterocache.head_profile.synthetic``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_heterocache.head_profile import HeadProfile, ModelFingerprint


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
    from vllm_heterocache.vllm_adapter.compat import write_kv

    bs = kv_cache.shape[2]
    pos = torch.arange(start, start + k.shape[0])
    slots = block_row[pos // bs].long() * bs + pos % bs
    write_kv(k.contiguous(), v.contiguous(), kv_cache, slots, isa)
