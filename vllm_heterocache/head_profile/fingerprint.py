"""Model fingerprint: which model a head profile belongs to.

A profile is only meaningful for the model it was measured on. The fingerprint keeps the fields
that fix the attention geometry (architecture, layers, KV heads, head_dim) plus a hash over a
canonical set of architecture fields of the Hugging Face config (:data:`HASHED_FIELDS`). The
canonical values are stored beside the hash, so a mismatch can name the exact differing field.

Fine-tunes of one base model share a config and therefore a hash (e.g. Llama-3.1-8B-Instruct and
DeepSeek-R1-Distill-Llama-8B); the model ``name`` tells them apart where the hash cannot.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_heterocache.errors import ProfileError, ProfileMismatchError

#: Config fields hashed into ``config_hash``. Runtime-only keys (dtype, max length, token ids,
#: transformers version) are deliberately left out: they do not change attention patterns.
HASHED_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
)


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def canonical_config(config: Any) -> dict[str, Any]:
    """The :data:`HASHED_FIELDS` of a Hugging Face config (a dict or a ``PretrainedConfig``).

    Normalises the differences between transformers versions: ``head_dim`` defaults to
    ``hidden_size // num_attention_heads``; ``num_key_value_heads`` to ``num_attention_heads``;
    ``rope_theta`` is read from the top level or from ``rope_parameters`` (transformers >= 5).
    """
    if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
        config = config.to_dict()
    out: dict[str, Any] = {}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if _get(config, key) is None:
            raise ProfileError(f"model config has no {key!r}: not a decoder-only transformer config")
    out["model_type"] = str(_get(config, "model_type"))
    out["hidden_size"] = int(_get(config, "hidden_size"))
    inter = _get(config, "intermediate_size")
    out["intermediate_size"] = int(inter) if inter is not None else None
    out["num_hidden_layers"] = int(_get(config, "num_hidden_layers"))
    out["num_attention_heads"] = int(_get(config, "num_attention_heads"))
    kv = _get(config, "num_key_value_heads")
    out["num_key_value_heads"] = int(kv) if kv is not None else out["num_attention_heads"]
    head_dim = _get(config, "head_dim")
    out["head_dim"] = int(head_dim) if head_dim else out["hidden_size"] // out["num_attention_heads"]
    out["vocab_size"] = int(_get(config, "vocab_size") or 0)
    theta = _get(config, "rope_theta")
    if theta is None:
        rope = _get(config, "rope_parameters") or {}
        theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    out["rope_theta"] = float(theta) if theta is not None else None
    return out


def config_hash(canonical: Mapping[str, Any]) -> str:
    blob = json.dumps({k: canonical.get(k) for k in HASHED_FIELDS}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the model a profile was measured on."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int
    config_hash: str
    config: Mapping[str, Any]  # the canonical fields that were hashed

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> ModelFingerprint:
        """Fingerprint of a Hugging Face config (dict or ``PretrainedConfig``).

        ``name`` defaults to the config's ``_name_or_path``.
        """
        canon = canonical_config(config)
        archs = _get(config, "architectures") or [canon["model_type"]]
        if name is None:
            name = _get(config, "_name_or_path") or canon["model_type"]
        return cls(
            name=str(name),
            architecture=str(archs[0]),
            num_layers=canon["num_hidden_layers"],
            num_kv_heads=canon["num_key_value_heads"],
            num_attention_heads=canon["num_attention_heads"],
            head_dim=canon["head_dim"],
            config_hash=config_hash(canon),
            config=canon,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "num_attention_heads": self.num_attention_heads,
            "head_dim": self.head_dim,
            "config_hash": self.config_hash,
            "config": dict(self.config),
        }

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Human-readable list of the fields in which ``other`` differs (name excluded)."""
        diffs = []
        for field in ("architecture", "num_layers", "num_kv_heads", "num_attention_heads", "head_dim"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                diffs.append(f"model.{field}: profile has {mine!r}, model has {theirs!r}")
        if self.config_hash != other.config_hash:
            for key in HASHED_FIELDS:
                mine, theirs = self.config.get(key), other.config.get(key)
                if mine != theirs:
                    diffs.append(f"model.config.{key}: profile has {mine!r}, model has {theirs!r}")
            if len(diffs) == 0:
                diffs.append(f"model.config_hash: profile has {self.config_hash}, model has {other.config_hash}")
        return diffs

    def check_matches(self, other: ModelFingerprint, *, profile_path: str = "the profile") -> None:
        """Raise :class:`ProfileMismatchError` naming every differing field."""
        diffs = self.differences(other)
        if diffs:
            raise ProfileMismatchError(
                f"{profile_path} was made for model {self.name!r}, not for the model being served "
                f"({other.name!r}): " + "; ".join(diffs) + ". Profile this model with "
                "`python -m vllm_heterocache.profiler --model <model dir> --output <profile.json>` "
                "and pass that file as the `profile` option."
            )
