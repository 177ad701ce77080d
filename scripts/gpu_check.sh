#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, nvcc and a CUDA build of torch (vLLM not needed):
# builds the extension with its CUDA kernels in place, runs the kernel tests on CPU and CUDA
# (tests/test_kernels.py: the `cuda` cases are the `gpu`-marked ones), and the kernel benchmark
# on the GPU. Output goes to stdout and, when $OUT is set, to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu_check.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  python3 setup.py build_ext --inplace 2>&1 | grep -E "error|warning: .*csrc" || true
  python3 -c "from vllm_heterocache.ops import kernels; print(kernels.describe())"
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -rs 2>&1 | tail -15
  (cd benchmarks && python3 bench_kernels.py --device cuda --tokens 131072 --heads 32 --group 4 --head-size 128)
} 2>&1 | tee "$log"
