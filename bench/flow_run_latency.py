"""Latency of one four-step flow run, queued to finished, against a plain no-op Celery chain.

Both run in this one process run on the same Redis and machine, each with one worker process of
concurrency 1, one run at a time (sequential latency, not throughput):

    .venv/bin/python -m bench.flow_run_latency [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import chain

from entraflow.cli.stack import LocalStack
from entraflow.settings import get_settings
from models.history import wait_for_run
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from scheduler.flows import load_flows
from scheduler.runs import start_run

RUN_TIMEOUT_S = 60.0
EXAMPLE_FLOWS = Path(__file__).resolve().parent.parent / "entraflow" / "examples" / "flows"
STEPS = load_flows(EXAMPLE_FLOWS / "membership-round-trip.yaml")[0].step_dicts()
WARMUP_RUNS = 3


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def entraflow_latencies_s(stack: LocalStack, runs: int) -> list[float]:
    event = {
        "specversion": "1.0",
        "id": "bench",
        "source": "bench",
        "type": "bench",
        "data": {"upn": DEMO_USERS["nestor"].upn, "group_id": DEMO_GROUPS["sales"].id},
    }
    samples = []
    for index in range(WARMUP_RUNS + runs):
        started = time.perf_counter()
        run_id = start_run(stack.settings, "bench", STEPS, {**event, "id": str(index)})
        run = wait_for_run(
            stack.settings.resolved_database_url, run_id, timeout_s=RUN_TIMEOUT_S, poll_s=0.002
        )
        elapsed_s = time.perf_counter() - started
        assert run["status"] == "succeeded", run
        if index >= WARMUP_RUNS:
            samples.append(elapsed_s)
    return samples


def noop_latencies_s(redis_url: str, runs: int) -> list[float]:
    os.environ["BENCH_REDIS_URL"] = redis_url
    from bench.noop_app import NOOP_QUEUE, noop, noop_app

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.noop_app:noop_app", "worker",
         "--concurrency=1", f"--queues={NOOP_QUEUE}", "--without-gossip", "--without-mingle",
         "--loglevel=WARNING"],
        env={**os.environ, "BENCH_REDIS_URL": redis_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        samples = []
        for index in range(WARMUP_RUNS + runs):
            started = time.perf_counter()
            links = [noop.si(str(index), str(step)) for step in range(len(STEPS))]
            chain(*links).apply_async().get(timeout=RUN_TIMEOUT_S, interval=0.002)
            elapsed_s = time.perf_counter() - started
            if index >= WARMUP_RUNS:
                samples.append(elapsed_s)
        return samples
    finally:
        worker.terminate()
        worker.wait()
        noop_app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        stack = LocalStack(home=Path(home), concurrency=1)
        with stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            ours = entraflow_latencies_s(stack, args.runs)
            assert stack.redis_url is not None
            baseline = noop_latencies_s(stack.redis_url, args.runs)
    print(f"four-step run, queued to finished, {args.runs} runs one at a time:")
    for name, samples in (("entraflow (4 Graph calls)", ours), ("no-op Celery chain", baseline)):
        print(
            f"  {name:<26} p50 {statistics.median(samples) * 1000:7.1f} ms"
            f"   p99 {percentile(samples, 0.99) * 1000:7.1f} ms"
        )
    print(f"  ratio of p50s: {statistics.median(ours) / statistics.median(baseline):.1f}x")


if __name__ == "__main__":
    main()
