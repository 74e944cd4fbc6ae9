"""How commands print: JSON on stdout for machines, and one error line, never a traceback."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn


def print_json(value: Any) -> None:
    click_safe = json.dumps(value, indent=2, sort_keys=False, default=str)
    sys.stdout.write(click_safe + "\n")


def fail_json(error: dict[str, Any], *, exit_code: int = 1) -> NoReturn:
    """Print a JSON error on stdout, its message on stderr, and exit non-zero."""
    print_json({"success": False, "outcome": error.get("outcome", "failed"), "error": error})
    sys.stderr.write(f"entraflow: {error.get('message', 'failed')}\n")
    raise SystemExit(exit_code)
