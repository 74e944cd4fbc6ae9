"""`entraflow flower` starts Flower on this deployment's broker, behind basic auth."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

pytestmark = pytest.mark.integration

STARTUP_TIMEOUT_S = 30.0
CREDENTIALS = ("operator", "a-long-test-password")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def flower_url(redis_url: str, tmp_path: object) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "ENTRAFLOW_REDIS_URL": redis_url,
        "FLOWER_BASIC_AUTH": ":".join(CREDENTIALS),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "entraflow", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            requests.get(f"{url}/healthcheck", timeout=1)
            break
        except requests.ConnectionError:
            assert process.poll() is None, "flower exited"
            assert time.monotonic() < deadline, "flower did not start"
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_flower_answers_only_with_the_configured_credentials(flower_url: str) -> None:
    assert requests.get(f"{flower_url}/api/workers", timeout=10).status_code == 401
    answer = requests.get(f"{flower_url}/api/workers", auth=CREDENTIALS, timeout=10)
    assert answer.status_code == 200
    assert isinstance(answer.json(), dict)
