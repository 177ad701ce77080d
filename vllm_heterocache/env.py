"""The ``HETEROCACHE_*`` environment variables, each parsed here, once.

A bad value is a :class:`ConfigError` that names the variable and what it takes; a
``HETEROCACHE_*`` name that none of these is (a typo) is logged with the closest known name.
:func:`check` runs where the plugin registers, in every vLLM process. Pure layer.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from vllm_heterocache.errors import ConfigError

log = logging.getLogger("vllm.heterocache")

FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False,
               "": False}

# name -> (kind, meaning); kinds: "flag", "dir" (an existing directory), "path" (need not exist
# yet; must not be a file), "other" (read and checked by its own command).
VARIABLES: dict[str, tuple[str, str]] = {
    "HETEROCACHE_STEP_TIMING": ("flag", "per-step time breakdown in the engine log (benchmarks)"),
    "HETEROCACHE_PROFILE_DIR": ("dir", "searched first for shipped head profiles"),
    "HETEROCACHE_CACHE_DIR": ("path", "the cache of prepared models (default ~/.cache/vllm-heterocache)"),
    "HETEROCACHE_METRICS_DIR": ("dir", "where workers publish their metrics (set by the plugin)"),
    "HETEROCACHE_NO_KERNELS": ("flag", "at build time: do not compile the kernels"),
    "HETEROCACHE_VENV": ("other", "scripts/bootstrap.sh: the virtual environment"),
    "HETEROCACHE_TARGET": ("other", "scripts/bootstrap.sh: cpu or gpu"),
    "HETEROCACHE_MODEL": ("other", "heterocache serve: the model"),
    "HETEROCACHE_CONFIG": ("other", "heterocache serve: HeteroCache options (JSON)"),
    "HETEROCACHE_CONFIG_FILE": ("other", "heterocache serve: a JSON file of HeteroCache options"),
    "HETEROCACHE_HOST": ("other", "heterocache serve: the address to listen on"),
    "HETEROCACHE_PORT": ("other", "heterocache serve: the port to listen on"),
}


def flag(name: str) -> bool:
    """A 0/1 (true/false, yes/no, on/off) variable; unset or empty is false."""
    raw = os.environ.get(name, "")
    value = FLAG_VALUES.get(raw.strip().lower())
    if value is None:
        raise ConfigError(f"environment variable {name}={raw!r}: set it to 1 or 0 ({VARIABLES[name][1]})")
    return value


def directory(name: str) -> Path | None:
    """An existing directory, or None when unset."""
    raw = os.environ.get(name)
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ConfigError(f"environment variable {name}={raw!r} is not a directory ({VARIABLES[name][1]}): "
                          "create it, or unset the variable")
    return path


def check() -> None:
    """Parse every set ``HETEROCACHE_*`` variable this package reads; log unknown names."""
    for name, (kind, meaning) in VARIABLES.items():
        if kind == "flag":
            flag(name)
        elif kind == "dir":
            directory(name)
        elif kind == "path" and os.environ.get(name) and Path(os.environ[name]).expanduser().is_file():
            raise ConfigError(f"environment variable {name}={os.environ[name]!r} is a file, not a directory ({meaning})")
    for name in sorted(n for n in os.environ if n.startswith("HETEROCACHE_") and n not in VARIABLES):
        close = difflib.get_close_matches(name, VARIABLES, n=1)
        log.warning("heterocache: unknown environment variable %s ignored%s; known: %s", name,
                    f" (did you mean {close[0]}?)" if close else "", ", ".join(VARIABLES))
