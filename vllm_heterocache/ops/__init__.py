"""Operations on KV tensors: pure-PyTorch references (the oracle and CPU fallback) and, later,
compiled kernels from csrc/ with the same contracts."""
