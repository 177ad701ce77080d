"""The head-profile file format, schema_version 1, and its validation.

A profile is one JSON object::

    {
      "schema_version": 1,
      "model":       {name, architecture, num_layers, num_kv_heads, num_attention_heads,
                      head_dim, config_hash, config: {canonical HF config fields}},
      "head_types":  [[type name per KV head] per layer],      # "volatile"|"pivot"|"anchor"|"satellite"
      "clusters":    [{"layer": l, "pivot": h, "satellites": [h, ...]}, ...],
      "budget_ratios": [[float for anchor/satellite, null for volatile/pivot] per layer],
      "stability":   [[float in [0, 1] per KV head] per layer]      | null (imported profiles),
      "similarity":  [[[float per KV head j] per KV head i] per layer] | null,
      "calibration": {"topk", "tau_stable", "tau_sim", ... hyperparameters, "data": {...}},
      "provenance":  {"tool", "tool_version", "command", "created", "source", ...}
    }

Heads are indexed by (layer, global KV head), 0-based. Budget ratios of the compressed heads
average 1 over the whole model (so the budget formula keeps the requested fraction). Loading
validates every field and raises :class:`~vllm_heterocache.errors.ProfileError` naming the file
and the field.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_heterocache.errors import ProfileError
from vllm_heterocache.head_profile.fingerprint import ModelFingerprint

SCHEMA_VERSION = 1
_RATIO_MEAN_TOLERANCE = 1e-3


class HeadType(str, enum.Enum):
    VOLATILE = "volatile"  # unclustered, attention drifts: full KV
    PIVOT = "pivot"  # cluster leader: full KV, watches drift for its satellites
    ANCHOR = "anchor"  # unclustered, stable: fixed budget chosen at prefill
    SATELLITE = "satellite"  # cluster member: budget refilled when its pivot drifts

    @property
    def is_full(self) -> bool:
        return self in FULL_TYPES


FULL_TYPES = frozenset({HeadType.VOLATILE, HeadType.PIVOT})
COMPRESSED_TYPES = frozenset({HeadType.ANCHOR, HeadType.SATELLITE})


@dataclass(frozen=True)
class Cluster:
    layer: int
    pivot: int
    satellites: tuple[int, ...]


@dataclass(frozen=True)
class HeadProfile:
    """A validated head profile. Build with :meth:`from_json` or :func:`load_profile`."""

    model: ModelFingerprint
    head_types: tuple[tuple[HeadType, ...], ...]  # [layer][kv_head]
    clusters: tuple[Cluster, ...]
    budget_ratios: tuple[tuple[float | None, ...], ...]  # [layer][kv_head], None for full heads
    stability: tuple[tuple[float, ...], ...] | None  # [layer][kv_head]
    similarity: tuple[tuple[tuple[float, ...], ...], ...] | None  # [layer][i][j]
    calibration: Mapping[str, Any]
    provenance: Mapping[str, Any]
    source: str = field(default="<memory>", compare=False)  # where it was loaded from

    # ---- derived views -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    def counts(self) -> dict[str, int]:
        """Number of heads of each type, in the order volatile, pivot, anchor, satellite."""
        out = {t.value: 0 for t in HeadType}
        for row in self.head_types:
            for t in row:
                out[t.value] += 1
        return out

    def num_full_heads(self) -> int:
        return sum(t.is_full for row in self.head_types for t in row)

    def clusters_of_layer(self, layer: int) -> list[Cluster]:
        return [c for c in self.clusters if c.layer == layer]

    def pivot_of(self, layer: int, head: int) -> int | None:
        """The pivot whose cluster holds satellite ``head`` of ``layer`` (None if not a satellite)."""
        for c in self.clusters:
            if c.layer == layer and head in c.satellites:
                return c.pivot
        return None

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model.to_json(),
            "head_types": [[t.value for t in row] for row in self.head_types],
            "clusters": [
                {"layer": c.layer, "pivot": c.pivot, "satellites": list(c.satellites)}
                for c in self.clusters
            ],
            "budget_ratios": [list(row) for row in self.budget_ratios],
            "stability": None if self.stability is None else [list(r) for r in self.stability],
            "similarity": None
            if self.similarity is None
            else [[list(r) for r in layer] for layer in self.similarity],
            "calibration": dict(self.calibration),
            "provenance": dict(self.provenance),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as stable, diff-friendly JSON (same profile -> same bytes)."""
        Path(path).write_text(dumps(self.to_json()), encoding="utf-8")

    @classmethod
    def from_json(cls, data: Any, source: str = "<memory>") -> HeadProfile:
        return _Validator(source).profile(data)


def load_profile(path: str | os.PathLike) -> HeadProfile:
    """Load and validate a profile file. Raises ProfileError naming the file and field."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile file {str(p)!r} does not exist; check the `profile` option")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"profile {str(p)!r} is not valid JSON: {e}") from None
    return HeadProfile.from_json(data, source=str(p))


def dumps(data: Any) -> str:
    """JSON with 2-space indentation, but lists of scalars kept on one line."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    scalar_list = re.compile(r"\[\s*((?:[^\[\]{}\s][^\[\]{}]*?)?)\s*\]", re.DOTALL)
    return scalar_list.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1).strip()) + "]", text) + "\n"


class _Validator:
    """Checks a parsed profile field by field; every error names ``source`` and the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str) -> ProfileError:
        return ProfileError(f"profile {self.source}: field {where}: {what}")

    def obj(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected an object, found {type(value).__name__}")
        return value

    def key(self, obj: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(f"{where}.{key}" if where else key, "missing")
        return obj[key]

    def int_(self, value: Any, where: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, found {value!r}")
        if value < lo or (hi is not None and value >= hi):
            bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
            raise self.fail(where, f"expected an integer {bound}, found {value}")
        return value

    def num(self, value: Any, where: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where, f"expected a finite number, found {value!r}")
        if not lo <= value <= hi:
            raise self.fail(where, f"expected a number in [{lo}, {hi}], found {value}")
        return float(value)

    def grid(self, value: Any, where: str, layers: int, heads: int) -> Sequence[Sequence[Any]]:
        if not isinstance(value, list) or len(value) != layers:
            n = len(value) if isinstance(value, list) else type(value).__name__
            raise self.fail(where, f"expected a list of {layers} layers (model.num_layers), found {n}")
        for layer, row in enumerate(value):
            if not isinstance(row, list) or len(row) != heads:
                n = len(row) if isinstance(row, list) else type(row).__name__
                raise self.fail(f"{where}[{layer}]", f"expected {heads} KV heads (model.num_kv_heads), found {n}")
        return value

    def model(self, data: Any) -> ModelFingerprint:
        m = self.obj(data, "model")
        text = {}
        for k in ("name", "architecture", "config_hash"):
            v = self.key(m, k, "model")
            if not isinstance(v, str) or not v:
                raise self.fail(f"model.{k}", f"expected a non-empty string, found {v!r}")
            text[k] = v
        ints = {k: self.int_(self.key(m, k, "model"), f"model.{k}", lo=1) for k in
                ("num_layers", "num_kv_heads", "num_attention_heads", "head_dim")}
        if ints["num_attention_heads"] % ints["num_kv_heads"]:
            raise self.fail("model.num_attention_heads", "must be a multiple of model.num_kv_heads")
        config = self.obj(self.key(m, "config", "model"), "model.config")
        return ModelFingerprint(config=dict(config), **text, **ints)

    def profile(self, data: Any) -> HeadProfile:
        d = self.obj(data, "<top level>")
        version = self.key(d, "schema_version", "")
        if version != SCHEMA_VERSION:
            raise self.fail("schema_version", f"this version of vllm-heterocache reads {SCHEMA_VERSION}, found {version!r}")
        model = self.model(self.key(d, "model", ""))
        L, H = model.num_layers, model.num_kv_heads
        names = {t.value: t for t in HeadType}
        types_raw = self.grid(self.key(d, "head_types", ""), "head_types", L, H)
        types = []
        for l, row in enumerate(types_raw):
            out_row = []
            for h, name in enumerate(row):
                if name not in names:
                    raise self.fail(f"head_types[{l}][{h}]", f"unknown head type {name!r}; expected one of {', '.join(names)}")
                out_row.append(names[name])
            types.append(tuple(out_row))
        clusters = self.clusters(self.key(d, "clusters", ""), types, H)
        ratios = self.ratios(self.key(d, "budget_ratios", ""), types, L, H)
        stability = d.get("stability")
        if stability is not None:
            grid = self.grid(stability, "stability", L, H)
            stability = tuple(
                tuple(self.num(v, f"stability[{l}][{h}]", 0.0, 1.0) for h, v in enumerate(row))
                for l, row in enumerate(grid)
            )
        similarity = d.get("similarity")
        if similarity is not None:
            grid = self.grid(similarity, "similarity", L, H)
            similarity = tuple(
                tuple(self._sim_row(row, l, i, H) for i, row in enumerate(layer))
                for l, layer in enumerate(grid)
            )
        calibration = self.obj(self.key(d, "calibration", ""), "calibration")
        for k in ("topk", "tau_stable", "tau_sim"):
            self.key(calibration, k, "calibration")
        self.num(calibration["tau_stable"], "calibration.tau_stable", 0.0, 1.0)
        self.num(calibration["tau_sim"], "calibration.tau_sim", 0.0, 1.0)
        provenance = self.obj(self.key(d, "provenance", ""), "provenance")
        for k in ("tool", "tool_version", "command", "created"):
            self.key(provenance, k, "provenance")
        return HeadProfile(
            model=model,
            head_types=tuple(types),
            clusters=clusters,
            budget_ratios=ratios,
            stability=stability,
            similarity=similarity,
            calibration=dict(calibration),
            provenance=dict(provenance),
            source=self.source,
        )

    def _sim_row(self, row: Any, layer: int, i: int, heads: int) -> tuple[float, ...]:
        where = f"similarity[{layer}][{i}]"
        if not isinstance(row, list) or len(row) != heads:
            raise self.fail(where, f"expected {heads} values (model.num_kv_heads)")
        return tuple(self.num(v, f"{where}[{j}]", 0.0, 1.0) for j, v in enumerate(row))

    def clusters(self, value: Any, types: list[tuple[HeadType, ...]], H: int) -> tuple[Cluster, ...]:
        if not isinstance(value, list):
            raise self.fail("clusters", "expected a list")
        out: list[Cluster] = []
        seen: set[tuple[int, int]] = set()
        L = len(types)
        for n, c in enumerate(value):
            where = f"clusters[{n}]"
            c = self.obj(c, where)
            layer = self.int_(self.key(c, "layer", where), f"{where}.layer", 0, L)
            pivot = self.int_(self.key(c, "pivot", where), f"{where}.pivot", 0, H)
            sats = self.key(c, "satellites", where)
            if not isinstance(sats, list) or not sats:
                raise self.fail(f"{where}.satellites", "expected a non-empty list of KV head indices")
            sats = tuple(self.int_(s, f"{where}.satellites", 0, H) for s in sats)
            if types[layer][pivot] is not HeadType.PIVOT:
                raise self.fail(f"{where}.pivot", f"head {pivot} of layer {layer} is {types[layer][pivot].value}, not pivot (head_types)")
            for h in (pivot, *sats):
                if (layer, h) in seen:
                    raise self.fail(where, f"head {h} of layer {layer} belongs to two clusters")
                seen.add((layer, h))
            for s in sats:
                if types[layer][s] is not HeadType.SATELLITE:
                    raise self.fail(f"{where}.satellites", f"head {s} of layer {layer} is {types[layer][s].value}, not satellite (head_types)")
            out.append(Cluster(layer, pivot, sats))
        for l, row in enumerate(types):
            for h, t in enumerate(row):
                if t in (HeadType.PIVOT, HeadType.SATELLITE) and (l, h) not in seen:
                    raise self.fail("clusters", f"{t.value} head {h} of layer {l} is in no cluster")
        return tuple(sorted(out, key=lambda c: (c.layer, c.pivot)))

    def ratios(self, value: Any, types: list[tuple[HeadType, ...]], L: int, H: int) -> tuple[tuple[float | None, ...], ...]:
        grid = self.grid(value, "budget_ratios", L, H)
        out = []
        compressed = []
        for l, row in enumerate(grid):
            out_row: list[float | None] = []
            for h, r in enumerate(row):
                where = f"budget_ratios[{l}][{h}]"
                if types[l][h].is_full:
                    if r is not None:
                        raise self.fail(where, f"must be null for a {types[l][h].value} head (full KV), found {r!r}")
                    out_row.append(None)
                else:
                    if r is None:
                        raise self.fail(where, f"missing ratio for a {types[l][h].value} head")
                    v = self.num(r, where, 0.0, float(L * H))
                    if v <= 0:
                        raise self.fail(where, "must be > 0")
                    out_row.append(v)
                    compressed.append(v)
            out.append(tuple(out_row))
        if compressed:
            mean = sum(compressed) / len(compressed)
            if abs(mean - 1.0) > _RATIO_MEAN_TOLERANCE:
                raise self.fail("budget_ratios", f"ratios of anchor/satellite heads must average 1, found {mean:.6f}")
        return tuple(out)
