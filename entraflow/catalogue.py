"""The catalogue of entraflow's Celery tasks: the Entra actions, the batch tasks, their queues.

The one list of the actions: the worker registers a function and a task for each, the command
line a subcommand, flow files are checked against it, and a test holds the README to it. The
scheduler sends tasks by the names written here and never imports the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from entraflow import keys

# Every task name starts with this: `entra.<action>` for a flow step, `entra.batch.*` for bulk.
TASK_PREFIX = "entra."

# The keys of a membership write's output; its `outcome` is one of the action's `outcomes`.
WRITE_OUTPUTS = ("success", "outcome")


@dataclass(frozen=True)
class ActionSpec:
    """What everything but the worker knows about one action: its inputs and its output."""

    name: str
    # One line saying what the action does: the subcommand's help.
    summary: str
    required_inputs: frozenset[str]
    # The keys of the action's JSON output, in order (a lookup's are Graph's property names).
    outputs: tuple[str, ...]
    optional_inputs: frozenset[str] = frozenset()
    # Exactly one of these inputs must be given (lookup_user: an id, a UPN or an email).
    one_of: frozenset[str] = frozenset()
    # A write's `outcome` values, the one that changes something first.
    outcomes: tuple[str, ...] = ()
    # A write's change as a template over its inputs, for a dry run to say what it would do.
    change: str = ""

    @property
    def inputs(self) -> frozenset[str]:
        return self.required_inputs | self.optional_inputs | self.one_of

    @property
    def writes(self) -> bool:
        return bool(self.outcomes)

    @property
    def task_name(self) -> str:
        return f"{TASK_PREFIX}{self.name}"


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "lookup_user",
            "Look up a user by id, UPN or email.",
            required_inputs=frozenset(),
            one_of=frozenset({"user_id", "upn", "email"}),
            outputs=(
                "id",
                "displayName",
                "givenName",
                "surname",
                "mail",
                "userPrincipalName",
                "jobTitle",
            ),
        ),
        ActionSpec(
            "lookup_group",
            "Look up a group by id.",
            required_inputs=frozenset({"group_id"}),
            outputs=(
                "id",
                "displayName",
                "description",
                "mail",
                "mailEnabled",
                "securityEnabled",
            ),
        ),
        ActionSpec(
            "add_user_to_group",
            "Add a user to a group (`added`, or `already_member`).",
            required_inputs=frozenset({"user_id", "group_id"}),
            outputs=WRITE_OUTPUTS,
            outcomes=("added", "already_member"),
            change="add user {user_id} to group {group_id}",
        ),
        ActionSpec(
            "remove_member_from_group",
            "Remove a member from a group (`removed`, or `not_member`).",
            required_inputs=frozenset({"user_id", "group_id"}),
            outputs=WRITE_OUTPUTS,
            outcomes=("removed", "not_member"),
            change="remove user {user_id} from group {group_id}",
        ),
    )
}


# Bulk membership batches (worker.batch_tasks). The start task splits a batch into chunks, each
# one Graph request, and queues a chunk task per chunk; both carry ids only.
BATCH_START_TASK = f"{TASK_PREFIX}batch.start"
BATCH_CHUNK_TASK = f"{TASK_PREFIX}batch.chunk"

# The queue of every task: flow steps on the flows queue, bulk work on its own so that a large
# batch never holds up a flow (a worker may serve one queue or both).
TASK_QUEUES: dict[str, str] = {
    **{spec.task_name: keys.FLOWS_QUEUE for spec in ACTIONS.values()},
    BATCH_START_TASK: keys.BULK_QUEUE,
    BATCH_CHUNK_TASK: keys.BULK_QUEUE,
}
