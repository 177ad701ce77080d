"""kvpress (NVIDIA's KV-cache compression library for HF transformers) in its own virtual environment.

    python benchmarks/kvpress_env.py [PATH]      # create or check it, print its python

kvpress 0.5.5 needs ``transformers<5.3`` while this project runs vLLM with a newer transformers,
so kvpress gets a venv of its own (never installed into the project's venv). PyPI's Linux torch
is the CUDA build with gigabytes of NVIDIA wheels, so the venv does not install torch: it reuses
the calling interpreter's torch (a ``.pth`` file adds a folder of links to that torch and its
dist-info only; pip sees that torch as installed and a constraint forbids replacing it).
Everything else comes from the package index at the versions pinned below. A venv whose recorded
recipe (pins, python, torch) differs from this file's is rebuilt.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

KVPRESS = "kvpress==0.5.5"
# kvpress 0.5.5 asks for transformers>=4.56,<5.3, accelerate>=1,<2, datasets>=2.21, peft>=0.20, torch>=2.3.1,<3
REQUIREMENTS = [KVPRESS, "transformers==5.2.0"]
# everything else as resolved when this recipe was made (a constraints file: same versions on every machine)
LOCK = [
    "accelerate==1.16.0", "annotated-doc==0.0.7", "annotated-types==0.8.0", "anyio==4.16.0",
    "cachetools==5.5.2", "certifi==2026.10.19.post1", "charset-normalizer==3.5.3", "click==8.5.1",
    "datasets==5.2.0", "dill==0.4.1", "filelock==4.3.1", "fire==0.6.0", "fsspec==2026.9.0", "h11==0.16.0",
    "hf-xet==1.8.0", "httpcore==1.0.9", "httpx==0.29.0", "huggingface_hub==1.33.0", "idna==3.20",
    "Jinja2==3.1.6", "markdown-it-py==4.3.0", "MarkupSafe==3.0.4", "mdurl==0.1.2", "mpmath==1.3.0",
    "multiprocess==0.70.19", "networkx==3.6.1", "numpy==2.4.6", "packaging==26.4", "pandas==2.3.3",
    "peft==0.21.2", "psutil==7.2.2", "pyarrow==26.0.1", "pydantic==2.14.4", "pydantic_core==2.50.5",
    "Pygments==2.21.0", "python-dateutil==4.0.0", "pytz==2026.6", "PyYAML==6.0.4", "regex==2026.11.19",
    "requests==2.34.2", "rich==15.0.0", "safetensors==0.8.0", "shellingham==1.5.4", "six==1.17.0",
    "sympy==1.14.0", "termcolor==3.3.0", "tokenizers==0.22.2", "tqdm==4.70.1", "typer==0.29.2",
    "typer-slim==0.24.0", "typing-inspection==0.4.5", "typing_extensions==4.16.0", "tzdata==2026.6",
    "urllib3==2.8.0", "xxhash==4.1.0", "setuptools==84.2.1",
]
STAMP = "heterocache-kvpress.json"


class KvpressEnvError(RuntimeError):
    pass


def default_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vllm-heterocache" / f"kvpress-{KVPRESS.split('==')[1]}"


def _python(path: Path) -> Path:
    return path / "bin" / "python"


def _site_packages(path: Path) -> Path:
    return path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _torch_files() -> tuple[str, list[Path]]:
    """The calling interpreter's torch: its version and the top-level paths to link."""
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError as e:
        raise KvpressEnvError("torch is not installed in this interpreter; the kvpress venv reuses it") from e
    base = Path(dist.locate_file(""))
    tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    paths = [base / t for t in sorted(tops) if (base / t).exists() and not t.endswith(".py") and t != "bin"]
    if not any(p.name == "torch" for p in paths):
        raise KvpressEnvError(f"cannot find torch's package folder under {base}")
    return dist.version, paths


def _recipe(torch_version: str) -> dict:
    return {"requirements": REQUIREMENTS, "lock": LOCK, "python": sys.version.split()[0], "torch": torch_version, "version": 1}


def ensure_env(path: Path | str | None = None, quiet: bool = False) -> Path:
    """Create (or reuse) the kvpress venv at ``path``; return its python executable.

    Raises KvpressEnvError naming the step that failed (e.g. pip could not reach the index)."""
    path = Path(path) if path else default_path()
    torch_version, torch_paths = _torch_files()
    recipe = _recipe(torch_version)
    stamp = path / STAMP
    if stamp.exists() and _python(path).exists():
        try:
            if json.loads(stamp.read_text()).get("recipe") == recipe:
                return _python(path)
        except ValueError:
            pass
    if path.exists():
        if not (path / "pyvenv.cfg").exists():
            raise KvpressEnvError(f"{path} exists and is not a virtual environment; not touching it")
        shutil.rmtree(path)
    out = subprocess.DEVNULL if quiet else None
    try:
        venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
    except Exception as e:  # noqa: BLE001 - reported with the step's name
        raise KvpressEnvError(f"creating the venv at {path} failed: {e}") from e
    links = path / "shared-torch"
    links.mkdir()
    for p in torch_paths:
        (links / p.name).symlink_to(p)
    # appended after the venv's own site-packages: only torch is visible from the caller's env
    (_site_packages(path) / "heterocache_shared_torch.pth").write_text(str(links) + "\n")
    constraints = path / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in [f"torch=={torch_version}", *LOCK]))
    cmd = [str(_python(path)), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints),
           *REQUIREMENTS]
    r = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        raise KvpressEnvError(
            f"pip could not install {' '.join(REQUIREMENTS)} into {path} (no network or package index? "
            f"the kvpress comparison needs them once; nothing else depends on it):\n{tail}")
    check = subprocess.run([str(_python(path)), "-c", "import torch, transformers, kvpress; "
                            "print(torch.__version__, transformers.__version__)"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check.returncode != 0:
        raise KvpressEnvError(f"kvpress does not import in {path}:\n{check.stderr[-2000:]}")
    freeze = subprocess.run([str(_python(path)), "-m", "pip", "freeze"], stdout=subprocess.PIPE, text=True).stdout
    stamp.write_text(json.dumps({"recipe": recipe, "versions": check.stdout.split(), "freeze": freeze.split()},
                                indent=1))
    return _python(path)


if __name__ == "__main__":
    try:
        print(ensure_env(sys.argv[1] if len(sys.argv) > 1 else None))
    except KvpressEnvError as e:
        sys.exit(f"kvpress_env: {e}")
