"""A screenshot of Flower showing entraflow's tasks, taken in headless Chromium.

Starts the whole system on embedded defaults (Redis, the Graph sandbox, a worker, a scheduler),
applies the example flows, pushes the example events, submits a small batch, starts
`entraflow flower` behind basic auth, and once Flower has seen every task end, saves its Tasks
page as a PNG. Needs a `chromium` binary (Debian: `apt-get install chromium`).

    .venv/bin/python -m bench.flower_screenshot [--out docs/images/flower-tasks.png]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests

from entraflow.settings import get_settings
from harness.ports import free_port
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.batch_reports import batch_view
from models.batches import ItemAction, NewItem
from models.history import wait_for_event_runs
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from scheduler.batches import submit_batch
from scheduler.flows import apply_flows
from scheduler.producer import publish_raw

EXAMPLES = Path(__file__).resolve().parent.parent / "entraflow" / "examples"
DEFAULT_OUT = Path("docs/images/flower-tasks.png")
WINDOW_SIZE = "1400,900"
# Upper bound on every wait: runs to end, Flower to start and to see the last event.
WAIT_S = 120.0
# Time the Tasks page's scripts get to fetch and draw the table before the screenshot.
PAGE_SCRIPT_BUDGET_MS = 5000
CHROMIUM_TIMEOUT_S = 60.0
FLOWER_USER = "operator"
BATCH_USERS = ("adele", "nestor", "megan", "lee")
BATCH_GROUP = DEMO_GROUPS["falcon"].id
# The states a task ends in, as Flower shows them (PROGRESS: a batch chunk's custom state).
ENDED_STATES = {"SUCCESS", "FAILURE", "PROGRESS"}


def start_flower(redis_url: str, port: int, password: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ENTRAFLOW_REDIS_URL": redis_url,
        "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{password}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_examples(stack: LocalStack) -> None:
    """The example flows fed by the example events, and a batch of a few adds; until all end."""
    settings = get_settings()
    apply_flows(settings, EXAMPLES / "flows")
    client = redis.Redis.from_url(stack.redis_url or "")
    events = []
    for path in sorted((EXAMPLES / "events").glob("*.json")):
        event = json.loads(path.read_text())
        event["id"] = f"{event['id']}-{time.time_ns()}"  # fresh: a rerun is no duplicate
        publish_raw(client, json.dumps(event))
        events.append(event)
    items = [
        NewItem(line, ItemAction.ADD, DEMO_USERS[name].id, BATCH_GROUP)
        for line, name in enumerate(BATCH_USERS, start=2)
    ]
    batch_id = submit_batch(settings, "screenshot.csv", items)
    database_url = settings.resolved_database_url
    for event in events:
        wait_for_event_runs(database_url, event["source"], event["id"], timeout_s=WAIT_S)
    wait_until(
        lambda: (batch_view(database_url, batch_id) or {}).get("status") == "succeeded",
        f"batch {batch_id} to end",
        timeout_s=WAIT_S,
    )


def screenshot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={PAGE_SCRIPT_BUDGET_MS}",
                f"--screenshot={out.resolve()}",
                f"--window-size={WINDOW_SIZE}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=CHROMIUM_TIMEOUT_S,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="entraflow-flower-") as home,
        LocalStack(home=Path(home), schedulers=1) as stack,
    ):
        # This process applies flows and submits the batch: the same Redis and database.
        os.environ.update(stack.env)
        get_settings.cache_clear()
        port, password = free_port(), secrets.token_hex(16)
        flower = start_flower(stack.redis_url or "", port, password)
        try:
            base = f"http://127.0.0.1:{port}"
            auth = (FLOWER_USER, password)
            wait_until(lambda: _answers(f"{base}/healthcheck"), "flower to start", timeout_s=WAIT_S)
            run_examples(stack)

            def all_ended() -> bool:
                tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
                return bool(tasks) and all(t["state"] in ENDED_STATES for t in tasks.values())

            wait_until(all_ended, "flower to see every task end", timeout_s=WAIT_S)
            screenshot(f"http://{FLOWER_USER}:{password}@127.0.0.1:{port}/tasks", args.out)
        finally:
            flower.terminate()
            flower.wait()
    print(f"saved {args.out}")


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True


if __name__ == "__main__":
    main()
