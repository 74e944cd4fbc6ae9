"""Loopback ports for the processes a test, bench or chaos run starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port of 127.0.0.1 that no one listens on now (the kernel's pick; another may take it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
