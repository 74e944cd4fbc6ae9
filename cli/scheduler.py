"""`entraflow scheduler`: the process that turns events on the stream into flow runs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

import click
import redis

from entraflow import metrics
from entraflow.redis_server import redis_url
from entraflow.settings import get_settings
from models.db import database_reachable
from scheduler.intake import Scheduler


@click.command()
@click.option(
    "--consumer",
    default=lambda: f"{socket.gethostname()}-{os.getpid()}",
    show_default="hostname-pid",
    help="This scheduler's name in the consumer group.",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve /metrics and /healthz on this port [default: ENTRAFLOW_SCHEDULER_METRICS_PORT; "
    "0: not at all].",
)
def scheduler(consumer: str, loglevel: str, metrics_port: int | None) -> None:
    """Read events from Redis and queue the flow runs they trigger, until SIGTERM or SIGINT."""
    logging.getLogger().setLevel(loglevel.upper())
    settings = get_settings()
    client = redis.Redis.from_url(redis_url(settings))
    port = settings.scheduler_metrics_port if metrics_port is None else metrics_port
    database_url = settings.resolved_database_url
    probes = {"database": lambda: database_reachable(database_url)}
    server = metrics.serve(settings.metrics_host, port, client, probes) if port else None
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        # Finish the entry at hand, then leave: its acknowledgement must not be cut off.
        logging.getLogger(__name__).info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        Scheduler(settings, client, consumer).run_forever(stop)
    finally:
        if server is not None:
            server.stop()
        client.close()
