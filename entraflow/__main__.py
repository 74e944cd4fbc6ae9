"""`python -m entraflow` is the `entraflow` command."""

from entraflow.cli.main import cli

cli()
