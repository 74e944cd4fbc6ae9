"""`entraflow worker` and `entraflow sandbox`: the long-running processes."""

from __future__ import annotations

import logging
from typing import Any

import click
import redis
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_shutdown

from entraflow import keys, logs, metrics
from entraflow.celery_app import app
from entraflow.redis_server import redis_url
from entraflow.settings import Settings, get_settings
from worker.budget import RU_BUDGET, WRITES_BUDGET, Budget
from worker.connections import connection_identity

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}
# Under ENTRAFLOW_HOME: the files a worker's processes keep their metrics in.
METRICS_DIR = "metrics"


@click.command(context_settings=PASS_THROUGH)
@click.option(
    "--concurrency", "-c", type=int, default=None, help="Worker processes (default: CPUs)."
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
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={queues}"]
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
        settings.resolved_database_url,
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
def sandbox(host: str, port: int) -> None:
    """Serve the Graph sandbox: a local stand-in for Microsoft Graph and its token endpoint."""
    from entraflow.cli.stack import sandbox_environment
    from sandbox.server import SandboxServer

    server = SandboxServer(host=host, port=port)
    click.echo(f"Graph sandbox on {server.url}; point entraflow at it with:")
    for name, value in sandbox_environment(server).items():
        click.echo(f"  export {name}={value}")
    click.echo("(OAUTHLIB_INSECURE_TRANSPORT allows plain HTTP: only ever for this local server.)")
    server.serve_forever()


@click.command(context_settings=PASS_THROUGH)
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Run Flower on this deployment's broker; Flower's own options pass through."""
    app.start(["flower", *ctx.args])
