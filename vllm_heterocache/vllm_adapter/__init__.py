"""Thin adapters between HeteroCache and vLLM 0.32: registration, the one patch ledger, and the
attention backend. The only modules of the package that import vLLM."""
