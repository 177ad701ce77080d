"""Top-k sets of several calibration prompts -> a validated head profile.

Aggregation over prompts (each prompt is one calibration document):

- stability(l, h)     = mean over prompts of the per-prompt median-over-steps overlap with the
                        prefill set;
- similarity(l, i, j) = mean over prompts of the overlap of heads i and j at the last decode step
                        (the "late step" of the method);

then clustering, types and budget ratios as in :mod:`vllm_heterocache.taxonomy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_heterocache import taxonomy
from vllm_heterocache.head_profile.fingerprint import ModelFingerprint
from vllm_heterocache.head_profile.schema import SCHEMA_VERSION, HeadProfile
from vllm_heterocache.profiler.collect import PromptTopK
from vllm_heterocache.sharding import rank_of_heads

_DIGITS = 6  # stored scores are rounded so that files are stable across tiny float noise


def aggregate(results: Sequence[PromptTopK]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stability ``[layers, Hkv]`` and similarity ``[layers, Hkv, Hkv]`` over all prompts."""
    if not results:
        raise ValueError("no calibration prompts were profiled")
    stab, sim = [], []
    for r in results:
        layers = r.prefill_topk.shape[0]
        stab.append(
            torch.stack(
                [taxonomy.stability_scores(r.prefill_topk[l], r.decode_topk[:, l], r.prompt_len) for l in range(layers)]
            )
        )
        late = r.decode_topk[-1] if r.decode_topk.shape[0] else r.prefill_topk
        sim.append(torch.stack([taxonomy.overlap_matrix(late[l], r.prompt_len) for l in range(layers)]))
    return torch.stack(stab).mean(0), torch.stack(sim).mean(0)


def _round(x: torch.Tensor) -> list:
    return torch.round(x.double() * 10**_DIGITS).div(10**_DIGITS).tolist()


def build_profile(
    results: Sequence[PromptTopK],
    fingerprint: ModelFingerprint,
    *,
    tau_stable: float,
    tau_sim: float,
    tp_size: int,
    calibration: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> HeadProfile:
    stability, similarity = aggregate(results)
    # Round first: the taxonomy must be a function of the stored numbers, so that re-deriving it
    # from the file gives the same types.
    stability = torch.tensor(_round(stability), dtype=torch.float64)
    similarity = torch.tensor(_round(similarity), dtype=torch.float64)
    groups = None
    if tp_size > 1:  # keep clusters inside one tensor-parallel rank
        groups = [min(r) for r in rank_of_heads(fingerprint.num_kv_heads, tp_size)]
    types, clusters = taxonomy.classify(stability, similarity, tau_stable, tau_sim, groups)
    ratios = taxonomy.budget_ratios(types, stability)
    data = {
        "schema_version": SCHEMA_VERSION,
        "model": fingerprint.to_json(),
        "head_types": [[t.value for t in row] for row in types],
        "clusters": [{"layer": c.layer, "pivot": c.pivot, "satellites": list(c.satellites)} for c in clusters],
        "budget_ratios": [[None if r is None else round(r, _DIGITS + 2) for r in row] for row in ratios],
        "stability": stability.tolist(),
        "similarity": similarity.tolist(),
        "calibration": {
            **calibration,
            "tau_stable": tau_stable,
            "tau_sim": tau_sim,
            "tp_size": tp_size,
            "ratio_eps": taxonomy.RATIO_EPS,
        },
        "provenance": dict(provenance),
    }
    return HeadProfile.from_json(data)
