"""`python -m cli` is the `entraflow` command (the console script installed by pip)."""

from cli.main import cli

cli()
