"""Deployment files: setup.sh sourced in a child bash, both compose files through
`docker-compose config`, and the Dockerfile checked against the project tree."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from utils.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_FILES = ("setup.sh", "compose.yaml", "compose.gpu.yaml", "docker", ".dockerignore")
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose is not installed (Debian: apt-get install -y docker-compose); "
    "it validates compose files without a Docker engine",
)


@pytest.fixture(autouse=True)
def _no_vlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("VLM_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the deployment files, so setup.sh never writes the real .env."""
    for name in DEPLOY_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            shutil.copy2(source, tmp_path / name)
    return tmp_path


def source_setup(
    project: Path, env: dict[str, str] | None = None, before: str = "", after: str = ""
) -> subprocess.CompletedProcess[str]:
    """`source setup.sh` in a fresh bash (no inherited VLM_* variables), then `after`."""
    script = f'{before}\nsource ./setup.sh\necho "status=$?"\necho shell-alive\n{after}\n'
    return subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        cwd=project,
        env={"PATH": "/usr/bin:/bin", "HOME": str(project), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = shlex.split(value)[0] if value else ""
    return values


def setup_defaults() -> dict[str, str]:
    """The name|default|meaning table at the top of setup.sh."""
    text = (ROOT / "setup.sh").read_text()
    return dict(re.findall(r'^\s+"(VLM_[A-Z0-9_]+)\|([^|]*)\|', text, flags=re.M))


# --- setup.sh ------------------------------------------------------------------


def test_setup_defaults_are_settings_fields_with_the_same_defaults() -> None:
    defaults = setup_defaults()
    assert len(defaults) >= 12
    fields = Settings.model_fields
    for name, value in defaults.items():
        field = name.removeprefix("VLM_").lower()
        assert field in fields, f"{name} is not a setting"
        parsed = Settings(_env_file=None, **{field: value})
        assert getattr(parsed, field) == getattr(Settings(_env_file=None), field), name


def test_setup_with_defaults(project: Path) -> None:
    result = source_setup(
        project,
        before="set -u",
        after='echo "device=$VLM_DEVICE port=$VLM_PORT"; set -o | grep -E "^(errexit|nounset)"; '
        'declare -F _vlm_setup || echo no-function; echo "leftover=${_vlm_status-unset}"',
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "status=0" in out and "shell-alive" in out
    assert "device=CPU port=8000" in out
    assert re.search(r"errexit\s+off", out) and re.search(r"nounset\s+on", out)
    assert "no-function" in out and "leftover=unset" in out
    assert "VLM_MODEL_NAME" in out and "(default)" in out  # prints what it set
    env = read_env_file(project / ".env")
    assert env == setup_defaults()
    assert (project / "models").is_dir()
    # The server reads the same file and gets its own defaults back.
    from_file = Settings(_env_file=project / ".env")
    assert from_file.model_dump() == Settings(_env_file=None).model_dump()


def test_setup_keeps_environment_values(project: Path) -> None:
    env = {
        "VLM_DEVICE": "hetero:gpu.1,cpu",
        "VLM_PORT": "9001",
        "VLM_SEED": "7",
        "VLM_COMPRESSION_WEIGHT_FORMAT": "INT8",
        "VLM_MODEL_CACHE_DIR": "cache/ir",
        "VLM_OV_CONFIG": '{"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}',
        "VLM_API_KEYS": "k1,k2",
    }
    result = source_setup(project, env, after='echo "device=$VLM_DEVICE"')
    assert result.returncode == 0 and "status=0" in result.stdout, result.stderr
    assert "device=HETERO:GPU.1,CPU" in result.stdout
    written = read_env_file(project / ".env")
    assert written["VLM_DEVICE"] == "HETERO:GPU.1,CPU"
    assert written["VLM_PORT"] == "9001"
    assert written["VLM_COMPRESSION_WEIGHT_FORMAT"] == "int8"
    assert written["VLM_OV_CONFIG"] == env["VLM_OV_CONFIG"]
    assert written["VLM_API_KEYS"] == "k1,k2"
    assert (project / "cache" / "ir").is_dir()
    settings = Settings(_env_file=project / ".env")
    assert settings.device == "HETERO:GPU.1,CPU"
    assert settings.ov_config == {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}
    assert settings.api_keys == ["k1", "k2"]
    assert (settings.port, settings.seed) == (9001, 7)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VLM_DEVICE": "GPU-1"}, "VLM_DEVICE='GPU-1'"),
        ({"VLM_DEVICE": "HETERO"}, "VLM_DEVICE='HETERO'"),
        ({"VLM_DEVICE": "FOO:CPU"}, "VLM_DEVICE='FOO:CPU'"),
        ({"VLM_COMPRESSION_WEIGHT_FORMAT": "int3"}, "use int4, int8 or fp16"),
        ({"VLM_PORT": "80a"}, "VLM_PORT='80a'"),
        ({"VLM_PORT": "70000"}, "from 1 to 65535"),
        ({"VLM_SEED": "-3"}, "VLM_SEED='-3'"),
        ({"VLM_SEED": "abc"}, "VLM_SEED='abc'"),
        ({"VLM_MAX_QUEUE": "0"}, "VLM_MAX_QUEUE='0'"),
        ({"VLM_KV_CACHE_SIZE_GB": "lots"}, "VLM_KV_CACHE_SIZE_GB='lots'"),
        ({"VLM_LOG_LEVEL": "loud"}, "VLM_LOG_LEVEL='loud'"),
        ({"VLM_MODEL_NAME": "two words"}, "VLM_MODEL_NAME='two words'"),
        ({"VLM_OV_CONFIG": "{PERFORMANCE_HINT: LATENCY}"}, "must be a JSON object"),
        ({"VLM_API_KEYS": "it's"}, "VLM_API_KEYS: quotes"),
    ],
)
def test_setup_refuses_bad_values_and_the_shell_survives(
    project: Path, env: dict[str, str], message: str
) -> None:
    (project / ".env").write_text("VLM_PORT='1234'\n")
    result = source_setup(
        project,
        env,
        before="set -o pipefail",
        after='echo "port=${VLM_PORT-unset}"; set -o | grep -E "^(errexit|pipefail)"',
    )
    assert result.returncode == 0  # the shell carried on after the failed source
    assert "status=1" in result.stdout and "shell-alive" in result.stdout
    assert message in result.stderr
    assert "nothing was changed" in result.stderr
    assert (project / ".env").read_text() == "VLM_PORT='1234'\n"  # untouched
    assert f"port={env.get('VLM_PORT', 'unset')}" in result.stdout  # nothing exported
    assert re.search(r"errexit\s+off", result.stdout)
    assert re.search(r"pipefail\s+on", result.stdout)


def test_setup_reports_every_bad_value_at_once(project: Path) -> None:
    result = source_setup(project, {"VLM_PORT": "x", "VLM_SEED": "y", "VLM_DEVICE": "?"})
    assert "status=1" in result.stdout
    for name in ("VLM_PORT", "VLM_SEED", "VLM_DEVICE"):
        assert f"{name}=" in result.stderr


def test_setup_takes_service_port_as_the_port(project: Path) -> None:
    result = source_setup(project, {"VLM_SERVICE_PORT": "9300"}, after='echo "port=$VLM_PORT"')
    assert "status=0" in result.stdout, result.stderr
    assert "port=9300" in result.stdout
    written = read_env_file(project / ".env")
    assert written["VLM_PORT"] == written["VLM_SERVICE_PORT"] == "9300"
    assert Settings(_env_file=project / ".env").port == 9300


def test_setup_refuses_disagreeing_port_names(project: Path) -> None:
    result = source_setup(project, {"VLM_SERVICE_PORT": "9300", "VLM_PORT": "9301"})
    assert "status=1" in result.stdout
    assert "VLM_PORT='9301' and VLM_SERVICE_PORT='9300' disagree" in result.stderr


def test_setup_writes_proxies_to_env(project: Path) -> None:
    proxies = {
        "http_proxy": "http://user:secret@proxy.example:3128",
        "HTTPS_PROXY": "http://proxy.example:3128",
        "no_proxy": "localhost,127.0.0.1",
    }
    result = source_setup(project, proxies)
    assert "status=0" in result.stdout, result.stderr
    written = read_env_file(project / ".env")
    for name, value in proxies.items():
        assert written[name] == value
    assert "secret" not in result.stdout  # shown as user:***@
    assert "http://user:***@proxy.example:3128" in result.stdout


def test_setup_run_as_a_script_still_writes_env(project: Path) -> None:
    result = subprocess.run(
        ["bash", "setup.sh"],
        cwd=project,
        env={"PATH": "/usr/bin:/bin", "VLM_PORT": "8111"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert read_env_file(project / ".env")["VLM_PORT"] == "8111"
    bad = subprocess.run(
        ["bash", "setup.sh"],
        cwd=project,
        env={"PATH": "/usr/bin:/bin", "VLM_PORT": "no"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1


# --- compose files ---------------------------------------------------------------


def compose_config(project: Path, name: str) -> dict[str, Any]:
    assert COMPOSE is not None
    result = subprocess.run(
        [COMPOSE, "-f", name, "config"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(project)},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def dockerfile_stages() -> set[str]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I))


@needs_compose
@pytest.mark.parametrize(
    ("name", "target", "device"),
    [("compose.yaml", "serve", "CPU"), ("compose.gpu.yaml", "serve-gpu", "GPU")],
)
def test_compose_file_validates(project: Path, name: str, target: str, device: str) -> None:
    env = {"VLM_PORT": "8123", "https_proxy": "http://proxy.example:3128"}
    assert "status=0" in source_setup(project, env).stdout
    config = compose_config(project, name)
    server, export = config["services"]["server"], config["services"]["export"]
    assert server["build"]["target"] == target
    assert export["build"]["target"] == "export"
    assert {target, "export"} <= dockerfile_stages()
    assert server["command"] == ["python", "app.py"]
    assert export["command"] == ["python", "scripts/export_model.py"]
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert server["environment"]["VLM_DEVICE"] == device
    assert server["environment"]["VLM_MODEL_CACHE_DIR"] == "/models"
    assert server["environment"]["VLM_PORT"] == "8123"  # from .env
    assert server["ports"][0]["published"] == server["ports"][0]["target"] == 8123
    assert "models:/models:rw" in server["volumes"]
    assert "models:/models:rw" in export["volumes"]
    assert "models" in config["volumes"]  # named: exported models outlive containers
    assert server["healthcheck"]["test"] == ["CMD", "python", "docker/healthcheck.py"]
    assert export["environment"]["https_proxy"] == "http://proxy.example:3128"  # downloads
    assert export["image"] == "ov-vlm-server:export"
    if device == "GPU":
        assert "/dev/dri:/dev/dri" in server["devices"]
        assert "video" in server["group_add"]
        assert len(server["group_add"]) == 2  # render group: RENDER_GID or its name


# --- Dockerfile ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


def test_dockerfile_copies_files_that_exist() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    copies = [rest for keyword, rest in dockerfile_instructions() if keyword == "COPY"]
    assert copies
    for rest in copies:
        parts = shlex.split(rest)
        if any(p.startswith("--from=") for p in parts):
            continue
        for source in [p for p in parts if not p.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the project"
            top = source.strip("/").split("/")[0]
            assert top not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_commands_are_the_real_entry_points() -> None:
    instructions = dockerfile_instructions()
    commands = [exec_form(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert ["python", "app.py"] in commands
    assert ["python", "scripts/export_model.py"] in commands
    for command in commands:
        assert command[0] == "python"
        script = ROOT / command[1]
        assert script.is_file(), command
        assert 'if __name__ == "__main__":' in script.read_text(), command
    healthchecks = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks
    for rest in healthchecks:
        command = exec_form(rest[rest.index("CMD") + 3 :].strip())
        assert (ROOT / command[1]).is_file()
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    for script in re.findall(r"\b(scripts/[\w./-]+)", runs):
        assert (ROOT / script).is_file(), script
    assert "scripts/install.sh" in runs  # installs from poetry.lock
    assert "USER vlm" in [f"{k} {r}" for k, r in instructions]


def test_dockerfile_gpu_stage_uses_distribution_drivers() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    gpu = text[text.index("AS gpu-runtime") : text.index("AS serve\n")]
    assert "docker/gpu-runtime.sh" in gpu
    script = (ROOT / "docker" / "gpu-runtime.sh").read_text()
    assert "apt-get install" in script
    for package in ("intel-opencl-icd", "libze1", "libze-intel-gpu1", "ocl-icd-libopencl1"):
        assert package in script
    for source in (text, script):
        assert not re.search(r"\b(wget|curl|ADD)\b", source)  # no ad-hoc downloads


def test_gpu_packages_alone_come_from_debian_testing() -> None:
    """On trixie the drivers come from forky; apt pinning keeps everything else on trixie."""
    script = (ROOT / "docker" / "gpu-runtime.sh").read_text()
    pinned = set(re.search(r'forky_packages="([^"]*)"', script)[1].split())
    drivers = {"intel-opencl-icd", "libze-intel-gpu1", "libze1", "ocl-icd-libopencl1"}
    runtime = {"libigc2", "libigdfcl2", "libigdgmm12"}  # the drivers' own libraries
    c_runtime = {"libc6", "libc-bin", "libc-gconv-modules-extra", "libgcc-s1", "libstdc++6"}
    assert pinned == drivers | runtime | c_runtime | {"gcc-16-base"}
    # the specific record first, then every other forky package never installed
    assert re.search(
        r'"Package: \$\(echo "\$forky_packages".*\n.*"Pin: release n=forky"\n'
        r'.*"Pin-Priority: 500"\n.*\n.*"Package: \*"\n.*"Pin: release n=forky"\n'
        r'.*"Pin-Priority: -1"',
        script,
    )


def test_dockerfile_base_is_a_build_argument() -> None:
    instructions = dockerfile_instructions()
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-trixie") in instructions
    stages = dockerfile_stages()
    for keyword, rest in instructions:
        if keyword == "FROM":
            image = rest.split()[0]
            assert image == "${BASE_IMAGE}" or image in stages, rest


def test_dependency_groups_are_optional() -> None:
    """`poetry sync` without --with installs only the serving dependencies."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["poetry"]["group"]
    assert set(groups) == {"export", "dev"}
    for name, group in groups.items():
        assert group.get("optional") is True, name
    assert (
        "torch"
        not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )


@pytest.mark.parametrize(
    ("groups", "expected"),
    [(None, ["--with", "export,dev"]), ("", []), ("export", ["--with", "export"])],
)
def test_install_passes_exactly_the_named_groups(
    tmp_path: Path, groups: str | None, expected: list[str]
) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "install.sh", tmp_path / "scripts")
    for name in ("pyproject.toml", "poetry.lock"):
        (tmp_path / name).write_text("")
    (tmp_path / ".venv").mkdir()
    fake = tmp_path / ".poetry" / "bin"
    fake.mkdir(parents=True)
    (fake / "poetry").write_text("#!/bin/sh\n")
    (fake / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.args"\n')
    for path in fake.iterdir():
        path.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    if groups is not None:
        env["VLM_INSTALL_GROUPS"] = groups
    result = subprocess.run(
        ["bash", "scripts/install.sh"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    args = (fake / "python.args").read_text().split()
    assert args == ["scripts/poetry_simple.py", "sync", "--no-interaction", *expected]


def test_install_groups_match_images() -> None:
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    installs = [r for r in runs if "scripts/install.sh" in r]
    assert any("VLM_INSTALL_GROUPS= " in r for r in installs)  # serving: no torch
    assert any("VLM_INSTALL_GROUPS=export " in r for r in installs)


# --- docker/healthcheck.py ---------------------------------------------------------


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, str]] = []  # noqa: RUF012

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, **dict(self.headers)})
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[int, type[_ReadyHandler]]]:
    handler = type("Handler", (_ReadyHandler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def run_healthcheck(port: int, **env: str) -> int:
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "healthcheck.py")],
        env={"PATH": "/usr/bin:/bin", "VLM_PORT": str(port), **env},
        capture_output=True,
        timeout=30,
    ).returncode


def test_healthcheck_follows_readiness(ready_server: tuple[int, type[_ReadyHandler]]) -> None:
    port, handler = ready_server
    assert run_healthcheck(port, VLM_API_KEYS="first,second") == 0
    assert handler.seen[-1]["path"] == "/ready"
    assert handler.seen[-1]["Authorization"] == "Bearer first"
    handler.status = 503
    assert run_healthcheck(port) == 1
    assert "Authorization" not in handler.seen[-1]


def test_healthcheck_ignores_proxies(ready_server: tuple[int, type[_ReadyHandler]]) -> None:
    port, _ = ready_server
    proxy = "http://127.0.0.1:9"  # nothing listens there
    assert run_healthcheck(port, http_proxy=proxy, HTTP_PROXY=proxy) == 0


def test_healthcheck_reads_the_port_alias(ready_server: tuple[int, type[_ReadyHandler]]) -> None:
    port, handler = ready_server
    result = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "healthcheck.py")],
        env={"PATH": "/usr/bin:/bin", "VLM_SERVICE_PORT": str(port)},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert handler.seen[-1]["path"] == "/ready"


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(port) == 1
