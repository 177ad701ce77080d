"""Where prepared models live, and the helpers that build them safely and check them later.

A prepared folder is built in a hidden sibling temp folder and moved into place only when complete
(:func:`atomic_directory`), so an interrupted build never leaves a folder that looks finished. Its
``heterocache-manifest.json`` lists every file's sha256 and size plus the ``recipe`` it was built
from; :func:`verify_manifest` recomputes them, so a stale, edited or truncated folder is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_CACHE_DIR = "HETEROCACHE_CACHE_DIR"
MANIFEST_NAME = "heterocache-manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The root of this package's cache.

    ``$HETEROCACHE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vllm-heterocache``, else
    ``~/.cache/vllm-heterocache``. The folder is not created here.
    """
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm-heterocache"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _siblings(target: Path, kind: str) -> Iterator[Path]:
    return target.parent.glob(f".{target.name}.{kind}-*")


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock for building ``target`` (blocks while another process builds it).

    The lock is a ``.<name>.lock`` file next to ``target``. Once it is held, leftovers of earlier
    interrupted builds (``.<name>.tmp-*`` and ``.<name>.old-*``) are removed. Without ``fcntl``
    (non-POSIX systems) the lock is skipped; the build itself stays atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        fcntl = None  # type: ignore[assignment]
    with open(target.parent / f".{target.name}.lock", "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            for leftover in [*_siblings(target, "tmp"), *_siblings(target, "old")]:
                logger.info("removing leftover of an interrupted build: %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _normalise_permissions(root: Path) -> None:
    # mkdtemp makes 0700 folders and some writers make 0600 files; prepared models are shared.
    root.chmod(0o755)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder next to ``target``; on success it replaces ``target``.

    If the ``with`` body raises, the temp folder is deleted and ``target`` is left as it was. An
    existing ``target`` is moved aside, replaced with ``os.replace`` and then deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _normalise_permissions(staging)
        old: Path | None = None
        if target.exists() or target.is_symlink():
            # rename() may replace an empty folder only, so reserve an empty one to move onto.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _normalised(recipe: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(recipe), sort_keys=True))


def _listed_files(directory: Path) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_NAME
    )


def write_manifest(directory: Path, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``heterocache-manifest.json`` into ``directory`` and return its content.

    It lists every other file (relative POSIX path -> sha256 and size) and the JSON-serialisable
    ``recipe``. Keys are sorted and nothing time-dependent is stored, so equal builds give equal
    manifests.
    """
    directory = Path(directory)
    files = {
        rel: {"sha256": sha256_file(directory / rel), "size": (directory / rel).stat().st_size}
        for rel in _listed_files(directory)
    }
    manifest = {"format": MANIFEST_FORMAT, "recipe": _normalised(recipe), "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def manifest_problem(directory: Path, recipe: Mapping[str, Any]) -> str | None:
    """Why ``directory`` is not a complete build of ``recipe``, or ``None`` if it is.

    Checks the manifest's recipe, that the files on disk are exactly the listed ones, and every
    listed file's size and recomputed sha256.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        return f"{directory} does not exist"
    if not path.is_file():
        return f"{path} is missing"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        built_recipe = manifest["recipe"]
        fmt = manifest["format"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
            for v in files.values()
        ):
            raise TypeError("'files' must map paths to {sha256, size}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path} is unreadable ({exc.__class__.__name__}: {exc})"
    if fmt != MANIFEST_FORMAT:
        return f"{path} has format {fmt!r}, expected {MANIFEST_FORMAT}"
    wanted = _normalised(recipe)
    if built_recipe != wanted:
        changed = sorted(k for k in wanted.keys() | built_recipe.keys() if built_recipe.get(k) != wanted.get(k))
        return f"recipe changed ({', '.join(changed)}): built {built_recipe}, wanted {wanted}"
    on_disk = set(_listed_files(directory))
    if on_disk != set(files):
        missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
        return f"files differ from the manifest (missing: {missing}, unlisted: {extra})"
    for rel, entry in sorted(files.items()):
        size = (directory / rel).stat().st_size
        if size != entry["size"]:
            return f"{rel} has {size} bytes, manifest says {entry['size']}"
    for rel, entry in sorted(files.items()):
        found = sha256_file(directory / rel)
        if found != entry["sha256"]:
            return f"{rel} has sha256 {found}, manifest says {entry['sha256']}"
    return None


def verify_manifest(directory: Path, recipe: Mapping[str, Any]) -> bool:
    """True if ``directory`` is a complete, unmodified build of ``recipe`` (see :func:`manifest_problem`)."""
    return manifest_problem(directory, recipe) is None


def ensure_built(target: Path, recipe: Mapping[str, Any], build, *, force: bool = False, what: str = "") -> Path:
    """Return ``target`` if it is a verified build of ``recipe``; else build it atomically.

    ``build(staging)`` writes the files into an empty folder; the manifest is added here. Holds
    :func:`build_lock`, so concurrent callers build once.
    """
    import time

    target = Path(target)
    if not force and manifest_problem(target, recipe) is None:
        return target
    with build_lock(target):
        problem = manifest_problem(target, recipe)
        if problem is None and not force:  # another process built it while we waited
            return target
        if force:
            logger.info("rebuilding %s (force=True)", target)
        elif target.exists():
            logger.warning("rebuilding %s: %s", target, problem)
        logger.info("building %s into %s", what or target.name, target)
        start = time.perf_counter()
        with atomic_directory(target) as staging:
            build(staging)
            write_manifest(staging, recipe)
        logger.info("built %s in %.1f s", target, time.perf_counter() - start)
    return target
