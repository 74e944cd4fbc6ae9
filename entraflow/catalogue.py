"""The Entra actions a flow step can name: their Celery task names and their inputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActionSpec:
    """What a flow needs to know about one action, without importing the worker."""

    name: str
    task_name: str
    required_inputs: frozenset[str]
    optional_inputs: frozenset[str] = frozenset()
    # Exactly one of these inputs must be given (lookup_user: an id, a UPN or an email).
    one_of: frozenset[str] = frozenset()
    writes: bool = False

    @property
    def inputs(self) -> frozenset[str]:
        return self.required_inputs | self.optional_inputs | self.one_of


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "lookup_user",
            "entra.lookup_user",
            required_inputs=frozenset(),
            one_of=frozenset({"user_id", "upn", "email"}),
        ),
        ActionSpec("lookup_group", "entra.lookup_group", required_inputs=frozenset({"group_id"})),
        ActionSpec(
            "add_user_to_group",
            "entra.add_user_to_group",
            required_inputs=frozenset({"user_id", "group_id"}),
            writes=True,
        ),
        ActionSpec(
            "remove_member_from_group",
            "entra.remove_member_from_group",
            required_inputs=frozenset({"user_id", "group_id"}),
            writes=True,
        ),
    )
}


# Bulk membership batches (worker.batch_tasks). The start task splits a batch into chunks, each
# one Graph request, and queues a chunk task per chunk; both carry ids only.
BATCH_START_TASK = "entraflow.batch_start"
BATCH_CHUNK_TASK = "entraflow.batch_chunk"
