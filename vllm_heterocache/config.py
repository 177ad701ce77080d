"""The one HeteroCache config object, read once from vLLM's ``additional_config``.

Users pass it as::

    vllm serve MODEL --attention-backend heterocache \
        --additional-config '{"heterocache": {"compression_ratio": 0.25}}'

Every option, its meaning and default is the field list of :class:`HeteroCacheConfig`. Errors
name the option (``heterocache.<name>``) and what to change. Pure layer: no vLLM import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_heterocache.errors import ConfigError
from vllm_heterocache.policies import POLICIES

ADDITIONAL_CONFIG_KEY = "heterocache"
SHARED_PREFIXES = ("point", "copy")  # HeteroCacheConfig.shared_prefixes
DEFAULT_COMPRESSION_RATIO = 0.5

# Upper bounds of the options that size memory, each far above any useful value: a typo (an
# extra zero) gets a clear error at startup, not an engine that runs out of memory mid-serve.
LIMITS: dict[str, tuple[int | float, str]] = {
    "window": (8192, "the window's queries score every prompt token at prefill (window x prompt length x heads)"),
    "drift_interval": (256, "the query rings keep this many decode queries per request and pivot head"),
    "pool_kernel": (255, "the pooling runs over this many positions per score"),
    "budget_classes": (16, "each class is a KV cache group, with a block table in every step"),
    "host_tier_gib": (4096, "the host tier is allocated (or reserved on disk) whole at startup, per rank"),
}


@dataclass(frozen=True)
class HeteroCacheConfig:
    """Validated HeteroCache options.

    Attributes:
        policy: the KV-compression policy (``policies``): ``heterocache`` (default), ``full``,
            ``streamingllm``, ``snapkv``, ``pyramidkv`` or ``duo``. It lays out the KV pools; a
            request may pick another policy those pools hold (``vllm_xargs``, README "Policies").
        profile: path of a head profile (JSON), or the name of a shipped profile (its file
            stem, e.g. ``SmolLM2-135M-Instruct-sparse``). None: the shipped profile whose model
            fingerprint matches the served model (the one named after it, if several match).
        compression_ratio: fraction of the prompt KV cache KEPT, over all heads, in (0, 1]
            (1 keeps everything). Exclusive with ``token_budget``. Default 0.5 when neither is set.
        token_budget: prompt tokens kept by an average compressed head (before its budget ratio
            is applied), instead of a ratio. Exclusive with ``compression_ratio``.
        window: the most recent prompt tokens every compressed head keeps (observation window);
            also the number of last prompt queries that score tokens at prefill.
        drift_interval: pivots check for drift every this many decode steps (N).
        stability_threshold: overlap below which a pivot has drifted; None: the profile's
            calibration ``tau_stable``.
        pool_kernel: width of the average pooling over positions applied to attention scores
            before top-k (odd).
        refill: False disables drift-triggered refills (satellites keep their prefill selection;
            the ablation that shows what retrieval buys).
        round_to_block: round every compressed head's budget up to a multiple of the KV block
            size (capped at the prompt length).
        min_prompt_len: prompts shorter than this keep every token. Compressing a short prompt
            saves little, and its budgets would hold little more than the window, dropping the
            first tokens that models attend to most (the attention sink).
        budget_classes: compressed heads are kept in this many KV pools, by budget ratio; a pool
            keeps, per request, the largest budget of its heads for each of them, so more classes
            waste less memory (and add KV cache groups, i.e. block tables, to every step).
        host_tier_gib: size of the host tier, which keeps the full prompt KV of satellite heads
            for refills (GiB). None: room for as many prompt tokens as the KV cache holds for a
            full head. Checked against available memory at startup.
        host_tier_path: a directory: back the host tier with a file there (memory-mapped, so the
            full copies can leave RAM). None: anonymous memory.
        stats_interval_s: seconds between two metrics lines in the engine log (README,
            "Metrics"). Part of the config, not an environment variable, so it reaches every
            worker, Ray actors included.
        shared_prefixes: how a request whose prompt starts with a prefix-cache hit keeps the
            tokens its compressed heads select there (``placement``): ``point`` (default) reads
            them in place, in the blocks it shares with the other requests on that prefix, so
            that they hold the prefix once; ``copy`` copies them into the request's own blocks,
            as for a prompt without a hit: each request holds its own selection of the prefix,
            and decodes faster where reading scattered tokens costs more than reading a copy
            (``benchmarks/bench_kernels.py``).
    """

    policy: str = "heterocache"
    profile: str | None = None
    compression_ratio: float | None = None
    token_budget: int | None = None
    window: int = 32
    drift_interval: int = 5
    stability_threshold: float | None = None
    pool_kernel: int = 5
    refill: bool = True
    round_to_block: bool = False
    min_prompt_len: int = 256
    budget_classes: int = 4
    host_tier_gib: float | None = None
    host_tier_path: str | None = None
    stats_interval_s: float = 10.0
    shared_prefixes: str = "point"

    def __post_init__(self) -> None:
        _check_type(self)
        if self.shared_prefixes not in SHARED_PREFIXES:
            raise ConfigError(f"heterocache.shared_prefixes={self.shared_prefixes!r}: choose "
                              + " or ".join(map(repr, SHARED_PREFIXES)))
        if self.policy not in POLICIES:
            raise ConfigError(f"heterocache.policy={self.policy!r} is not a policy: choose one of {', '.join(POLICIES)}")
        if self.compression_ratio is not None and self.token_budget is not None:
            raise ConfigError(
                "heterocache.compression_ratio and heterocache.token_budget are exclusive: set one"
            )
        if self.compression_ratio is None and self.token_budget is None:
            object.__setattr__(self, "compression_ratio", DEFAULT_COMPRESSION_RATIO)
        r = self.compression_ratio
        if r is not None and not (math.isfinite(r) and 0.0 < r <= 1.0):
            raise ConfigError(
                f"heterocache.compression_ratio must be in (0, 1] (fraction of the KV cache kept), got {r}"
            )
        _positive("token_budget", self.token_budget, allow_none=True)
        _positive("window", self.window, minimum=0)
        _positive("drift_interval", self.drift_interval)
        _positive("pool_kernel", self.pool_kernel)
        _positive("min_prompt_len", self.min_prompt_len, minimum=0)
        _positive("budget_classes", self.budget_classes)
        for name, (limit, why) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ConfigError(f"heterocache.{name} must be at most {limit}, got {value}: {why}")
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"heterocache.pool_kernel must be odd, got {self.pool_kernel}")
        if not (math.isfinite(self.stats_interval_s) and self.stats_interval_s > 0):
            raise ConfigError(f"heterocache.stats_interval_s must be a positive number of seconds, got {self.stats_interval_s}")
        g = self.host_tier_gib
        if g is not None and not (math.isfinite(g) and g > 0):
            raise ConfigError(f"heterocache.host_tier_gib must be a positive number of GiB, got {g}")
        t = self.stability_threshold
        if t is not None and not 0.0 <= t <= 1.0:
            raise ConfigError(f"heterocache.stability_threshold must be in [0, 1], got {t}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> HeteroCacheConfig:
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"additional_config.{ADDITIONAL_CONFIG_KEY} must be a JSON object, got {type(options).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) heterocache.{', heterocache.'.join(unknown)}; valid options: "
                + ", ".join(sorted(known))
            )
        return cls(**options)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> HeteroCacheConfig:
        """Read ``additional_config["heterocache"]`` (defaults when absent)."""
        if not additional_config:
            return cls()
        if not isinstance(additional_config, Mapping):
            raise ConfigError(f"additional_config must be a JSON object, got {type(additional_config).__name__}")
        options = additional_config.get(ADDITIONAL_CONFIG_KEY)
        return cls() if options is None else cls.from_dict(options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES: dict[str, tuple[type, ...]] = {
    "policy": (str,),
    "profile": (str,),
    "compression_ratio": (float, int),
    "token_budget": (int,),
    "window": (int,),
    "drift_interval": (int,),
    "stability_threshold": (float, int),
    "pool_kernel": (int,),
    "refill": (bool,),
    "round_to_block": (bool,),
    "min_prompt_len": (int,),
    "budget_classes": (int,),
    "host_tier_gib": (float, int),
    "host_tier_path": (str,),
    "stats_interval_s": (float, int),
    "shared_prefixes": (str,),
}


def _check_type(cfg: HeteroCacheConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.default is None:
            continue
        allowed = _TYPES[f.name]
        ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        if not ok:
            names = " or ".join(t.__name__ for t in allowed)
            raise ConfigError(f"heterocache.{f.name} must be {names}, got {value!r} ({type(value).__name__})")
    if cfg.compression_ratio is not None:
        object.__setattr__(cfg, "compression_ratio", float(cfg.compression_ratio))
    for name in ("stability_threshold", "host_tier_gib", "stats_interval_s"):
        if getattr(cfg, name) is not None:
            object.__setattr__(cfg, name, float(getattr(cfg, name)))


def _positive(name: str, value: int | None, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        raise ConfigError(f"heterocache.{name} must be an integer >= {minimum}, got {value!r}")
