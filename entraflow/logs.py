"""Log lines: JSON objects for collectors, plain text for a terminal, with the ids of the work.

Task bodies and the scheduler mark the run, step, batch or event at hand (`bound`); every line
logged meanwhile carries those ids, whichever logger wrote it. `ENTRAFLOW_LOG_FORMAT` picks the
format: `auto` (the default) writes plain text to a terminal and JSON lines anywhere else (a file, a
pipe, a container's log driver), decided for each handler by its stream.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from entraflow.settings import LogFormat

# The ids a line may carry, in the order plain text shows them; `action` names the Entra action.
CONTEXT_FIELDS = ("run_id", "step_id", "batch_id", "event_id", "stream_id", "action")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A bearer token in a message (an exception's text quoting a header) never reaches a log.
BEARER_TOKEN = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
REDACTED = r"\1[redacted]"

# The ids of the innermost `bound` block, a dict of that block's own; None outside any block.
_context: ContextVar[dict[str, str] | None] = ContextVar("entraflow_log_context", default=None)


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Tag every line logged inside the block with `ids` (None values are left out)."""
    given = {name: value for name, value in ids.items() if value is not None}
    token = _context.set({**current(), **given})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**ids: str) -> None:
    """Add `ids` to the lines logged for the rest of the enclosing `bound` block, if any."""
    # Outside a block there is no end to undo it at: ids would leak into unrelated lines.
    block = _context.get()
    if block is not None:
        block.update(ids)


def current() -> Mapping[str, str]:
    """The ids bound now."""
    return _context.get() or {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the ids bound."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _redact(record.getMessage()),
            **current(),
        }
        if record.exc_info:
            line["exception"] = _redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class PlainFormatter(logging.Formatter):
    """Text for a person: the usual line, then the ids bound as `name=value`."""

    def __init__(self, fmt: str = PLAIN_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = current()
        tags = " ".join(f"{name}={ids[name]}" for name in CONTEXT_FIELDS if name in ids)
        return _redact(f"{text} [{tags}]" if tags else text)


def formatter_for(stream: IO[Any] | None, log_format: LogFormat) -> logging.Formatter:
    """The formatter for a handler writing to `stream`."""
    if log_format is LogFormat.AUTO:
        log_format = LogFormat.PLAIN if _is_terminal(stream) else LogFormat.JSON
    return PlainFormatter() if log_format is LogFormat.PLAIN else JsonFormatter()


def format_handlers(logger: logging.Logger, log_format: LogFormat) -> None:
    """Give each of `logger`'s handlers the formatter its stream calls for."""
    for handler in logger.handlers:
        handler.setFormatter(formatter_for(getattr(handler, "stream", None), log_format))


def configure(level: int | str, log_format: LogFormat) -> None:
    """Log to stderr at `level` in `log_format`: the CLI's and the scheduler's setup.

    Like `logging.basicConfig`, it leaves a logging set up already (by a test runner, or a
    program embedding the CLI) alone.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(handler.stream, log_format))
    root.addHandler(handler)
    root.setLevel(level)


def _is_terminal(stream: IO[Any] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # a closed stream
        return False


def _redact(text: str) -> str:
    return BEARER_TOKEN.sub(REDACTED, text)
