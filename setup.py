"""Builds the compiled kernels (``vllm_heterocache._C``) next to the Python package.

The extension is compiled against the torch of the build environment, so it is built when
torch is importable there: ``pip install --no-build-isolation -e .`` in an environment with
torch (``scripts/bootstrap.sh`` does this). Without torch, or with HETEROCACHE_NO_KERNELS=1, the
package installs without it and runs the PyTorch reference ops (a startup line says which).
CPU kernels need x86-64 with AVX2/FMA/F16C and OpenMP. When torch has CUDA and a CUDA toolchain
is found (``CUDA_HOME``), the CUDA kernels and their binding are built into the same extension,
for sm_80 and sm_90 (``HETEROCACHE_CUDA_ARCHS="80;90"`` to change); HETEROCACHE_NO_CUDA=1 skips them.
"""

import os
import platform

from setuptools import setup

CPU_SOURCES = ["csrc/torch_bindings.cpp", "csrc/cpu/gather_attention.cpp", "csrc/cpu/drift_check.cpp",
               "csrc/cpu/refill_copy.cpp", "csrc/cpu/stage_blocks.cpp",
               "csrc/cpu/window_scores.cpp", "csrc/cpu/write_slots.cpp"]
CUDA_SOURCES = ["csrc/cuda/torch_bindings_cuda.cu", "csrc/cuda/gather_attention.cu", "csrc/cuda/drift_check.cu",
                "csrc/cuda/refill_copy.cu"]
CXX_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]


def with_cuda() -> bool:
    if os.environ.get("HETEROCACHE_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
    if os.environ.get("HETEROCACHE_NO_KERNELS") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    if with_cuda():
        archs = os.environ.get("HETEROCACHE_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ext = CUDAExtension(
            "vllm_heterocache._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", *gencode]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("vllm_heterocache._C", CPU_SOURCES, extra_compile_args=CXX_FLAGS,
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
