"""The `entraflow` command: one group, its subcommands in the modules beside this one.

A subcommand's module is imported only when that subcommand runs (or `--help` lists it): every
command pays for the libraries it uses, not for those of all the others (the Graph client, the
token providers and the metrics server alone took most of a second to import).
"""

from __future__ import annotations

import importlib
import logging

import click
from pydantic import ValidationError

from entraflow.logs import configure as configure_logs
from entraflow.settings import get_settings, settings_problem

# Each subcommand by name: the module that defines it and the name it has there.
SUBCOMMANDS = {
    "action": "cli.action:action",
    "audit": "cli.audit:audit",
    "batch": "cli.batch:batch",
    "connect": "cli.connect:connect",
    "connection": "cli.connect:connection",
    "db": "cli.db:db",
    "demo": "cli.demo:demo",
    "disconnect": "cli.connect:disconnect",
    "events": "cli.events:events",
    "flower": "cli.processes:flower",
    "flows": "cli.flows:flows",
    "group": "cli.batch:group",
    "redis": "cli.redis:redis_group",
    "runs": "cli.runs:runs",
    "sandbox": "cli.processes:sandbox",
    "scheduler": "cli.scheduler:scheduler",
    "worker": "cli.processes:worker",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module when the subcommand is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level on stderr.")
def cli(verbose: bool) -> None:
    """Microsoft Entra ID actions as automated flows, on Celery and Redis."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        raise click.ClickException(settings_problem(exc)) from exc
    configure_logs(logging.INFO if verbose else logging.WARNING, settings.log_format)
