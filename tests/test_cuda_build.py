"""Build check of the CUDA sources with the machine's nvcc (no GPU needed).

The kernels compile on their own; the binding (csrc/cuda/torch_bindings_cuda.cu) compiles
against this environment's torch headers. A CPU-only torch wheel ships the c10/cuda headers but
not their generated build macros, hence C10_USING_CUSTOM_GENERATED_MACROS here (a CUDA torch
build, as setup.py uses, has them).
"""

import shutil
import subprocess
import sysconfig

import pytest

from conftest import ROOT

GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")


def nvcc(source, out, *flags):
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-c", str(source), "-o", str(out), *flags],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("name", ["gather_attention", "drift_check", "refill_copy"])
def test_cuda_kernel_compiles_for_sm80_and_sm90(tmp_path, name):
    nvcc(ROOT / "csrc" / "cuda" / f"{name}.cu", tmp_path / f"{name}.o", *GENCODE)


@pytest.mark.slow
@needs_nvcc
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    nvcc(ROOT / "csrc" / "cuda" / "torch_bindings_cuda.cu", tmp_path / "bindings.o", *includes,
         "-DC10_USING_CUSTOM_GENERATED_MACROS", "-gencode", "arch=compute_90,code=sm_90")
