"""Run the fault-injection scenarios on a fresh local stack and print what each found.

    .venv/bin/python -m chaos [--short] [--only NAME]

Every module under `chaos/` that lists `SCENARIOS` takes part; they run in the order of their
numbers in issue 7. `--short` (`make chaos CHAOS_ARGS=--short`, what `.ci/run` runs) asks for
less work and shorter faults (`Sizes` in `chaos/harness.py`, and each module's own sizes).
Exits 1 when any scenario lost work, did work twice, retried before it was told it could, or saw
a process die.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

import chaos
from chaos.harness import FLOWS_DIR, FULL, SHORT, Harness, Result, Scenario
from entraflow.settings import get_settings
from harness.stack import LocalStack
from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from scheduler.flows import apply_flows

# One worker as `entraflow worker` runs by default (a pool of threads) and one scheduler.
SETTINGS_PREFIX = "ENTRAFLOW_"
# The stack's own settings. A killed worker's messages come back after the visibility timeout,
# so it is shorter than the default 300 s; one delivery's HTTP timeout and in-process waits are
# shortened with it, so a live delivery (8 attempts at most) always ends within it.
CHAOS_SETTINGS = {
    "ENTRAFLOW_VISIBILITY_TIMEOUT_S": "60",
    "ENTRAFLOW_HTTP_TIMEOUT_S": "5",
    "ENTRAFLOW_MAX_INPROCESS_WAIT_S": "2",
}
COLUMNS = ("scenario", "asked", "happened", "lost", "dup", "early", "time")


def all_scenarios() -> list[Scenario]:
    """The `SCENARIOS` of every module of the package, in issue 7's order."""
    found: list[Scenario] = []
    for module_info in pkgutil.iter_modules(chaos.__path__):
        module = importlib.import_module(f"chaos.{module_info.name}")
        found.extend(getattr(module, "SCENARIOS", []))
    return sorted(found, key=lambda scenario: scenario.number)


def main() -> int:
    scenarios = all_scenarios()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the CI-sized form")
    parser.add_argument(
        "--only", choices=[s.name for s in scenarios], action="append", help="run only these"
    )
    args = parser.parse_args()
    sizes = SHORT if args.short else FULL
    chosen = [s for s in scenarios if not args.only or s.name in args.only]
    # The stack is its own: a Redis or database named in this shell must not leak into it.
    for name in [name for name in os.environ if name.startswith(SETTINGS_PREFIX)]:
        del os.environ[name]
    os.environ.update(CHAOS_SETTINGS)
    bulk_users = max(1, sum(scenario.users_needed(sizes) for scenario in chosen))
    started = time.monotonic()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="entraflow-chaos-") as home:
        sandbox = SandboxServer(SandboxConfig(bulk_users=bulk_users))
        stack = LocalStack(home=Path(home), schedulers=1, sandbox=sandbox)
        with stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            apply_flows(stack.settings, FLOWS_DIR)
            harness = Harness(stack, bulk_users)
            for scenario in chosen:
                print(f"scenario {scenario.number}: {scenario.name}", flush=True)
                for result in scenario.run(harness, sizes):
                    results.append(result)
                    print(f"  {result.scenario}: {'ok' if result.ok else 'FAILED'}", flush=True)
    print_table(results)
    form = "short" if args.short else "full"
    print(f"{form} form, {time.monotonic() - started:.0f}s in all")
    return 0 if all(result.ok for result in results) else 1


def print_table(results: list[Result]) -> None:
    rows = [
        (
            r.scenario,
            r.asked,
            r.happened,
            str(r.lost),
            str(r.duplicated),
            str(r.early_retries),
            f"{r.elapsed_s:.1f}s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for row in [COLUMNS, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main())
