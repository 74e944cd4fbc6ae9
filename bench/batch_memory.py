"""Peak memory of a real `entraflow batch submit` of a large generated file, and of its split.

In one run: writes a CSV (and, with `--jsonl`, a JSON lines file) of `--rows` distinct membership
changes, submits each through the command line in its own process against a Redis and a SQLite
database of the run's own, and prints each submit's peak resident set size and time. Nothing
needs a worker: a submit stores the rows and queues one start message. With `--split`, the
worker's split of each submitted batch into chunks (what `entra.batch.start` does first) runs
too, in a process of its own, and its peak and time are printed the same way.

    .venv/bin/python -m bench.batch_memory [--rows 1000000] [--jsonl] [--split]

`ENTRAFLOW_BATCH_MAX_ROWS` is raised to the row count, so the cap never stops the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from entraflow.redis_server import EmbeddedRedis

DEFAULT_ROWS = 1_000_000
# Users spread over this many groups, so that every (user, group) pair is distinct.
GROUPS = 10
# The bound for a million rows, in MiB.
BOUND_MIB = 300
BYTES_PER_KIB = 1024


@dataclass(frozen=True)
class Submit:
    """One measured `batch submit`."""

    path: Path
    exit_code: int
    peak_rss_mib: float
    seconds: float
    total: int | None
    batch_id: str | None


@dataclass(frozen=True)
class Split:
    """One measured split of a stored batch into chunks, as a worker starts it."""

    exit_code: int
    peak_rss_mib: float
    seconds: float
    chunks: int | None


def membership_rows(count: int) -> Iterator[tuple[str, str, str]]:
    """`count` distinct (action, user_id, group_id) rows."""
    groups = [str(uuid.UUID(int=(0xC0FFEE << 64) + n)) for n in range(GROUPS)]
    for n in range(count):
        user = str(uuid.UUID(int=(0xBEEF << 96) + n // GROUPS))
        yield ("add" if n % 3 else "remove", user, groups[n % GROUPS])


def write_csv(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        out.write("action,user_id,group_id\n")
        for row in membership_rows(count):
            out.write(",".join(row) + "\n")
    return path


def write_jsonl(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for action, user_id, group_id in membership_rows(count):
            record = {"action": action, "user_id": user_id, "group_id": group_id}
            out.write(json.dumps(record) + "\n")
    return path


def submit(path: Path, env: dict[str, str]) -> Submit:
    """Run `entraflow batch submit PATH --json` and measure that process alone."""
    output = path.with_suffix(".out")
    started = time.perf_counter()
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "batch", "submit", str(path), "--json"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        # wait4 gives this child's own peak, where RUSAGE_CHILDREN would mix in earlier ones.
        _, status, rusage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = exit_code = os.waitstatus_to_exitcode(status)
    text = output.read_text()
    total = batch_id = None
    if exit_code == 0:
        stored = json.loads(text)
        total, batch_id = stored["total"], stored["id"]
    else:
        sys.stderr.write(text)
    peak_rss_mib = rusage.ru_maxrss / BYTES_PER_KIB  # ru_maxrss is in KiB on Linux
    return Submit(path, exit_code, peak_rss_mib, seconds, total, batch_id)


def split(batch_id: str, env: dict[str, str]) -> Split:
    """Split a stored batch in a process of its own (this module's `--split-only`), measured."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.batch_memory", "--split-only", batch_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    text = process.stdout.read().decode()
    _, status, rusage = os.wait4(process.pid, 0)
    process.returncode = exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        sys.stderr.write(text)
        return Split(exit_code, rusage.ru_maxrss / BYTES_PER_KIB, 0.0, None)
    measured = json.loads(text)
    return Split(
        exit_code, rusage.ru_maxrss / BYTES_PER_KIB, measured["seconds"], measured["chunks"]
    )


def split_only(batch_id: str) -> None:
    """Split a stored batch as a worker's start task does, and print its chunks and time."""
    # Imported here: the measuring parent never loads the worker, so its memory stays apart.
    from entraflow.settings import get_settings
    from models.batches import get_batch
    from worker.batch_tasks import split_batch

    settings = get_settings()
    started = time.perf_counter()
    split_batch(settings, batch_id)
    seconds = time.perf_counter() - started
    batch = get_batch(settings.resolved_database_url, batch_id)
    print(json.dumps({"seconds": seconds, "chunks": None if batch is None else batch.chunks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--jsonl", action="store_true", help="Measure a JSON lines file too.")
    parser.add_argument(
        "--split", action="store_true", help="Measure the worker's split of each batch too."
    )
    # The child that `--split` measures: not for people.
    parser.add_argument("--split-only", metavar="BATCH_ID", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.split_only:
        split_only(options.split_only)
        return
    with tempfile.TemporaryDirectory(prefix="entraflow-batch-memory-") as scratch:
        root = Path(scratch)
        redis_server = EmbeddedRedis(root / "redis")
        url, _ = redis_server.ensure_running()
        try:
            env = {
                **os.environ,
                "ENTRAFLOW_HOME": str(root / "home"),
                "ENTRAFLOW_REDIS_URL": url,
                "ENTRAFLOW_DATABASE_URL": f"sqlite:///{root / 'entraflow.db'}",
                "ENTRAFLOW_BATCH_MAX_ROWS": str(options.rows),
            }
            files = [write_csv(root / "rows.csv", options.rows)]
            if options.jsonl:
                files.append(write_jsonl(root / "rows.jsonl", options.rows))
            for path in files:
                size_mib = path.stat().st_size / BYTES_PER_KIB / BYTES_PER_KIB
                result = submit(path, env)
                print(
                    f"{path.name}: {options.rows} rows, {size_mib:.0f} MiB file, "
                    f"exit {result.exit_code}, stored {result.total}, "
                    f"peak RSS {result.peak_rss_mib:.0f} MiB "
                    f"(bound {BOUND_MIB} MiB), {result.seconds:.1f} s"
                )
                if options.split and result.batch_id is not None:
                    measured = split(result.batch_id, env)
                    print(
                        f"{path.name} split: exit {measured.exit_code}, "
                        f"{measured.chunks} chunks, peak RSS {measured.peak_rss_mib:.0f} MiB "
                        f"(bound {BOUND_MIB} MiB), {measured.seconds:.1f} s"
                    )
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
