"""`entraflow flower` as a real process behind basic auth, for the Flower tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from harness.ports import free_port

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CREDENTIALS = ("operator", "a-long-test-password")


@contextmanager
def running_flower(redis_url: str) -> Iterator[str]:
    """Flower on `redis_url`, on a free loopback port, with `CREDENTIALS`; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "ENTRAFLOW_REDIS_URL": redis_url,
        "FLOWER_BASIC_AUTH": ":".join(CREDENTIALS),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
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
    finally:
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT_S)
