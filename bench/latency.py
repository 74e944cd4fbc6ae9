"""The Graph latencies a bench measures at: read from its options, set on the sandbox."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Graph's median latency of each measurement by default, in milliseconds: none, and a typical
# and a slow answer of real Graph (reads take about 100-300 ms, a 20-member PATCH often longer).
DEFAULT_LATENCIES_MS = "0,200,500"


@dataclass(frozen=True)
class Latency:
    """How long the sandbox takes to answer each Graph request in one measurement."""

    p50_ms: float
    # The 99th percentile of a log-normal spread; 0: every answer takes the median.
    p99_ms: float = 0.0

    def sandbox_changes(self) -> dict[str, float]:
        """The run-time settings of the sandbox (`SandboxApp.configure`) that give it."""
        return {"latency_s": self.p50_ms / 1000, "latency_p99_s": self.p99_ms / 1000}

    @property
    def label(self) -> str:
        """`200`, or `200/500` for a median with a 99th percentile."""
        if self.p99_ms > self.p50_ms:
            return f"{self.p50_ms:g}/{self.p99_ms:g}"
        return f"{self.p50_ms:g}"


def milliseconds(text: str) -> list[float]:
    """A comma-separated list of non-negative milliseconds."""
    try:
        values_ms = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text}") from exc
    if any(value_ms < 0 for value_ms in values_ms):
        raise argparse.ArgumentTypeError(f"latencies cannot be negative: {text}")
    return values_ms


def add_latency_options(parser: argparse.ArgumentParser) -> None:
    """`--latency-ms` and `--latency-p99-ms`, read back by `latencies_from`."""
    parser.add_argument(
        "--latency-ms",
        type=milliseconds,
        default=milliseconds(DEFAULT_LATENCIES_MS),
        help=f"Graph's median latency of each measurement, comma-separated "
        f"(default {DEFAULT_LATENCIES_MS})",
    )
    parser.add_argument(
        "--latency-p99-ms",
        type=milliseconds,
        help="the 99th percentile of each latency, as many as --latency-ms (0: no spread); "
        "unset, every answer takes the median",
    )


def latencies_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Latency]:
    """The latencies the options ask for; a usage error when the two lists do not pair up."""
    p50s_ms: list[float] = args.latency_ms
    p99s_ms: list[float] = args.latency_p99_ms or [0.0] * len(p50s_ms)
    if len(p99s_ms) != len(p50s_ms):
        parser.error("--latency-p99-ms needs as many values as --latency-ms")
    if any(0 < p99_ms < p50_ms for p50_ms, p99_ms in zip(p50s_ms, p99s_ms, strict=True)):
        parser.error("a 99th percentile cannot be below its median")
    return [Latency(p50_ms, p99_ms) for p50_ms, p99_ms in zip(p50s_ms, p99s_ms, strict=True)]
