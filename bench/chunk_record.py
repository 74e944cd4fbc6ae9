"""What the database work of one chunk costs as the batch grows: claiming its rows, recording them.

Every chunk claims its rows and records their outcomes, audit entries and whether the batch has
ended (the look for a row left). None of it may cost more in a larger batch: a 1,000,000-row
batch runs 50,000 chunks. This bench times `looks` chunks of 20 adds on batches of several
sizes, none of whose other rows has ended yet (the costliest case for the look), side by side in
one run, on SQLite (or `--database-url`):

    .venv/bin/python -m bench.chunk_record [--rows 10000,100000,1000000] [--looks 200]
                                           [--database-url postgresql://...]

The time per chunk should not grow with the batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from models.batches import (
    ItemAction,
    ItemResult,
    NewItem,
    add_batch,
    claim_chunk,
    pending_chunks,
    record_results,
    split_into_chunks,
)
from models.db import session_scope
from worker.budget import MAX_BATCH_REQUESTS, MAX_MEMBERS_PER_PATCH

GROUP = "00000000-0000-4000-8000-000000000001"


def chunk_ms(database_url: str, rows: int, looks: int) -> tuple[float, float]:
    """The mean wall and CPU time of one chunk's claim and record, in milliseconds."""
    with session_scope(database_url) as session:
        items = (
            NewItem(n, ItemAction.ADD, f"00000000-0000-4000-8000-{n:012d}", GROUP)
            for n in range(1, rows + 1)
        )
        batch_id = add_batch(session, "bench", items)
    split_into_chunks(
        database_url,
        batch_id,
        adds_per_chunk=MAX_MEMBERS_PER_PATCH,
        removals_per_chunk=MAX_BATCH_REQUESTS,
    )
    chunks = pending_chunks(database_url, batch_id)[:looks]
    started, started_cpu = time.perf_counter(), time.process_time()
    for chunk in chunks:
        claimed = claim_chunk(database_url, batch_id, chunk)
        results = [
            ItemResult(item.id, "added", True, 204, None, None, "request-id") for item in claimed
        ]
        record_results(database_url, batch_id, results, client_id="bench", tenant_id="bench")
    wall_ms = (time.perf_counter() - started) / len(chunks) * 1000
    cpu_ms = (time.process_time() - started_cpu) / len(chunks) * 1000
    return wall_ms, cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--looks", type=int, default=200)
    parser.add_argument("--database-url", default=None, help="[default: SQLite in a temp folder]")
    args = parser.parse_args()
    sizes = [int(size) for size in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="entraflow-bench-") as folder:
        os.environ["ENTRAFLOW_HOME"] = folder
        url = args.database_url or f"sqlite:///{Path(folder) / 'history.db'}"
        results = [(rows, *chunk_ms(url, rows, args.looks)) for rows in sizes]
    smallest_ms = results[0][1]
    print(f"{'rows in the batch':>18}{'ms per chunk':>14}{'CPU ms':>8}{'x smallest':>12}")
    for rows, wall_ms, cpu_ms in results:
        print(f"{rows:>18,}{wall_ms:>14.2f}{cpu_ms:>8.2f}{wall_ms / smallest_ms:>12.1f}")


if __name__ == "__main__":
    main()
