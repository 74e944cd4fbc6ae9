"""The CPU time one flow step costs the worker, by action, measured in the thread that runs it.

Runs of the four-step `membership-round-trip` flow are stored as the scheduler stores them,
then each step is executed in turn by `worker.steps.execute_step` in this thread, exactly as a
worker's task body does: the step lock, the claim, the templates, the Graph request through the
shared budget and the group's write slots, the record and the audit. The Graph sandbox answers
over HTTP from threads of this process, and Redis is a process of its own, so neither is
counted: `time.thread_time()` around each step is what the step costs the worker's CPU.

    .venv/bin/python -m bench.step_cost [--runs 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sqlmodel import col, select

from entraflow.settings import get_settings
from harness.stack import LocalStack
from models.db import session_scope
from models.runs import StepRun
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, bulk_user_upn
from sandbox.server import SandboxServer
from scheduler.flows import load_flows
from scheduler.producer import build_event
from scheduler.runs import add_run
from worker.steps import execute_step
from worker.tasks import lock_client, perform

FLOW_FILE = (
    Path(__file__).resolve().parent.parent / "entraflow/examples/flows/membership-round-trip.yaml"
)
# Runs first executed and not measured: connections opened, templates compiled, token fetched.
WARM_UP_RUNS = 20


def store_runs(count: int, first_user: int) -> list[list[tuple[str, str, str]]]:
    """`count` runs of the flow, stored; each as its (run id, step id, action) in order."""
    (flow,) = load_flows(FLOW_FILE)
    steps = [step.model_dump(by_alias=True, exclude_none=True) for step in flow.steps]
    database_url = get_settings().resolved_database_url
    run_ids = []
    with session_scope(database_url) as session:
        for n in range(first_user, first_user + count):
            upn = bulk_user_upn(n)
            event = build_event(
                type=flow.trigger.type,
                source="bench",
                id=upn,
                data={"upn": upn, "group_id": DEMO_GROUPS["falcon"].id},
            )
            run_ids.append(add_run(session, flow.name, steps, event))
    with session_scope(database_url) as session:
        rows = session.exec(
            select(StepRun.run_id, StepRun.step_id, StepRun.action)
            .where(col(StepRun.run_id).in_(run_ids))
            .order_by(col(StepRun.position))
        ).all()
    by_run: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for run_id, step_id, action in rows:
        by_run[run_id].append((run_id, step_id, action))
    return [by_run[run_id] for run_id in run_ids]


def execute(runs: list[list[tuple[str, str, str]]]) -> dict[str, list[tuple[float, float]]]:
    """Execute every step of `runs` in order; (CPU s, wall s) per step, by action."""
    settings = get_settings()
    costs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for steps in runs:
        for run_id, step_id, action in steps:
            cpu_started, wall_started = time.thread_time(), time.perf_counter()
            status = execute_step(settings, lock_client(), run_id, step_id, action, perform)
            cpu_s, wall_s = time.thread_time() - cpu_started, time.perf_counter() - wall_started
            if status != "succeeded":
                raise RuntimeError(f"run {run_id}, step {step_id} ended {status}")
            costs[action].append((cpu_s, wall_s))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    users = WARM_UP_RUNS + args.runs
    with tempfile.TemporaryDirectory(prefix="entraflow-bench-") as home:
        sandbox = SandboxServer(SandboxConfig(bulk_users=users))
        with LocalStack(home=Path(home), workers=0, sandbox=sandbox) as stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            execute(store_runs(WARM_UP_RUNS, 1))
            costs = execute(store_runs(args.runs, WARM_UP_RUNS + 1))
    print(f"{args.runs} runs of {FLOW_FILE.stem}, each step executed in this thread")
    print(f"{'action':<28}{'steps':>7}{'CPU ms p50':>12}{'CPU ms mean':>13}{'wall ms p50':>13}")
    every = [cost for action_costs in costs.values() for cost in action_costs]
    for action, action_costs in [*costs.items(), ("every step", every)]:
        cpu_ms = [cpu_s * 1000 for cpu_s, _ in action_costs]
        wall_ms = [wall_s * 1000 for _, wall_s in action_costs]
        print(
            f"{action:<28}{len(action_costs):>7}{statistics.median(cpu_ms):>12.2f}"
            f"{statistics.fmean(cpu_ms):>13.2f}{statistics.median(wall_ms):>13.2f}"
        )


if __name__ == "__main__":
    main()
