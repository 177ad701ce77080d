"""The pure layer (profile, taxonomy, budgets, config, reference ops) and the runtime and ops
below the adapters must import without vLLM."""

import subprocess
import sys

from conftest import ROOT

PURE_MODULES = [
    "vllm_heterocache",
    "vllm_heterocache.config",
    "vllm_heterocache.budget",
    "vllm_heterocache.taxonomy",
    "vllm_heterocache.head_profile",
    "vllm_heterocache.head_profile.importer",
    "vllm_heterocache.head_profile.report",
    "vllm_heterocache.ops.reference",
    "vllm_heterocache.ops.paged",
    "vllm_heterocache.ops.kernels",
    "vllm_heterocache.head_profile.synthetic",
    "vllm_heterocache.server_process",
    "vllm_heterocache.runtime.step",
    "vllm_heterocache.runtime.heads",
    "vllm_heterocache.runtime.core",
    "vllm_heterocache.runtime.layer",
]


def test_pure_layer_imports_without_vllm():
    code = (
        "import sys\n"
        "sys.modules['vllm'] = None  # any `import vllm` now raises ImportError\n"
        f"for m in {PURE_MODULES!r}:\n"
        "    __import__(m)\n"
        "assert not any(k == 'vllm' or k.startswith('vllm.') for k, v in sys.modules.items() if v is not None)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_package_import_is_cheap():
    code = "import sys, vllm_heterocache\nprint([m for m in ('vllm', 'transformers', 'torch') if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_register_is_idempotent_and_honoured_on_cpu():
    code = (
        "import vllm_heterocache\n"
        "vllm_heterocache.register(); vllm_heterocache.register()\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
        "from vllm.platforms.cpu import CpuPlatform\n"
        "from vllm.v1.attention.selector import AttentionSelectorConfig\n"
        "import inspect, pickle, torch\n"
        "m = AttentionBackendEnum['HETEROCACHE']\n"
        "assert pickle.loads(pickle.dumps(m)) is m\n"
        "print(m.get_path())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("vllm_heterocache.vllm_adapter.backend.HeteroCacheBackend")


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("heterocache") == "vllm_heterocache:register"
