"""The `entraflow` command line."""
