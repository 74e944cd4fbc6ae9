"""The `entraflow` command: one group, its subcommands in the modules beside this one."""

from __future__ import annotations

import logging

import click
from pydantic import ValidationError

from cli.action import action
from cli.audit import audit
from cli.batch import batch, group
from cli.connect import connect, connection, disconnect
from cli.db import db
from cli.demo import demo
from cli.events import events
from cli.flows import flows
from cli.processes import flower, sandbox, worker
from cli.redis import redis_group
from cli.runs import runs
from cli.scheduler import scheduler
from entraflow.logs import configure as configure_logs
from entraflow.settings import get_settings, settings_problem


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level on stderr.")
def cli(verbose: bool) -> None:
    """Microsoft Entra ID actions as automated flows, on Celery and Redis."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        raise click.ClickException(settings_problem(exc)) from exc
    configure_logs(logging.INFO if verbose else logging.WARNING, settings.log_format)


cli.add_command(action)
cli.add_command(audit)
cli.add_command(batch)
cli.add_command(connect)
cli.add_command(connection)
cli.add_command(db)
cli.add_command(demo)
cli.add_command(disconnect)
cli.add_command(events)
cli.add_command(flower)
cli.add_command(flows)
cli.add_command(group)
cli.add_command(redis_group)
cli.add_command(runs)
cli.add_command(sandbox)
cli.add_command(scheduler)
cli.add_command(worker)
