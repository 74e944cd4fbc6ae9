"""`entraflow worker`, `entraflow sandbox` and `entraflow flower`: the long-running processes."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
import redis
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_shutdown

from entraflow import keys, logs, metrics
from entraflow.celery_app import app
from entraflow.redis_server import redis_url
from entraflow.settings import Settings, get_settings, is_loopback_host
from models.db import database_reachable
from worker.budget import RU_BUDGET, WRITES_BUDGET, Budget
from worker.tokens import connection_identity

# The worker's pools: threads keep many Graph requests in flight on few CPUs (a Graph request
# is mostly waiting); prefork runs one task per process, each process its own CPU and memory.
THREADS_POOL = "threads"
PREFORK_POOL = "prefork"
WORKER_POOLS = (THREADS_POOL, PREFORK_POOL)
# The threads pool's default size: requests in flight per worker process. At Graph's 100-500 ms
# this covers the default write budget (20 writes/s) with room for flows' reads.
DEFAULT_WORKER_THREADS = 32
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}
# Under ENTRAFLOW_HOME: the files a worker's processes keep their metrics in.
METRICS_DIR = "metrics"
# Where Flower listens when nobody has to sign in to it: its pages show every task's arguments
# and errors, which name users, so without authentication only this machine may see them. Also
# the sandbox's address in the variables `entraflow sandbox` prints: entraflow speaks plain
# http to loopback only.
LOOPBACK_ADDRESS = "127.0.0.1"
# Listening on these is listening on every interface, loopback included.
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})


@click.command(context_settings=PASS_THROUGH)
@click.option(
    "--pool",
    "-P",
    type=click.Choice(WORKER_POOLS),
    default=THREADS_POOL,
    show_default=True,
    help="threads: many Graph requests in flight in one process; prefork: one per process.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help=f"Tasks at once: threads [default: {DEFAULT_WORKER_THREADS}], or processes "
    "[default: CPUs].",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--queues",
    "-Q",
    default=f"{keys.FLOWS_QUEUE},{keys.BULK_QUEUE}",
    show_default=True,
    help="Queues to consume: flow steps, bulk batches, or both.",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve /metrics and /healthz on this port [default: ENTRAFLOW_WORKER_METRICS_PORT; "
    "0: not at all].",
)
@click.pass_context
def worker(
    ctx: click.Context,
    pool: str,
    concurrency: int | None,
    loglevel: str,
    queues: str,
    metrics_port: int | None,
) -> None:
    """Run a Celery worker for flow steps and batches; other options go to `celery worker`."""
    settings = get_settings()
    _format_celery_logs(settings)
    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    if port:
        _serve_worker_metrics(settings, port)
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={queues}", f"--pool={pool}"]
    if concurrency is None and pool == THREADS_POOL:
        concurrency = DEFAULT_WORKER_THREADS
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main([*argv, *ctx.args])


def _format_celery_logs(settings: Settings) -> None:
    """Have Celery's log handlers, which it sets up itself, write in the configured format."""

    def format_handlers(logger: logging.Logger, **_: Any) -> None:
        logs.format_handlers(logger, settings.log_format)

    # Held strongly: the handler is a closure nothing else refers to.
    after_setup_logger.connect(format_handlers, weak=False)
    after_setup_task_logger.connect(format_handlers, weak=False)


def _serve_worker_metrics(settings: Settings, port: int) -> None:
    """Serve the metrics of every process of this worker, from its parent, on `port`."""
    # One directory per port: two workers of one host share a home but never a port.
    metrics.enable_multiprocess((settings.home / METRICS_DIR / f"worker-{port}").resolve())

    def child_exited(pid: int, **_: Any) -> None:
        metrics.process_exited(pid)

    worker_process_shutdown.connect(child_exited, weak=False)
    client = redis.Redis.from_url(redis_url(settings))
    metrics.serve(
        settings.metrics_host,
        port,
        client,
        {"database": lambda: database_reachable(settings.resolved_database_url)},
        budget=lambda: _budget_usage(settings, client),
    )


def _budget_usage(settings: Settings, client: redis.Redis) -> dict[str, tuple[int, int]]:
    app_id, tenant_id = connection_identity(settings)
    budget = Budget.from_settings(client, settings, app_id=app_id, tenant_id=tenant_id)
    used = budget.usage()
    return {
        RU_BUDGET: (used.ru, budget.ru_per_window),
        WRITES_BUDGET: (used.writes, budget.writes_per_window),
    }


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="The median time Graph takes to answer a request (real Graph: about 100-300).",
)
@click.option(
    "--latency-p99-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    help="The 99th percentile of that time, at least the median; unset, every answer takes it.",
)
def sandbox(host: str, port: int, latency_ms: float, latency_p99_ms: float) -> None:
    """Serve the Graph sandbox: a local stand-in for Microsoft Graph and its token endpoint."""
    from harness.stack import sandbox_environment
    from sandbox.config import SandboxConfig
    from sandbox.server import SandboxServer

    try:
        config = SandboxConfig(latency_s=latency_ms / 1000, latency_p99_s=latency_p99_ms / 1000)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--latency-p99-ms") from exc
    server = SandboxServer(config, host=host, port=port)
    # Never bound: it only names the sandbox by the loopback address it also listens on.
    named = server
    if host in WILDCARD_ADDRESSES:
        named = SandboxServer(host=LOOPBACK_ADDRESS, port=port)
    click.echo(f"Graph sandbox on {server.url}; point entraflow at it with:")
    for name, value in sandbox_environment(named).items():
        click.echo(f"  export {name}={value}")
    if named is server and not is_loopback_host(host):
        click.secho(
            f"Warning: entraflow refuses plain http to {host}, which is not loopback; only a "
            "process that reaches this sandbox on 127.0.0.1 or ::1 can use it.",
            fg="yellow",
        )
    server.serve_forever()


@click.command(context_settings=PASS_THROUGH)
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Run Flower on this deployment's broker; Flower's own options pass through."""
    address, unix_socket, authenticated = flower_options(ctx.args)
    app.start(["flower", *ctx.args, *flower_address_arguments(address, unix_socket, authenticated)])


def flower_address_arguments(address: str, unix_socket: str, authenticated: bool) -> list[str]:
    """What to add to Flower's arguments so that, without authentication, it stays on loopback.

    `address` is Flower's `--address` ('' is every interface); a Unix socket is this machine's.
    """
    if authenticated or unix_socket:
        return []
    if not address:
        return [f"--address={LOOPBACK_ADDRESS}"]
    if is_loopback_host(address):
        return []
    raise click.ClickException(
        f"Flower without authentication would listen on {address}, where anyone who reaches it "
        "sees every task with its arguments and errors (which name users): refused. Set "
        "FLOWER_BASIC_AUTH=user:password (or pass --basic-auth=user:password, or --auth with "
        "Flower's OAuth2 login), or listen on this machine only: "
        f"--address={LOOPBACK_ADDRESS}"
    )


def flower_options(args: list[str]) -> tuple[str, str, bool]:
    """Flower's address, Unix socket and whether it authenticates, read as Flower reads them.

    Flower takes its options from FLOWER_* variables, its config file and `args`; its own
    reader sees all three, so what is judged here is what Flower will do.
    """
    from flower.command import apply_env_options, apply_options
    from tornado.options import Error, options

    try:
        apply_env_options()
        apply_options(sys.argv[0], args)
    except (Error, ValueError) as exc:
        raise click.UsageError(f"flower: {exc}") from exc
    # A credential is `user:password` (an empty FLOWER_BASIC_AUTH guards nothing), and
    # `--auth_provider` alone signs no one in: it only names the login page of `--auth`.
    credentials = [str(credential) for credential in options.basic_auth or []]
    authenticated = any(":" in credential for credential in credentials) or bool(options.auth)
    return str(options.address or ""), str(options.unix_socket or ""), authenticated
