"""Every Redis key, stream and queue name entraflow uses, in one place."""

PREFIX = "entraflow:"

# Producers XADD CloudEvents here; the scheduler reads it with a consumer group.
EVENTS_STREAM = f"{PREFIX}events"
# Events that cannot be used, each with a `reason` field.
DEAD_EVENTS_STREAM = f"{PREFIX}events:dead"
# The consumer group every scheduler reads EVENTS_STREAM in.
SCHEDULERS_GROUP = f"{PREFIX}schedulers"
# Held by the one scheduler that trims the stream and re-queues stranded runs this round.
SCHEDULER_HOUSEKEEPING_LOCK = f"{PREFIX}lock:scheduler:housekeeping"

# The Celery queue that carries flow-run steps.
FLOWS_QUEUE = f"{PREFIX}flows"


def step_lock(run_id: str, step_id: str) -> str:
    """The lock held while one delivery of a step executes it."""
    return f"{PREFIX}lock:step:{run_id}:{step_id}"
