"""Build check of the CUDA kernel sources with the machine's nvcc (no GPU needed)."""

import shutil
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        out = subprocess.run(
            ["nvcc", "-std=c++17", "-O3", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
             "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
            capture_output=True, text=True, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
