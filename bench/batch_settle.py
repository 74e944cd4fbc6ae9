"""What recording a chunk costs as the batch grows: the check after each chunk for rows left.

`record_results` ends a batch once no row is left, so it looks after every chunk (5,000 times in a
100,000-row batch). This bench times that look on batches of several sizes, none of whose rows
has ended yet (the costliest case), side by side in one run:

    .venv/bin/python -m bench.batch_settle [--rows 10000,100000,1000000] [--looks 200]

The time should not grow with the batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from models.batches import ItemAction, NewItem, _settle, add_batch
from models.db import session_scope

GROUP = "00000000-0000-4000-8000-000000000001"


def settle_ms(database_url: str, rows: int, looks: int) -> float:
    """The mean time of one look at a batch of `rows` rows, none ended, in milliseconds."""
    with session_scope(database_url) as session:
        items = (NewItem(n, ItemAction.ADD, f"user{n}@contoso.example", GROUP) for n in range(rows))
        batch_id = add_batch(session, "bench", items)
    started = time.perf_counter()
    for _ in range(looks):
        with session_scope(database_url) as session:
            _settle(session, batch_id)
    return (time.perf_counter() - started) / looks * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--looks", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(size) for size in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="entraflow-bench-") as folder:
        url = f"sqlite:///{Path(folder) / 'history.db'}"
        results = [(rows, settle_ms(url, rows, args.looks)) for rows in sizes]
    smallest_ms = results[0][1]
    print(f"{'rows in the batch':>18}{'ms per look':>13}{'x smallest':>12}")
    for rows, per_look_ms in results:
        print(f"{rows:>18,}{per_look_ms:>13.2f}{per_look_ms / smallest_ms:>12.1f}")


if __name__ == "__main__":
    main()
