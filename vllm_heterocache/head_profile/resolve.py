"""Which head profile serves a model: an explicit file, or the shipped one that matches it.

Shipped profiles are looked up in ``$HETEROCACHE_PROFILE_DIR`` (if set), the repository's
``profiles/`` (source checkouts and editable installs) and ``<prefix>/share/vllm-heterocache/
profiles`` (wheel installs). A shipped profile matches when its fingerprint equals the model's
(geometry and config hash); fine-tunes that share a config are told apart by the model name.

A shipped profile's *name* is its file stem (``SmolLM2-135M-Instruct-sparse``). A model may have
several shipped profiles (variants made with other thresholds); the default one is the file named
after the model (its stem is the model name's last part, ``SmolLM2-135M-Instruct.json`` for
``HuggingFaceTB/SmolLM2-135M-Instruct``, case-insensitive), or the only one. The others are picked
with the ``profile`` option, by name or by path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vllm_heterocache import env
from vllm_heterocache.errors import ProfileError
from vllm_heterocache.head_profile.fingerprint import ModelFingerprint
from vllm_heterocache.head_profile.schema import HeadProfile, load_profile

PROFILE_DIR_ENV = "HETEROCACHE_PROFILE_DIR"


def shipped_profile_dirs() -> list[Path]:
    dirs = []
    explicit = env.directory(PROFILE_DIR_ENV)  # set and missing: an error, not a silent skip
    if explicit is not None:
        dirs.append(explicit)
    dirs.append(Path(__file__).resolve().parents[2] / "profiles")
    dirs.append(Path(sys.prefix) / "share" / "vllm-heterocache" / "profiles")
    return [d for d in dirs if d.is_dir()]


def shipped_profiles() -> dict[str, Path]:
    """Shipped profile files by name (file stem); when folders share a name, the first folder wins."""
    out: dict[str, Path] = {}
    for d in shipped_profile_dirs():
        for path in sorted(d.glob("*.json")):
            out.setdefault(path.stem, path)
    return out


def _looks_like_name(spec: str) -> bool:
    """A ``profile`` value that is no file and has no folder or ``.json`` in it names a shipped profile."""
    return not (Path(spec).is_file() or "/" in spec or "\\" in spec or spec.lower().endswith(".json"))


def shipped_profile_path(name: str, fingerprint: ModelFingerprint | None = None) -> Path:
    """The file of the shipped profile ``name``; ProfileError listing the shipped names if none."""
    shipped = shipped_profiles()
    if name in shipped:
        return shipped[name]
    if not shipped:
        raise ProfileError(f"no shipped head profile named {name!r}: no profile folder found; pass a profile file path")
    listing = ", ".join(sorted(shipped))
    if fingerprint is not None:
        fitting = sorted(n for n, p in shipped.items() if not load_profile(p).model.differences(fingerprint))
        if fitting:
            listing = f"{', '.join(fitting)} for this model; all: {listing}"
    raise ProfileError(
        f"no shipped head profile named {name!r} (the `profile` option takes a file path or the name of "
        f"a shipped profile: {listing})"
    )


def profile_file(spec: str, fingerprint: ModelFingerprint | None = None) -> Path:
    """The file a ``profile`` value names: a path, or the name of a shipped profile."""
    return shipped_profile_path(spec, fingerprint) if _looks_like_name(spec) else Path(spec)


def _default_of(model_name: str, profiles: list[HeadProfile]) -> HeadProfile:
    """One folder's profiles of one model: the only one, else the file named after the model."""
    if len(profiles) == 1:
        return profiles[0]
    named = [p for p in profiles if Path(p.source).stem.lower() == _short(model_name)]
    if len(named) == 1:
        return named[0]
    raise ProfileError(
        f"several shipped profiles for {model_name!r} and none named after it ({_short(model_name)}.json): "
        + ", ".join(p.source for p in profiles)
        + "; choose one with the `profile` option (heterocache.profile), by path or name"
    )


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
        path = profile_file(explicit, fingerprint)
        profile = load_profile(path)
        profile.model.check_matches(fingerprint, profile_path=str(path))
        return profile
    dirs = shipped_profile_dirs()
    by_model: dict[str, list[HeadProfile]] = {}  # by model name: the first folder that has any wins
    for d in dirs:
        here: dict[str, list[HeadProfile]] = {}
        for path in sorted(d.glob("*.json")):
            profile = load_profile(path)
            if not profile.model.differences(fingerprint):
                here.setdefault(profile.model.name, []).append(profile)
        for name, found in here.items():
            by_model.setdefault(name, found)
    if not by_model:
        searched = ", ".join(str(d) for d in dirs) or "(no profile folder found)"
        raise ProfileError(
            f"no shipped head profile matches the model {model!r} ({fingerprint.architecture}, "
            f"{fingerprint.num_layers} layers x {fingerprint.num_kv_heads} KV heads, config "
            f"{fingerprint.config_hash}; searched {searched}): {profiler_hint(model)}"
        )
    named = [name for name in by_model if _short(name) == _short(model)]
    if len(by_model) == 1:
        return _default_of(*next(iter(by_model.items())))
    if len(named) == 1:
        return _default_of(named[0], by_model[named[0]])
    raise ProfileError(
        f"several shipped profiles match the architecture of {model!r}: "
        + ", ".join(f"{p.source} ({p.model.name})" for found in by_model.values() for p in found)
        + "; choose one with the `profile` option (heterocache.profile), by path or name"
    )
