"""Run the fault-injection scenarios on a fresh local stack and print what each found.

    .venv/bin/python -m chaos [--short] [--only throttling|ambiguous|poison]

The full form (`make chaos`) asks for 500 runs, 2,000 batch rows and 10,000 events, with faults
active for 60 s; `--short` (`make chaos CHAOS_ARGS=--short`) asks for 30 runs, 100 rows and
300 events with faults for 8 s, and fits in CI's time (`Sizes` in `chaos/scenarios.py`).
Exits 1 when any scenario lost work, did work twice, retried before it was told it could, or saw
a process die.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from chaos.harness import FLOWS_DIR, Harness, Result
from chaos.scenarios import FULL, SCENARIOS, SHORT, bulk_users_needed
from entraflow.cli.stack import LocalStack
from entraflow.settings import get_settings
from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from scheduler.flows import apply_flows

# One worker with two processes and one scheduler: this machine's two cores.
WORKER_CONCURRENCY = 2
SETTINGS_PREFIX = "ENTRAFLOW_"
COLUMNS = ("scenario", "asked", "happened", "lost", "dup", "early", "time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the CI-sized form")
    parser.add_argument("--only", choices=sorted(SCENARIOS), help="run one scenario")
    args = parser.parse_args()
    sizes = SHORT if args.short else FULL
    names = [args.only] if args.only else list(SCENARIOS)
    # The stack is its own: a Redis or database named in this shell must not leak into it.
    for name in [name for name in os.environ if name.startswith(SETTINGS_PREFIX)]:
        del os.environ[name]
    bulk_users = bulk_users_needed(sizes)
    started = time.monotonic()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="entraflow-chaos-") as home:
        sandbox = SandboxServer(SandboxConfig(bulk_users=bulk_users))
        stack = LocalStack(
            home=Path(home), concurrency=WORKER_CONCURRENCY, schedulers=1, sandbox=sandbox
        )
        with stack:
            os.environ.update(stack.env)
            get_settings.cache_clear()
            apply_flows(stack.settings, FLOWS_DIR)
            harness = Harness(stack, bulk_users)
            for name in names:
                for result in SCENARIOS[name](harness, sizes):
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
