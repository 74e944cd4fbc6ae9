"""Groups of a bench's own in the sandbox, which its runs or batches write to in turns."""

from __future__ import annotations

from sandbox.app import SandboxApp
from sandbox.directory import seed_id

# A burst of hires or a batch goes to several teams' groups: one group takes at most a few
# writes at once (GRAPH.md: about 5), which would bound the bench instead of entraflow.
DEFAULT_GROUPS = 5
# Writes one group answers at once before 503s, as on a real tenant (GRAPH.md: about 5).
GROUP_WRITES_IN_FLIGHT = 5


def bench_groups(app: SandboxApp, count: int) -> list[str]:
    """The ids of `count` new, empty groups in the sandbox."""
    ids = [seed_id(f"bench-group:{n}") for n in range(1, count + 1)]
    for n, group_id in enumerate(ids, 1):
        app.directory.add_group(group_id, f"Bench group {n}")
    return ids
