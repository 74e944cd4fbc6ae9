"""The fix to kombu's Redis transport: a closed broker connection is a connection error."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from entraflow import kombu_redis


def test_a_channel_whose_connection_was_detached_raises_a_connection_error(
    redis_url: str,
) -> None:
    kombu_redis.apply()
    connection = Connection(redis_url)
    channel = connection.default_channel
    transport, client = connection.transport, connection.transport.client
    # As Celery's consumer leaves it after collecting a connection the broker dropped.
    transport.client = None
    try:
        with pytest.raises(redis.ConnectionError):
            channel._connparams()
        # Unfixed, kombu 5.7.0 fails here with AttributeError, and the worker exits.
        with pytest.raises(AttributeError):
            kombu_redis._original_connparams(channel)
    finally:
        transport.client = client
        connection.release()
