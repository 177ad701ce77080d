"""The CPU image, built by ``scripts/image.sh`` and run by a real container engine (podman with runc):
the container as the manifests run it, its endpoints, its healthcheck and its signals, its errors,
and the CPU overlay's rendered manifests played by ``podman kube play``.

The lane of its own: ``make image-test`` (marker ``container``; ``make test`` leaves these out).
It builds the image if needed (a build of an unchanged tree is a layer-cache hit). Skipped with
the reason where no container engine is installed (``.ci/run`` installs Debian's).
"""

import json
import os
import resource
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, kubectl
from vllm_heterocache.server_process import free_port

pytestmark = pytest.mark.container

IMAGE = os.environ.get("HETEROCACHE_IMAGE", "vllm-heterocache:cpu")
READY_S = 1200  # start to ready: 5-8 minutes on a loaded 2-core machine (vLLM compiles the model)
GRACE_S = 30  # SIGTERM to exit: `podman stop`'s grace
MODEL = "SmolLM2-135M-Instruct"


def _podman() -> str:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("no container engine: install podman and runc (Debian: apt-get install podman runc buildah "
                    "debootstrap; .ci/run does)")
    return podman


def _ulimit(which: int, cap: int) -> str:
    """A limit the runtime may set: at most the hard limit this process has (root may lack
    CAP_SYS_RESOURCE in a sandbox, and podman's defaults exceed it)."""
    hard = resource.getrlimit(which)[1]
    value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    return f"{value}:{value}"


def engine_flags() -> list[str]:
    flags = ["--ulimit", "nofile=" + _ulimit(resource.RLIMIT_NOFILE, 65536),
             "--ulimit", "nproc=" + _ulimit(resource.RLIMIT_NPROC, 4096)]
    if shutil.which("runc"):  # crun fails in some sandboxes (rlimits, hybrid cgroups): runc works in all we saw
        flags[:0] = ["--runtime", "runc"]
    return flags


# what the manifests ask of the server container (deploy/kubernetes/base/deployment.yaml)
HARDENED = ["--user", "1000:1000", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp:rw,exec,mode=1777",
            # (podman: owned by the user; its tmpfs ignored mode= for this folder of the image's)
            "--mount", "type=tmpfs,destination=/home/heterocache,chown=true"]


def podman(*args, timeout=120, check=True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([_podman(), *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def image():
    """The image, built (or found up to date) by scripts/image.sh."""
    _podman()
    if not (shutil.which("buildah") or shutil.which("docker")):
        pytest.skip("no image builder: install buildah (Debian: apt-get install buildah; .ci/run does)")
    done = subprocess.run([str(ROOT / "scripts" / "image.sh"), IMAGE], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"scripts/image.sh failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return IMAGE


def wait_ready(url: str, alive, logs, timeout: float = READY_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if not alive():
            raise AssertionError(f"the server stopped before it was ready:\n{logs()[-6000:]}")
        time.sleep(5)
    raise AssertionError(f"not ready after {timeout} s:\n{logs()[-6000:]}")


def host_pids(container: str) -> set[int]:
    out = podman("top", container, "hpid", check=False).stdout.split()
    return {int(p) for p in out if p.isdigit()}


def running(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists()}


@pytest.fixture(scope="module")
def server(image):
    """The image run as the manifests run it: UID 1000, read-only root, HOME and /tmp on tmpfs,
    every capability dropped; /dev/shm as vLLM needs it. Yields (name, base URL)."""
    name, port = f"heterocache-test-{uuid.uuid4().hex[:8]}", free_port()
    podman("run", "-d", "--name", name, *engine_flags(), *HARDENED, "--shm-size", "1g",
           "-p", f"127.0.0.1:{port}:8000", image)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health",
                   alive=lambda: podman("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true",
                   logs=lambda: podman("logs", name, check=False).stderr)
        yield name, f"http://127.0.0.1:{port}"
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def test_runs_unprivileged_on_a_read_only_root(server):
    name, _ = server
    assert podman("exec", name, "id", "-u").stdout.strip() == "1000"
    config = json.loads(podman("inspect", name).stdout)[0]["HostConfig"]
    assert config["ReadonlyRootfs"] is True
    # tini, the server and its engine processes: no capability at all
    status = podman("exec", name, "sh", "-c", "grep -E '^Cap(Eff|Prm|Bnd):' /proc/[0-9]*/status").stdout
    assert len(status.splitlines()) >= 3 * 4, status
    assert all(line.split()[1] == "0000000000000000" for line in status.splitlines()), status
    assert podman("exec", name, "touch", "/opt/vllm-heterocache/x", check=False).returncode != 0
    for writable in ("/tmp", "/home/heterocache"):
        podman("exec", name, "touch", f"{writable}/x")
        assert "tmpfs" in podman("exec", name, "sh", "-c", f"grep ' {writable} ' /proc/mounts").stdout


def test_serves_models_chat_and_metrics(server):
    _, url = server
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    answer = requests.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": MODEL, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    samples = {line.split("{")[0].split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("heterocache_")}
    assert samples, "no heterocache_* series on /metrics"
    assert samples.get("heterocache_host_tier_blocks_total", 0) > 0, samples
    assert "heterocache_prefill_selections_total" in samples, samples


def test_healthcheck_command_passes_inside(server, image):
    """The image's HEALTHCHECK, run by the engine and by hand inside the container."""
    name, _ = server
    check = json.loads(podman("image", "inspect", image).stdout)[0]["Healthcheck"]["Test"]
    assert check[0] == "CMD" and "/health" in check[-1], check
    done = podman("exec", name, *check[1:], check=False)
    assert done.returncode == 0, done.stderr
    assert podman("healthcheck", "run", name, check=False).returncode == 0


def test_sigterm_exits_0_and_leaves_nothing(server):
    name, _ = server
    pids = host_pids(name)
    assert len(pids) >= 3, pids  # tini, vllm serve, its engine core
    start = time.monotonic()
    podman("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 60)
    took = time.monotonic() - start
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0 and took < GRACE_S, (state, took)
    time.sleep(1)
    assert not running(pids), f"still running after the container stopped: {running(pids)}"


def test_bad_config_exits_2_naming_it(image):
    done = podman("run", "--rm", *engine_flags(), *HARDENED, "-e", 'HETEROCACHE_CONFIG={"compression_ratio": "half"}',
                  image, check=False, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "HETEROCACHE_CONFIG" in last_line(done.stderr) and "compression_ratio" in last_line(done.stderr)


def test_print_command(image):
    done = podman("run", "--rm", *engine_flags(), *HARDENED, image, "--print-command", "--max-num-seqs", "4",
                  timeout=300)
    command = last_line(done.stdout)
    program, verb = command.split()[:2]
    assert program.endswith("/vllm") and verb == "serve", command
    for part in ("--attention-backend heterocache", "--host 0.0.0.0", "--port 8000", "--max-num-seqs 4",
                 f"--served-model-name {MODEL}"):
        assert part in command, command


def test_default_shm_stops_at_once_naming_the_flag(image):
    """A container engine's default /dev/shm (64 MB) is too small for vLLM's message queues: the
    server stops before any engine process starts, its last line naming --shm-size and --ipc=host."""
    start = time.monotonic()
    done = podman("run", "--rm", *engine_flags(), *HARDENED, image, check=False, timeout=600)
    line = last_line(done.stdout + done.stderr)
    assert done.returncode != 0
    assert "--shm-size" in line and "--ipc=host" in line, line
    assert time.monotonic() - start < 300


# -- the manifests -------------------------------------------------------------------------------


def _played_as_podman_can(docs: list[dict], shm: Path) -> str:
    """The rendered manifests, but for the pod's /dev/shm volume. Kubernetes makes an emptyDir a
    fresh world-writable folder (``medium: Memory``: a tmpfs); podman 4.3 plays it as a volume
    copied up from the image's folder, and the image's /dev/shm is root's (0755), so UID 1000
    could not create vLLM's shared-memory queues there. That one volume is played as a hostPath
    to ``shm``, a world-writable tmpfs made here, as Kubernetes would make it; nothing else changes."""
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert volume.pop("emptyDir") == {"medium": "Memory", "sizeLimit": "1Gi"}
    volume["hostPath"] = {"path": str(shm), "type": "Directory"}
    return yaml.safe_dump_all(docs)


@pytest.fixture
def played(image, tmp_path):
    """The CPU overlay rendered by kubectl kustomize and played by podman (its image: the one built
    here). Yields the YAML file and podman's environment; tears everything down afterwards."""
    rendered = subprocess.run([kubectl(), "kustomize", str(ROOT / "deploy/kubernetes/overlays/cpu")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=1777", "tmpfs", str(shm)],
                             capture_output=True).returncode == 0
    shm.chmod(0o1777)
    yaml_file = tmp_path / "cpu.yaml"
    docs = list(yaml.safe_load_all(rendered))
    yaml_file.write_text(_played_as_podman_can(docs, shm))
    conf = tmp_path / "containers.conf"  # kube play has no --runtime / --ulimit flags
    runtime = '\nruntime = "runc"' if shutil.which("runc") else ""
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={_ulimit(resource.RLIMIT_NOFILE, 65536)}", '
                    f'"nproc={_ulimit(resource.RLIMIT_NPROC, 4096)}"]\n[engine]{runtime}\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    podman("kube", "play", str(yaml_file), env=env, timeout=300)
    try:
        yield yaml_file, env
    finally:
        podman("kube", "down", str(yaml_file), env=env, check=False, timeout=300)
        for name in configmaps:  # podman 4.3's kube down keeps the volumes it made of ConfigMaps
            podman("volume", "rm", "-f", name, env=env, check=False)
        if mounted:
            subprocess.run(["umount", str(shm)], check=False)


def test_manifests_play_answer_and_tear_down(played):
    yaml_file, env = played
    pods = json.loads(podman("pod", "ps", "--format", "json", env=env).stdout)
    pod = next(p for p in pods if p["Name"].startswith("heterocache"))
    server = next(c["Names"] for c in pod["Containers"] if c["Names"].endswith("-server"))
    inspect = json.loads(podman("inspect", server, env=env).stdout)[0]
    # its ConfigMap, emptyDirs and security context
    mounts = {m["Destination"] for m in inspect["Mounts"]}
    assert {"/etc/heterocache", "/tmp", "/var/lib/heterocache/home", "/dev/shm"} <= mounts, mounts
    assert json.loads(podman("exec", server, "cat", "/etc/heterocache/config.json", env=env).stdout) == \
        {"compression_ratio": 0.5, "host_tier_gib": 2}
    assert podman("exec", server, "id", "-u", env=env).stdout.strip() == "1000"
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    status = podman("exec", server, "grep", "^CapEff:", "/proc/1/status", env=env).stdout
    assert status.split()[1] == "0000000000000000", status
    # it answers through its port (on the pod's address)
    networks = json.loads(podman("inspect", pod["InfraId"], env=env).stdout)[0]["NetworkSettings"]["Networks"]
    ip = next(iter(networks.values()))["IPAddress"]
    wait_ready(f"http://{ip}:8000/health",
               alive=lambda: podman("inspect", "-f", "{{.State.Running}}", server, env=env).stdout.strip() == "true",
               logs=lambda: podman("logs", server, env=env, check=False).stderr)
    answer = requests.post(f"http://{ip}:8000/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"].strip(), answer.json()
    pids = host_pids(server)
    # torn down with nothing left: pod, containers, their volumes, processes
    podman("kube", "down", str(yaml_file), env=env, timeout=300)
    assert not [p for p in json.loads(podman("pod", "ps", "--format", "json", env=env).stdout)
                if p["Id"] == pod["Id"]]
    assert not [c for c in json.loads(podman("ps", "-a", "--format", "json", env=env).stdout)
                if c.get("Pod") == pod["Id"]]
    volumes = {v["Name"] for v in json.loads(podman("volume", "ls", "--format", "json", env=env).stdout)}
    assert not volumes & {"tmp", "home", "dshm"}, volumes
    time.sleep(1)
    assert not running(pids), f"still running after kube down: {running(pids)}"
