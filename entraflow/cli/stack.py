"""A whole entraflow on one machine: Redis, the Graph sandbox, real workers and schedulers.

The demo runs on it; so do the integration tests and the benchmarks. Everything it starts, it
stops. Workers and schedulers are real `entraflow worker` and `entraflow scheduler` processes,
and the workers talk to the sandbox over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from pydantic import SecretStr

from entraflow.redis_server import EmbeddedRedis
from entraflow.settings import Settings
from sandbox.directory import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SANDBOX_TENANT_ID
from sandbox.server import SandboxServer

# How long a worker or scheduler may take to finish its current work after SIGTERM.
PROCESS_STOP_TIMEOUT_S = 20.0


def sandbox_environment(sandbox: SandboxServer) -> dict[str, str]:
    """The variables that point an entraflow process at `sandbox` and its app registration."""
    return {
        "ENTRAFLOW_GRAPH_URL": sandbox.graph_url,
        "ENTRAFLOW_AUTHORITY_URL": sandbox.authority_url,
        "ENTRAFLOW_TENANT_ID": SANDBOX_TENANT_ID,
        "ENTRAFLOW_CLIENT_ID": SANDBOX_CLIENT_ID,
        "ENTRAFLOW_CLIENT_SECRET": SANDBOX_CLIENT_SECRET,
        # The sandbox speaks plain HTTP on loopback; never set this for a real authority.
        "OAUTHLIB_INSECURE_TRANSPORT": "1",
    }


@dataclass
class LocalStack:
    """Redis (the configured one or the embedded one), the sandbox, workers and schedulers."""

    home: Path
    redis_url: str | None = None
    database_url: str | None = None
    workers: int = 1
    concurrency: int = 2
    schedulers: int = 0
    # Where the first worker and scheduler serve /metrics; each next one takes the next port.
    worker_metrics_port: int = 0
    scheduler_metrics_port: int = 0
    sandbox: SandboxServer = field(default_factory=SandboxServer)
    worker_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scheduler_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _started_redis: bool = False

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def settings(self) -> Settings:
        """The settings every process of this stack runs with."""
        return Settings(
            home=self.home,
            redis_url=self.redis_url,
            database_url=self.database_url,
            graph_url=self.sandbox.graph_url,
            authority_url=self.sandbox.authority_url,
            tenant_id=SANDBOX_TENANT_ID,
            client_id=SANDBOX_CLIENT_ID,
            client_secret=SecretStr(SANDBOX_CLIENT_SECRET),
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment that points an entraflow process at this stack."""
        env = {"ENTRAFLOW_HOME": str(self.home), **sandbox_environment(self.sandbox)}
        if self.redis_url:
            env["ENTRAFLOW_REDIS_URL"] = self.redis_url
        if self.database_url:
            env["ENTRAFLOW_DATABASE_URL"] = self.database_url
        return env

    @property
    def _embedded_redis(self) -> EmbeddedRedis:
        return EmbeddedRedis(self.home.resolve() / "redis")

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.redis_url, self._started_redis = self._embedded_redis.ensure_running()
        self.sandbox.start()
        for _ in range(self.workers):
            self.start_worker()
        for _ in range(self.schedulers):
            self.start_scheduler()

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Start one more worker process; its log goes to the stack's home."""
        index = len(self.worker_processes)
        process = self._spawn(
            "worker",
            f"--concurrency={self.concurrency}",
            f"--hostname=worker{index}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            f"--logfile={self.home / f'worker-{index}.log'}",
            *_metrics_option(self.worker_metrics_port, index),
        )
        self.worker_processes.append(process)
        return process

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        """Start one more scheduler process; its log goes to the stack's home."""
        index = len(self.scheduler_processes)
        with (self.home / f"scheduler-{index}.log").open("ab") as log:
            process = self._spawn(
                "scheduler",
                f"--consumer=scheduler{index}-{os.getpid()}",
                *_metrics_option(self.scheduler_metrics_port, index),
                output=log,
            )
        self.scheduler_processes.append(process)
        return process

    def _spawn(self, *args: str, output: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "entraflow", *args],
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=output or subprocess.DEVNULL,
            stderr=output or subprocess.DEVNULL,
        )

    def stop(self) -> None:
        processes = [*self.scheduler_processes, *self.worker_processes]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.scheduler_processes.clear()
        self.worker_processes.clear()
        self.sandbox.stop()
        if self._started_redis:
            self._embedded_redis.stop()
            self._started_redis = False


def _metrics_option(first_port: int, index: int) -> list[str]:
    return [f"--metrics-port={first_port + index}"] if first_port else []
