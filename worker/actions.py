"""The code of the catalogue's Entra actions: a Graph client and string inputs in, JSON out.

Every input is validated before the first request. The membership writes are idempotent:
`already_member` and `not_member` are successes, which is also what makes a retry safe after
an ambiguous write (a write that timed out or was throttled but had in fact been applied).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from entraflow.catalogue import ACTIONS
from worker.addressing import (
    add_member_ref_path,
    directory_object_url,
    group_path,
    invalid_input,
    is_guid,
    mail_filter,
    member_ref_path,
    require_upn,
    user_path,
)
from worker.errors import AlreadyMemberError, AmbiguousMatchError, InvalidInputError, NotFoundError
from worker.graph import NEXT_LINK_KEY, GraphClient

# A lookup's output is the Graph properties it selects, named as Graph names them.
USER_FIELDS = ACTIONS["lookup_user"].outputs
GROUP_FIELDS = ACTIONS["lookup_group"].outputs
# The cheapest read that tells whether an object exists (GRAPH.md: `$select` costs 1 RU less).
SELECT_ID = {"$select": "id"}


@dataclass(frozen=True)
class ActionResult:
    """An action's output and the Graph request id of the last request it made."""

    output: dict[str, Any]
    request_id: str | None


Action = Callable[..., ActionResult]
ActionT = TypeVar("ActionT", bound=Action)

# The function that runs each catalogue action, by action name; `implements` fills it.
FUNCTIONS: dict[str, Action] = {}


def implements(function: ActionT) -> ActionT:
    """Make `function` the code of the catalogue action it is named after."""
    if function.__name__ not in ACTIONS:
        raise LookupError(f"{function.__name__} is not an action of the catalogue")
    FUNCTIONS[function.__name__] = function
    return function


@implements
def lookup_user(
    client: GraphClient,
    *,
    user_id: str | None = None,
    upn: str | None = None,
    email: str | None = None,
) -> ActionResult:
    """A user's profile, by object id or UPN (`user_id`), by `upn`, or by `email`."""
    # An empty string counts as absent: a template renders a missing event field as "".
    given = [
        name for name, value in (("user_id", user_id), ("upn", upn), ("email", email)) if value
    ]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise InvalidInputError(f"lookup_user needs exactly one of user_id, upn, email; got {got}")
    select = {"$select": ",".join(USER_FIELDS)}
    if email:
        response = client.request("GET", "/users", params={"$filter": mail_filter(email), **select})
        user = _only_user(email, response.data or {}, response.request_id)
    else:
        path = user_path(require_upn(upn, "upn")) if upn else user_path(user_id or "")
        response = client.request("GET", path, params=select)
        user = response.data or {}
    return ActionResult({field: user.get(field) for field in USER_FIELDS}, response.request_id)


def _only_user(email: str, data: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    users = data.get("value") or []
    if not users:
        raise NotFoundError(f"no user has the email {email!r}", request_id=request_id)
    if len(users) > 1 or data.get(NEXT_LINK_KEY):
        count = f"{len(users)}" + (" or more" if data.get(NEXT_LINK_KEY) else "")
        raise AmbiguousMatchError(
            f"{count} users have the email {email!r}; look the user up by id or UPN instead",
            request_id=request_id,
        )
    user: dict[str, Any] = users[0]
    return user


@implements
def lookup_group(client: GraphClient, *, group_id: str) -> ActionResult:
    """A group's profile, by object id."""
    response = client.request(
        "GET", group_path(group_id), params={"$select": ",".join(GROUP_FIELDS)}
    )
    group = response.data or {}
    return ActionResult({field: group.get(field) for field in GROUP_FIELDS}, response.request_id)


@implements
def add_user_to_group(client: GraphClient, *, user_id: str, group_id: str) -> ActionResult:
    """Add a user (object id or UPN) to a group: `added` or `already_member`."""
    members_path = add_member_ref_path(group_id)
    user_object_id = _user_object_id(client, user_id)
    reference = {"@odata.id": directory_object_url(client.graph_url, user_object_id)}
    try:
        response = client.request("POST", members_path, json=reference)
    except AlreadyMemberError as exc:
        # Also the answer to a retry whose first POST was applied before it timed out.
        return ActionResult({"success": True, "outcome": "already_member"}, exc.request_id)
    except NotFoundError as exc:
        missing, _ = _missing_object(client, group_id, user_object_id)
        if missing is None:
            raise
        raise _not_found(missing, exc) from exc
    return ActionResult({"success": True, "outcome": "added"}, response.request_id)


@implements
def remove_member_from_group(client: GraphClient, *, user_id: str, group_id: str) -> ActionResult:
    """Remove a member (object id or UPN) from a group: `removed` or `not_member`."""
    group_path(group_id)  # refuse a bad group id before resolving the user
    user_object_id = _user_object_id(client, user_id)
    try:
        response = client.request("DELETE", member_ref_path(group_id, user_object_id))
    except NotFoundError as exc:
        missing, request_id = _missing_object(client, group_id, user_object_id)
        if missing is None:
            # Graph answers 404 for a non-member (observed, GRAPH.md); it is also the answer to
            # a retry whose first DELETE was applied before it timed out.
            return ActionResult({"success": True, "outcome": "not_member"}, request_id)
        raise _not_found(missing, exc) from exc
    return ActionResult({"success": True, "outcome": "removed"}, response.request_id)


def _user_object_id(client: GraphClient, user_id: str) -> str:
    """The object id of `user_id`, asking Graph only when it is a UPN."""
    if is_guid(user_id):
        return user_id
    path = user_path(user_id)
    try:
        response = client.request("GET", path, params=SELECT_ID)
    except NotFoundError as exc:
        raise _not_found(f"user {user_id!r} does not exist", exc) from exc
    return str((response.data or {})["id"])


def _missing_object(
    client: GraphClient, group_id: str, user_id: str
) -> tuple[str | None, str | None]:
    """Which of the group and the user does not exist, if either; and the last request id."""
    request_id = None
    for kind, path, object_id in (
        ("group", group_path(group_id), group_id),
        ("user", user_path(user_id), user_id),
    ):
        try:
            request_id = client.request("GET", path, params=SELECT_ID).request_id
        except NotFoundError:
            return f"{kind} {object_id!r} does not exist", request_id
    return None, request_id


def _not_found(message: str, cause: NotFoundError) -> NotFoundError:
    return NotFoundError(message, status=cause.status, code=cause.code, request_id=cause.request_id)


def run_action(client: GraphClient, name: str, inputs: Mapping[str, object]) -> ActionResult:
    """Run action `name` with `inputs`, refusing unknown actions and unknown or missing inputs."""
    spec = ACTIONS.get(name)
    if spec is None:
        raise InvalidInputError(f"unknown action {name!r}; known: {', '.join(ACTIONS)}")
    unknown = sorted(set(inputs) - spec.inputs)
    if unknown:
        raise InvalidInputError(
            f"{name} has no input {', '.join(unknown)}; it takes {', '.join(sorted(spec.inputs))}"
        )
    missing = sorted(spec.required_inputs - set(inputs))
    if missing:
        raise InvalidInputError(f"{name} needs the input {', '.join(missing)}")
    required = spec.required_inputs
    return FUNCTIONS[name](
        client, **{key: _string(key, value, key in required) for key, value in inputs.items()}
    )


def _string(field: str, value: object, required: bool) -> str | None:
    """`value` if it is a string (or an absent optional input); ids are never numbers."""
    if isinstance(value, str) or (value is None and not required):
        return value
    raise invalid_input(field, value, "a string")
