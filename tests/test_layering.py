"""The adapters import in one direction, and private vLLM names live in ``compat`` only."""

import ast
import subprocess
import sys

from conftest import ROOT

ADAPTER = ROOT / "vllm_heterocache" / "vllm_adapter"
# The documented chain (vllm_adapter/__init__.py): each module imports only those before it.
CHAIN = ["compat", "block_layout", "pools", "request_args", "metrics", "runner_hooks", "startup", "backend", "registration"]


def _imports(path):
    """(module, name) pairs of every import in a file, at any depth (function-level included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, a.name) for a in node.names]
    return found


def _adapter_deps(name):
    deps = set()
    for module, imported in _imports(ADAPTER / f"{name}.py"):
        if module == "vllm_heterocache.vllm_adapter" and imported in CHAIN:
            deps.add(imported)
        elif module.startswith("vllm_heterocache.vllm_adapter."):
            deps.add(module.rsplit(".", 1)[1])
    return deps


def test_adapter_modules_form_a_chain():
    assert sorted(p.stem for p in ADAPTER.glob("*.py") if p.stem != "__init__") == sorted(CHAIN)
    for i, name in enumerate(CHAIN):
        later = _adapter_deps(name) - set(CHAIN[:i])
        assert not later, f"vllm_adapter.{name} imports {sorted(later)}, which come after it in the chain"


def test_only_compat_uses_private_vllm_names():
    offenders = []
    for path in ADAPTER.glob("*.py"):
        if path.stem == "compat":
            continue
        tree = ast.parse(path.read_text())
        for module, imported in _imports(path):
            parts = module.split(".") + ([imported] if imported else [])
            if parts[0] == "vllm" and any(p.startswith("_") for p in parts):
                offenders.append(f"{path.name}: import {module} {imported or ''}")
        for node in ast.walk(tree):  # attribute access to a private name of something not ours
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, "private vLLM names outside vllm_adapter/compat.py: " + "; ".join(offenders)


def test_runtime_and_ops_do_not_import_the_adapters():
    for folder in ("runtime", "ops"):
        for path in (ROOT / "vllm_heterocache" / folder).glob("*.py"):
            for module, _ in _imports(path):
                assert not module.startswith(("vllm.", "vllm_heterocache.vllm_adapter")) and module != "vllm", (
                    f"{folder}/{path.name} imports {module}"
                )


def test_importing_the_adapters_registers_and_patches_nothing():
    code = (
        "import importlib\n"
        "from vllm.platforms.cpu import CpuPlatform\n"
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n"
        "before = (CpuPlatform.get_attn_backend_cls.__func__, GPUModelRunner._update_states, GPUModelRunner.get_kv_cache_spec)\n"
        f"for m in {CHAIN!r}:\n"
        "    importlib.import_module('vllm_heterocache.vllm_adapter.' + m)\n"
        "after = (CpuPlatform.get_attn_backend_cls.__func__, GPUModelRunner._update_states, GPUModelRunner.get_kv_cache_spec)\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
        "from vllm.v1 import kv_cache_spec_registry as registry\n"
        "from vllm_heterocache.vllm_adapter.pools import CompressedPoolSpec\n"
        "registered = CompressedPoolSpec in registry._REGISTRY_KVCACHESPEC_LIST\n"
        "member = 'HETEROCACHE' in AttentionBackendEnum.__members__\n"
        "import vllm_heterocache; vllm_heterocache.register()\n"
        "assert CompressedPoolSpec in registry._REGISTRY_KVCACHESPEC_LIST, 'register() registers the pool spec'\n"
        "print(before == after, member, registered)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["True", "False", "False"]
