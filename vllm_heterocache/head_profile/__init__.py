"""Head profiles: the versioned JSON file that says what each (layer, KV head) of a model is.

Pure layer: imports neither vLLM nor CUDA.
"""

from vllm_heterocache.head_profile.fingerprint import ModelFingerprint
from vllm_heterocache.head_profile.schema import (
    COMPRESSED_TYPES,
    FULL_TYPES,
    SCHEMA_VERSION,
    Cluster,
    HeadProfile,
    HeadType,
    load_profile,
)

__all__ = [
    "COMPRESSED_TYPES",
    "FULL_TYPES",
    "SCHEMA_VERSION",
    "Cluster",
    "HeadProfile",
    "HeadType",
    "ModelFingerprint",
    "load_profile",
]
