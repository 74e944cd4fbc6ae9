"""One fix to kombu's Redis transport, applied when the Celery app is imported.

When the broker goes away, Celery's consumer closes its connection twice: once collecting it,
once closing it. If the first close of the channel fails half-way (its blocking read raising the
connection error), the second finds the transport already detached from its connection and
kombu's `Channel._connparams` fails with `AttributeError: 'NoneType' object has no attribute
'hostname'` while trying to give back the unacknowledged messages. Celery calls that an
unrecoverable error and the whole worker exits on a Redis restart. A worker of many threads
nearly always holds unacknowledged messages, so it met this on every restart in the chaos suite
(kombu 5.7.0).

The fix: a channel without a connection raises the connection error that it is, which kombu
ignores while closing, and the consumer reconnects. The messages stay in Redis's unacknowledged
set and come back after the visibility timeout, as after any crash.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_original_connparams = kombu_redis.Channel._connparams


def _connparams(self: kombu_redis.Channel, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("the broker connection is closed")
    return _original_connparams(self, asynchronous=asynchronous)


def apply() -> None:
    """Install the fix (idempotent)."""
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
