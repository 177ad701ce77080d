"""The provenance block every profile carries: which tool, command and date made it."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from vllm_heterocache import __version__


def created_date() -> str:
    """UTC now, or ``SOURCE_DATE_EPOCH`` when set (reproducible builds: same input, same bytes)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(command: str, source: str, **extra: Any) -> dict[str, Any]:
    return {
        "tool": "vllm-heterocache",
        "tool_version": __version__,
        "command": command,
        "created": created_date(),
        "source": source,
        **extra,
    }
