"""Builds the compiled kernels (``vllm_heterocache._C``) next to the Python package.

The extension is compiled against the torch of the build environment, so it is built when
torch is importable there: ``pip install --no-build-isolation -e .`` in an environment with
torch (``scripts/bootstrap.sh`` does this). Without torch, or with HETEROCACHE_NO_KERNELS=1, the
package installs without it and runs the PyTorch reference ops (a startup line says which).
CPU kernels need x86-64 with AVX2/FMA/F16C and OpenMP.
"""

import os
import platform

from setuptools import setup


def extensions():
    if os.environ.get("HETEROCACHE_NO_KERNELS") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    ext = CppExtension(
        "vllm_heterocache._C",
        ["csrc/torch_bindings.cpp", "csrc/cpu/gather_attention.cpp", "csrc/cpu/drift_check.cpp",
         "csrc/cpu/refill_copy.cpp"],
        extra_compile_args=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
