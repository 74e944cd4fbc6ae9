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

# Held by the one process refreshing the delegated connection's tokens; the others wait for it.
CONNECTION_REFRESH_LOCK = f"{PREFIX}lock:connection:refresh"

# The Celery queue that carries flow-run steps.
FLOWS_QUEUE = f"{PREFIX}flows"
# The Celery queue of bulk batch work, apart so a large batch does not wait in front of flows.
BULK_QUEUE = f"{PREFIX}bulk"


def step_lock(run_id: str, step_id: str) -> str:
    """The lock held while one delivery of a step executes it."""
    return f"{PREFIX}lock:step:{run_id}:{step_id}"


# The shared Graph budget of one app in one tenant (worker.budget). The app id is a hash tag,
# so on a Redis Cluster every key of one app, its app-wide pauses included, shares a slot.
def _graph_prefix(app_id: str, tenant_id: str) -> str:
    return f"{PREFIX}graph:{{{app_id}}}:{tenant_id}"


# Stands for every tenant in a pause Graph scopes to the whole application.
ALL_TENANTS = "*"


def graph_usage_log(app_id: str, tenant_id: str, budget: str) -> str:
    """The rolling window of one budget (`ru` or `writes`): a sorted set of units by time."""
    return f"{_graph_prefix(app_id, tenant_id)}:{budget}"


def graph_pause(app_id: str, tenant_id: str, kind: str) -> str:
    """Until when Graph told the app to stop sending `kind` (`read` or `write`) requests."""
    return f"{_graph_prefix(app_id, tenant_id)}:paused:{kind}"


def graph_slowdown(app_id: str, tenant_id: str) -> str:
    """The factor every worker scales the app's budgets by while Graph counts more than we do."""
    return f"{_graph_prefix(app_id, tenant_id)}:slowdown"


def group_writes(app_id: str, tenant_id: str, group_id: str) -> str:
    """The writes to one group in flight: a sorted set of request tokens by lease end."""
    return f"{_graph_prefix(app_id, tenant_id)}:group-writes:{group_id.lower()}"
