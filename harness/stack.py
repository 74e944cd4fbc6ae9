"""A whole entraflow on one machine: Redis, the Graph sandbox, real workers and schedulers.

The demo runs on it; so do the integration tests, the benchmarks and the fault-injection suite.
Everything it starts, it stops. Workers and schedulers are real `entraflow worker` and
`entraflow scheduler` processes, and the workers talk to the sandbox over HTTP. Each starts in a
process group of its own, so a worker and its pool processes can be killed at once, as a
container dies, and started again in its place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from pydantic import SecretStr

from entraflow import process_info
from entraflow.home import private_home
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
    }


@dataclass
class LocalStack:
    """Redis (the configured one or the embedded one), the sandbox, workers and schedulers."""

    home: Path
    redis_url: str | None = None
    database_url: str | None = None
    workers: int = 1
    # The workers' pool and its size; None: `entraflow worker`'s defaults (threads, 32).
    pool: str | None = None
    concurrency: int | None = None
    schedulers: int = 0
    # Where the first worker and scheduler serve /metrics; each next one takes the next port.
    worker_metrics_port: int = 0
    scheduler_metrics_port: int = 0
    sandbox: SandboxServer = field(default_factory=SandboxServer)
    worker_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scheduler_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _started_redis: bool = False
    # The extra environment each scheduler was started with, by index, so a restart keeps it.
    _scheduler_env: dict[int, dict[str, str]] = field(default_factory=dict)

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
        return EmbeddedRedis.for_settings(Settings(home=self.home))

    def start(self) -> None:
        private_home(self.home)
        if not self.redis_url:
            self.redis_url, self._started_redis = self._embedded_redis.ensure_running()
        self.sandbox.start()
        for _ in range(self.workers):
            self.start_worker()
        for _ in range(self.schedulers):
            self.start_scheduler()

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Start one more worker process; its log goes to the stack's home."""
        process = self._spawn_worker(len(self.worker_processes))
        self.worker_processes.append(process)
        return process

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker `index` and its pool processes at once, as a dying container would."""
        _kill_group(self.worker_processes[index])

    def restart_worker(self, index: int) -> subprocess.Popen[bytes]:
        """Start worker `index` again in its place, under the same name and log, once it is dead."""
        if self.worker_processes[index].poll() is None:
            raise RuntimeError(f"worker {index} is still running")
        process = self._spawn_worker(index)
        self.worker_processes[index] = process
        return process

    def worker_children(self, index: int) -> list[int]:
        """The pids of worker `index`'s pool processes (none in a threads pool)."""
        return process_info.children(self.worker_processes[index].pid)

    def kill_worker_child(self, index: int, pid: int) -> None:
        """SIGKILL one pool process of worker `index`; the worker lives on and forks another."""
        if pid not in self.worker_children(index):
            raise ValueError(f"{pid} is not a pool process of worker {index}")
        os.kill(pid, signal.SIGKILL)

    def _spawn_worker(self, index: int) -> subprocess.Popen[bytes]:
        return self._spawn(
            "worker",
            *([f"--pool={self.pool}"] if self.pool else []),
            *([f"--concurrency={self.concurrency}"] if self.concurrency else []),
            f"--hostname=worker{index}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            f"--logfile={self.home / f'worker-{index}.log'}",
            *_metrics_option(self.worker_metrics_port, index),
        )

    def start_scheduler(self, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more scheduler process, with `env` added to its environment."""
        index = len(self.scheduler_processes)
        self._scheduler_env[index] = dict(env or {})
        process = self._spawn_scheduler(index)
        self.scheduler_processes.append(process)
        return process

    def kill_scheduler(self, index: int) -> None:
        """SIGKILL scheduler `index`: whatever it read and did not acknowledge stays pending."""
        _kill_group(self.scheduler_processes[index])

    def restart_scheduler(self, index: int) -> subprocess.Popen[bytes]:
        """Start scheduler `index` again in its place, as the same consumer, once it is dead.

        The same consumer name reads its own pending entries first, as a restarted container does.
        """
        if self.scheduler_processes[index].poll() is None:
            raise RuntimeError(f"scheduler {index} is still running")
        process = self._spawn_scheduler(index)
        self.scheduler_processes[index] = process
        return process

    def stop_scheduler(self, index: int) -> None:
        """Stop scheduler `index` (SIGTERM, or SIGKILL if it hangs) and forget it.

        Only the last one may go, so every other keeps its index, its name and its log.
        """
        if index != len(self.scheduler_processes) - 1:
            raise ValueError("only the last scheduler started can be stopped alone")
        _stop([self.scheduler_processes[index]])
        self.scheduler_processes.pop()
        self._scheduler_env.pop(index, None)

    def scheduler_consumer(self, index: int) -> str:
        """Scheduler `index`'s name in the consumer group."""
        return f"scheduler{index}-{os.getpid()}"

    def _spawn_scheduler(self, index: int) -> subprocess.Popen[bytes]:
        with (self.home / f"scheduler-{index}.log").open("ab") as log:
            return self._spawn(
                "scheduler",
                f"--consumer={self.scheduler_consumer(index)}",
                *_metrics_option(self.scheduler_metrics_port, index),
                output=log,
                env=self._scheduler_env.get(index),
            )

    def _spawn(
        self, *args: str, output: IO[bytes] | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env={**os.environ, **self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=output or subprocess.DEVNULL,
            stderr=output or subprocess.DEVNULL,
            # Its own process group: a kill reaches the pool processes too, and a Ctrl-C in the
            # terminal reaches only this stack's owner, which stops everything in order.
            start_new_session=True,
        )

    def stop(self) -> None:
        _stop([*self.scheduler_processes, *self.worker_processes])
        self.scheduler_processes.clear()
        self._scheduler_env.clear()
        self.worker_processes.clear()
        self.sandbox.stop()
        if self._started_redis:
            self._embedded_redis.stop()
            self._started_redis = False


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, then wait; SIGKILL the group of one that does not stop in time."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and, if it leads its own group, every process of that group; reap it."""
    # Only while it is not yet reaped: until then its pid, and so its group id, cannot be reused.
    if process.returncode is None:
        with suppress(ProcessLookupError):
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            else:  # started by someone else, in the caller's group
                process.kill()
    process.wait()


def _metrics_option(first_port: int, index: int) -> list[str]:
    return [f"--metrics-port={first_port + index}"] if first_port else []
