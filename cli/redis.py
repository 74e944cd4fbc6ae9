"""`entraflow redis status|stop`: the embedded Redis server of this `ENTRAFLOW_HOME`."""

from __future__ import annotations

from typing import Any

import click
import redis

from cli.output import print_json
from entraflow.redis_server import (
    SHUTDOWN_TIMEOUT_S,
    WATCHDOG_CLIENT_NAME,
    EmbeddedRedis,
    probe_client,
    shutdown,
)
from entraflow.settings import Settings, get_settings

NOT_EMBEDDED = "ENTRAFLOW_REDIS_URL is set: there is no embedded Redis server to manage"


@click.group(name="redis")
def redis_group() -> None:
    """The embedded Redis server, used when ENTRAFLOW_REDIS_URL is unset."""


@redis_group.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as a JSON object.")
def status(as_json: bool) -> None:
    """Whether the embedded server runs, where, and when it stops by itself."""
    view = _status(get_settings())
    if as_json:
        print_json(view)
        return
    if not view["embedded"]:
        click.echo(view["message"])
        return
    if view["running"]:
        click.echo(f"embedded Redis: running, pid {view['pid']}, on 127.0.0.1:{view['port']}")
    else:
        click.echo(
            "embedded Redis: not running (the next entraflow command that needs it starts it)"
        )
    click.echo(f"folder: {view['folder']}")
    if view["idle_stop_s"] > 0:
        click.echo(
            f"stops by itself after {view['idle_stop_s']:g} s without a client "
            "(ENTRAFLOW_EMBEDDED_REDIS_IDLE_S)"
        )
    else:
        click.echo("never stops by itself (ENTRAFLOW_EMBEDDED_REDIS_IDLE_S=0)")


@redis_group.command()
@click.option(
    "--force", is_flag=True, help="Stop it even while other processes (workers...) are connected."
)
def stop(force: bool) -> None:
    """Shut the embedded server down, its append-only file written out."""
    settings = get_settings()
    if settings.redis_url:
        raise click.ClickException(f"{NOT_EMBEDDED}; stop that server where it runs")
    server = EmbeddedRedis.for_settings(settings)
    port, password = server.recorded_port(), server.password()
    if server.pid is None or port is None or password is None:
        click.echo(f"no embedded Redis is running in {server.folder}")
        return
    client = probe_client(port, password)
    try:
        # Those processes would not start it again: they would only fail until restarted. The
        # watchdog's connection and this one are no such process.
        own_id = client.client_id()
        others = sum(
            1
            for connected in client.client_list()
            if int(connected["id"]) != own_id and connected.get("name") != WATCHDOG_CLIENT_NAME
        )
    except redis.RedisError as exc:
        raise click.ClickException(f"the embedded Redis does not answer: {exc}") from exc
    finally:
        client.close()
    if others > 0 and not force:
        raise click.ClickException(
            f"{others} other client(s) are connected (a worker, a scheduler, Flower?): stop "
            "them first, or pass --force"
        )
    shutdown(port, password)
    if server.pid is not None:
        raise click.ClickException(
            f"the embedded Redis is still running after {SHUTDOWN_TIMEOUT_S:g} s"
        )
    click.echo(f"stopped the embedded Redis on 127.0.0.1:{port}")


def _status(settings: Settings) -> dict[str, Any]:
    if settings.redis_url:
        return {"embedded": False, "running": None, "message": NOT_EMBEDDED}
    server = EmbeddedRedis.for_settings(settings)
    # From the pid file and /proc, without connecting: a look must not count as a use of it.
    pid = server.pid
    return {
        "embedded": True,
        "running": pid is not None,
        "pid": pid,
        "port": server.recorded_port(),
        "folder": str(server.folder),
        "idle_stop_s": server.idle_stop_s,
    }
