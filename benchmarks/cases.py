"""The benchmarks' cases: one syntax, and one way to get a case's model, profile and options.

A case is ``MODEL:LENGTH:SETTING`` (``--cases``, comma-separated), or ``MODEL:LENGTH`` where a
benchmark runs several settings per case (``--settings``):

- MODEL: ``smollm2`` (SmolLM2-135M-Instruct, prepared once from the package's embedded copy,
  with its shipped profile) or ``tiny`` (the tiny random-weight Llama, with a synthetic profile
  of 1 full head in 8 unless a benchmark asks for another layout);
- LENGTH: tokens (a prompt, or a shared prefix);
- SETTING: ``rX`` (``compression_ratio`` X) or ``bX`` (``token_budget`` = X * LENGTH, for ratios
  a profile makes infeasible: SmolLM2's full heads alone keep 0.389 of its cache).

The benchmarks are scripts run from anywhere (``python benchmarks/bench_serve.py``): their
folder is first on ``sys.path``, so they import this module as ``cases``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2", "tiny")
TINY_LAYOUT = ("PS", "AA", "AA", "AA")  # 1 full head (the pivot) in 8
SMOLLM2_PROFILE = ROOT / "profiles" / "SmolLM2-135M-Instruct.json"


@dataclass(frozen=True)
class Case:
    model: str
    length: int
    setting: str | None = None

    @classmethod
    def parse(cls, spec: str, *, setting: bool = True) -> Case:
        """``MODEL:LENGTH:SETTING`` (``setting=False``: ``MODEL:LENGTH``); a clear error otherwise."""
        parts = spec.split(":")
        want = "MODEL:LENGTH:SETTING" if setting else "MODEL:LENGTH"
        if len(parts) != (3 if setting else 2) or parts[0] not in MODELS or not parts[1].isdigit():
            raise SystemExit(f"error: case {spec!r}: expected {want} with MODEL one of {', '.join(MODELS)} "
                             "and LENGTH a token count (benchmarks/cases.py)")
        case = cls(parts[0], int(parts[1]), parts[2] if setting else None)
        if setting:
            setting_options(case.setting, case.length)  # checks it
        return case

    @classmethod
    def parse_list(cls, specs: str, *, setting: bool = True) -> list[Case]:
        return [cls.parse(s, setting=setting) for s in specs.split(",") if s]

    def __str__(self) -> str:
        return ":".join([self.model, str(self.length), *([self.setting] if self.setting else [])])

    @property
    def options(self) -> dict:
        """The HeteroCache options of the case's setting (no profile)."""
        return setting_options(self.setting, self.length)


def setting_options(setting: str, length: int) -> dict:
    """``rX`` -> ``{"compression_ratio": X}``; ``bX`` -> ``{"token_budget": X * length}``."""
    try:
        kind, x = setting[0], float(setting[1:])
    except (IndexError, ValueError):
        kind, x = "", 0.0
    if kind == "r" and 0 < x <= 1:
        return {"compression_ratio": x}
    if kind == "b" and x > 0:
        return {"token_budget": max(1, int(x * length))}
    raise SystemExit(f"error: setting {setting!r}: expected rX (compression ratio, 0 < X <= 1) or bX "
                     "(token budget X * LENGTH, X > 0)")


def prepare_model(name: str, work: Path, layout: tuple[str, ...] = TINY_LAYOUT) -> tuple[Path, Path]:
    """The model folder of ``name`` and its profile: SmolLM2's shipped one, or for the tiny model
    a synthetic profile of ``layout`` written into ``work``."""
    if name == "smollm2":
        from vllm_heterocache.models.smollm2 import prepare_default_model

        return prepare_default_model(), SMOLLM2_PROFILE
    if name == "tiny":
        from vllm_heterocache.models.tiny import build_tiny_model
        from vllm_heterocache.head_profile.synthetic import save_synthetic_profile

        model = build_tiny_model()
        work.mkdir(parents=True, exist_ok=True)
        return model, save_synthetic_profile(model, list(layout), work / f"tiny-{'-'.join(layout)}.json")
    raise SystemExit(f"error: model {name!r}: expected one of {', '.join(MODELS)}")


def heterocache_options(name: str, profile: Path, options: dict) -> dict:
    """The case's HeteroCache options with its profile (the tiny model's synthetic one; SmolLM2's
    shipped profile is found by the backend itself)."""
    return ({"profile": str(profile)} if name == "tiny" else {}) | options


def kept_fraction(profile: str | Path, options: dict, length: int) -> float:
    """Fraction of the KV cache a setting keeps: full heads all of it; compressed heads the
    compression ratio's share overall (the paper's formula) or ``token_budget`` tokens each."""
    types = [t for layer in json.loads(Path(profile).read_text())["head_types"] for t in layer]
    full = sum(t in ("volatile", "pivot") for t in types) / len(types)
    if "compression_ratio" in options:
        return max(full, options["compression_ratio"])
    return full + (1 - full) * min(1.0, options["token_budget"] / length)
