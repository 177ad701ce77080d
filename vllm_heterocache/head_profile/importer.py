"""Convert head profiles of the HeteroCache reference code into the schema_version 1 format.

Reference format (github.com/ponytaill/HeteroCache, ``data/clusters/Head_Analysis_*.json``)::

    meta.type_map                  type name -> integer code (two naming variants, see below)
    classification_matrix[l][h]    type code
    allocation_matrix[l][h]        budget ratio (anchor, satellite), -1.0 for full heads
    leader_member_relations[l]     {"pivot head": [satellite heads]}

Hyperparameters live only in the file name: ``..._topk1024_th0.5_sim0.4_step5000.json``.
The reference files carry no model config, so the importer takes the model's config.json, or
one of :data:`KNOWN_MODELS` (the models the reference code published profiles for).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_heterocache.errors import ProfileError
from vllm_heterocache.head_profile.fingerprint import ModelFingerprint
from vllm_heterocache.head_profile.provenance import provenance
from vllm_heterocache.head_profile.schema import SCHEMA_VERSION, HeadProfile

# Both naming variants seen in the published files, mapped to this project's type names.
TYPE_NAMES = {
    "anchor": "anchor",
    "volatile": "volatile",
    "pivot": "pivot",
    "satellite": "satellite",
    "Stable_Unique": "anchor",
    "Decaying_Unique": "volatile",
    "Similar_Leader": "pivot",
    "Similar_Member": "satellite",
}

# Public config.json values (architecture fields only) of the models with published profiles.
_LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": _LLAMA31_8B,
    "Qwen/Qwen2.5-14B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
    },
}

_NAME_PARAMS = re.compile(r"topk(?P<topk>\d+)_th(?P<th>[\d.]+)_sim(?P<sim>[\d.]+)_step(?P<step>\d+)")


def hyperparameters_from_name(name: str) -> dict[str, Any]:
    """``topk``, ``tau_stable``, ``tau_sim`` and ``step`` from a reference file name."""
    m = _NAME_PARAMS.search(name)
    if m is None:
        raise ProfileError(
            f"cannot read the calibration hyperparameters from the file name {name!r} (expected "
            "'..._topk<K>_th<tau_stable>_sim<tau_sim>_step<S>.json'); rename the file"
        )
    return {
        "topk": int(m["topk"]),
        "tau_stable": float(m["th"]),
        "tau_sim": float(m["sim"]),
        "step": int(m["step"]),
    }


def _fail(path: Path, where: str, what: str) -> ProfileError:
    return ProfileError(f"reference profile {path}: {where}: {what}")


def convert_reference(
    path: str | Path,
    *,
    model_name: str,
    model_config: Mapping[str, Any] | None = None,
    command: str = "",
) -> HeadProfile:
    """Read a reference-code profile and return a validated :class:`HeadProfile`.

    ``model_config`` is the model's config.json as a dict; if None, ``model_name`` must be one
    of :data:`KNOWN_MODELS`.
    """
    path = Path(path)
    if model_config is None:
        if model_name not in KNOWN_MODELS:
            raise ProfileError(
                f"no config known for model {model_name!r}: pass its config.json with --model-config "
                f"(known without it: {', '.join(KNOWN_MODELS)})"
            )
        model_config = KNOWN_MODELS[model_name]
    fingerprint = ModelFingerprint.from_hf_config(model_config, name=model_name)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(path, "file", f"cannot read JSON: {e}") from None
    for key in ("meta", "classification_matrix", "allocation_matrix", "leader_member_relations"):
        if key not in raw:
            raise _fail(path, key, "missing")
    type_map = raw["meta"].get("type_map")
    if not isinstance(type_map, Mapping):
        raise _fail(path, "meta.type_map", "missing or not an object")
    unknown = [n for n in type_map if n not in TYPE_NAMES]
    if unknown:
        raise _fail(path, "meta.type_map", f"unknown type name(s) {unknown}; known: {sorted(TYPE_NAMES)}")
    code_to_type = {int(code): TYPE_NAMES[name] for name, code in type_map.items()}

    classes = raw["classification_matrix"]
    try:
        head_types = [[code_to_type[int(c)] for c in row] for row in classes]
    except KeyError as e:
        raise _fail(path, "classification_matrix", f"type code {e} is not in meta.type_map") from None
    ratios = [
        [None if head_types[l][h] in ("volatile", "pivot") else float(a) for h, a in enumerate(row)]
        for l, row in enumerate(raw["allocation_matrix"])
    ]
    relations = raw["leader_member_relations"]
    if isinstance(relations, Mapping):  # some dumps key layers by string
        relations = [relations.get(str(l), {}) for l in range(len(head_types))]
    clusters = [
        {"layer": l, "pivot": int(p), "satellites": sorted(int(s) for s in sats)}
        for l, layer in enumerate(relations)
        for p, sats in sorted(layer.items(), key=lambda kv: int(kv[0]))
    ]
    params = hyperparameters_from_name(path.name)
    data = {
        "schema_version": SCHEMA_VERSION,
        "model": fingerprint.to_json(),
        "head_types": head_types,
        "clusters": clusters,
        "budget_ratios": ratios,
        "stability": None,
        "similarity": None,
        "calibration": {
            "topk": params["topk"],
            "tau_stable": params["tau_stable"],
            "tau_sim": params["tau_sim"],
            "step": params["step"],
            "data": "reference code's calibration set (not published with the profile)",
        },
        "provenance": provenance(
            command,
            "imported",
            imported_from={
                "file": path.name,
                "repository": "https://github.com/ponytaill/HeteroCache",
                "path": "data/clusters/",
                "commit": "01dc7fe",
                "license": "Apache-2.0",
            },
        ),
    }
    return HeadProfile.from_json(data, source=str(path))
