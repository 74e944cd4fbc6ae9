"""`entraflow worker` and `entraflow sandbox`: the long-running processes."""

from __future__ import annotations

import click

from entraflow import keys
from entraflow.celery_app import app

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


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
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, loglevel: str, queues: str) -> None:
    """Run a Celery worker for flow steps and batches; other options go to `celery worker`."""
    argv = ["worker", f"--loglevel={loglevel}", f"--queues={queues}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main([*argv, *ctx.args])


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
def sandbox(host: str, port: int) -> None:
    """Serve the Graph sandbox: a local stand-in for Microsoft Graph and its token endpoint."""
    from sandbox.directory import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SANDBOX_TENANT_ID
    from sandbox.server import SandboxServer

    server = SandboxServer(host=host, port=port)
    click.echo(f"Graph sandbox on {server.url}; point entraflow at it with:")
    click.echo(f"  export ENTRAFLOW_GRAPH_URL={server.graph_url}")
    click.echo(f"  export ENTRAFLOW_AUTHORITY_URL={server.authority_url}")
    click.echo(f"  export ENTRAFLOW_TENANT_ID={SANDBOX_TENANT_ID}")
    click.echo(f"  export ENTRAFLOW_CLIENT_ID={SANDBOX_CLIENT_ID}")
    click.echo(f"  export ENTRAFLOW_CLIENT_SECRET={SANDBOX_CLIENT_SECRET}  # the sandbox's own")
    click.echo("  export OAUTHLIB_INSECURE_TRANSPORT=1  # plain HTTP, for this local server only")
    server.serve_forever()


@click.command(context_settings=PASS_THROUGH)
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Run Flower on this deployment's broker; Flower's own options pass through."""
    app.start(["flower", *ctx.args])
