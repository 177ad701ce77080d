"""Which head profile serves a model: an explicit file, or the shipped one that matches it.

Shipped profiles are looked up in ``$HETEROCACHE_PROFILE_DIR`` (if set), the repository's
``profiles/`` (source checkouts and editable installs) and ``<prefix>/share/vllm-heterocache/
profiles`` (wheel installs). A shipped profile matches when its fingerprint equals the model's
(geometry and config hash); fine-tunes that share a config are told apart by the model name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vllm_heterocache import env
from vllm_heterocache.errors import ProfileError
from vllm_heterocache.profile.fingerprint import ModelFingerprint
from vllm_heterocache.profile.schema import HeadProfile, load_profile

PROFILE_DIR_ENV = "HETEROCACHE_PROFILE_DIR"


def shipped_profile_dirs() -> list[Path]:
    dirs = []
    explicit = env.directory(PROFILE_DIR_ENV)  # set and missing: an error, not a silent skip
    if explicit is not None:
        dirs.append(explicit)
    dirs.append(Path(__file__).resolve().parents[2] / "profiles")
    dirs.append(Path(sys.prefix) / "share" / "vllm-heterocache" / "profiles")
    return [d for d in dirs if d.is_dir()]


def _short(name: str) -> str:
    return Path(name.rstrip("/")).name.lower()


def profiler_hint(model: str) -> str:
    return (
        f"profile the model with `python -m vllm_heterocache.profiler --model {model} --output "
        "<profile.json>` and pass it with --additional-config "
        "'{\"heterocache\": {\"profile\": \"<profile.json>\"}}'"
    )


def resolve_profile(hf_config: Any, model: str, explicit: str | None = None) -> HeadProfile:
    """The profile for the model ``model`` (its path or name) with Hugging Face config ``hf_config``.

    Raises ProfileError / ProfileMismatchError naming what to change.
    """
    fingerprint = ModelFingerprint.from_hf_config(hf_config, name=model)
    if explicit:
        profile = load_profile(explicit)
        profile.model.check_matches(fingerprint, profile_path=explicit)
        return profile
    dirs = shipped_profile_dirs()
    candidates: dict[str, HeadProfile] = {}  # by model name: the first folder wins
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            profile = load_profile(path)
            if not profile.model.differences(fingerprint):
                candidates.setdefault(profile.model.name, profile)
    if not candidates:
        searched = ", ".join(str(d) for d in dirs) or "(no profile folder found)"
        raise ProfileError(
            f"no shipped head profile matches the model {model!r} ({fingerprint.architecture}, "
            f"{fingerprint.num_layers} layers x {fingerprint.num_kv_heads} KV heads, config "
            f"{fingerprint.config_hash}; searched {searched}): {profiler_hint(model)}"
        )
    named = [p for p in candidates.values() if _short(p.model.name) == _short(model)]
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(named) == 1:
        return named[0]
    raise ProfileError(
        f"several shipped profiles match the architecture of {model!r}: "
        + ", ".join(f"{p.source} ({p.model.name})" for p in candidates.values())
        + "; choose one with the `profile` option (heterocache.profile)"
    )
