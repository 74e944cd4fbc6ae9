"""Arbitrary input at every action input and event field: clear refusals, nothing escapes its place.

Property-based (hypothesis, derandomized so CI sees the same examples): each action runs against
a fake transport that records the wire, and each recorded URL is taken apart again to show the
user's value stayed inside its own path segment or `$filter` literal.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import redis
from fake_transport import FakeTokens, FakeTransport, Recorded, Reply, graph_error
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from entraflow import keys
from entraflow.settings import Settings
from models.db import session_scope
from models.flows import Flow
from scheduler.flows import FlowDefinition
from scheduler.intake import Outcome, Scheduler
from scheduler.producer import EVENT_FIELD, InvalidEvent, check_event, parse_event
from worker.actions import run_action
from worker.addressing import is_guid
from worker.errors import GraphError, InvalidInputError, PermanentGraphError
from worker.graph import GraphClient
from worker.retry import RetryPolicy

GRAPH_URL = "https://graph.microsoft.com/v1.0"
GRAPH_HOST = "graph.microsoft.com"
BASE_PATH = "/v1.0"
GID = "0b5e3f43-7c2f-4f4a-9d6e-2a1b3c4d5e6f"
UID = "6f5e4d3c-2b1a-4e9d-a4f7-2c7f3e5b0b11"
# Enough examples to meet every character class a few times, few enough to keep the suite fast.
EXAMPLES = 200
SCHEDULER_EXAMPLES = 100
FUZZ = examples(max_examples=EXAMPLES, derandomize=True, deadline=None)

# Path, query and quoting syntax, traversal, encodings and lookalikes: what an attacker tries.
NASTY = st.sampled_from(
    [*"/?#%'$&=+.\\ \"`\t\n\r\x00@(),;:*", "..", "%2F", "%2e%2e", "%00", "$ref", "#EXT#",
     "''", "é", "İ", "ß", "😀", "\u202e", "\u200b", "\ufeff", "\uff0f", "\uff20", "\udc80"]
)  # fmt: skip
PIECES = st.lists(st.one_of(NASTY, st.text(max_size=4)), max_size=10).map("".join)
DOMAINS = st.sampled_from(["contoso.com", "sub.contoso.co.uk", "x", "contoso.com/..", "a..b"])
# Shaped like a UPN or an email, so that many examples pass validation and reach the wire.
ADDRESSES = st.builds(lambda local, domain: f"{local}@{domain}", PIECES, DOMAINS)
GUIDISH = st.sampled_from([GID, GID.upper(), GID + "/", f"{GID}?x", f"{GID}#", f" {GID}", ""])
VALUES = st.one_of(st.text(), PIECES, ADDRESSES, GUIDISH)
# How the fake Graph answers writes: normally, or 404 (exercising the follow-up reads).
WRITE_ANSWERS = st.sampled_from(["ok", "not_found", "already_member"])

# (action, the input under test, the other inputs, held valid)
ACTION_INPUTS = [
    ("lookup_user", "user_id", {}),
    ("lookup_user", "upn", {}),
    ("lookup_user", "email", {}),
    ("lookup_group", "group_id", {}),
    ("add_user_to_group", "user_id", {"group_id": GID}),
    ("add_user_to_group", "group_id", {"user_id": UID}),
    ("remove_member_from_group", "user_id", {"group_id": GID}),
    ("remove_member_from_group", "group_id", {"user_id": UID}),
]


def fake_graph(write_answer: str) -> FakeTransport:
    def answer(request: Recorded) -> Reply:
        headers = {"request-id": "req-1"}
        if request.method == "GET":
            if "$filter=" in request.url:
                return Reply(200, {"value": [{"id": UID}]}, headers)
            object_id = GID if "/groups" in request.url else UID
            return Reply(200, {"id": object_id}, headers)
        if write_answer == "not_found":
            return graph_error(404, "Request_ResourceNotFound", "gone", request_id="req-2")
        if write_answer == "already_member" and request.method == "POST":
            return graph_error(
                400,
                "Request_BadRequest",
                "One or more added object references already exist for the following "
                "modified properties: 'members'.",
            )
        return Reply(204, None, headers)

    return FakeTransport(handler=answer)


def client_for(transport: FakeTransport) -> GraphClient:
    return GraphClient(
        GRAPH_URL,
        FakeTokens(),
        session=transport.session(),
        retry_policy=RetryPolicy(max_attempts=1),
    )


def path_segments(url: str) -> list[str]:
    """The raw (still encoded) segments of a recorded URL's path below the Graph base."""
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname) == ("https", GRAPH_HOST), url
    assert parts.path.startswith(BASE_PATH + "/"), url
    return parts.path.removeprefix(BASE_PATH + "/").split("/")


def query_values(url: str) -> dict[str, str]:
    """The raw values of a recorded URL's query, each still encoded."""
    query = urlsplit(url).query
    pairs = [pair.split("=", 1) for pair in query.split("&")] if query else []
    assert all(len(pair) == 2 for pair in pairs), url
    return dict((name, value) for name, value in pairs)


def user_segment_holds(segment: str, value: str) -> bool:
    """Whether one path segment addresses exactly the user `value`, plain or in key syntax."""
    if value.startswith("$"):
        return unquote(segment) == "users('" + value.replace("'", "''") + "')"
    return unquote(segment) == value


def check_wire(action: str, field: str, value: str, sent: list[Recorded]) -> None:
    """Every request kept `value` inside its own segment or literal; no request is malformed."""
    group = value if field == "group_id" else GID
    # A user given by UPN is resolved to its object id (the fake answers UID) before a write.
    user_object = value if field == "user_id" and is_guid(value) else UID
    for request in sent:
        segments = path_segments(request.url)
        queries = query_values(request.url)
        assert all(name.startswith("$") for name in queries), request.url
        if request.method == "DELETE":
            # A membership, never the user object itself.
            assert segments == ["groups", group, "members", user_object, "$ref"], request.url
        elif request.method == "POST":
            assert segments == ["groups", group, "members", "$ref"], request.url
            reference = f"{GRAPH_URL}/directoryObjects/{user_object}"
            assert request.json() == {"@odata.id": reference}
        elif "$filter" in queries:
            assert segments == ["users"], request.url
            literal = unquote(queries["$filter"]).removeprefix("mail eq ")
            assert literal.startswith("'") and literal.endswith("'"), request.url
            inner = literal[1:-1]
            # Every quote inside is doubled, so none of them closes the literal early.
            assert "'" not in inner.replace("''", ""), request.url
            assert inner.replace("''", "'") == value
        elif segments[0] == "groups":
            assert segments == ["groups", group], request.url
        elif len(segments) == 2:
            assert segments[0] == "users", request.url
            assert unquote(segments[1]) in {value, user_object}, request.url
        else:
            assert len(segments) == 1 and user_segment_holds(segments[0], value), request.url
    if action.startswith("lookup"):
        assert len(sent) <= 1


@pytest.mark.parametrize(("action", "field", "others"), ACTION_INPUTS)
@FUZZ
@given(value=VALUES, write_answer=WRITE_ANSWERS)
def test_any_action_input_is_refused_clearly_or_stays_in_its_url_segment(
    action: str, field: str, others: dict[str, str], value: str, write_answer: str
) -> None:
    transport = fake_graph(write_answer)
    try:
        run_action(client_for(transport), action, {**others, field: value})
    except InvalidInputError as exc:
        assert transport.requests == [], "a refused input must not reach Graph"
        assert field in exc.message
        return
    except GraphError:
        pass
    check_wire(action, field, value, transport.requests)


@FUZZ
@given(
    action=st.sampled_from([a for a, _, _ in ACTION_INPUTS]),
    inputs=st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.none(), st.integers(), st.booleans(), st.lists(st.text()), VALUES),
        max_size=4,
    ),
)
def test_any_input_shape_is_refused_as_invalid_input_before_graph(
    action: str, inputs: dict[str, Any]
) -> None:
    transport = fake_graph("ok")
    try:
        run_action(client_for(transport), action, inputs)
    except InvalidInputError:
        assert transport.requests == []
    except GraphError:
        pass


# Next links: another host, userinfo tricks, lookalike hosts, other ports and schemes, junk.
NEXT_LINK_HOSTS = st.sampled_from(
    [GRAPH_HOST, "GRAPH.microsoft.com", f"{GRAPH_HOST}:443", f"{GRAPH_HOST}:8443", "evil.com",
     f"{GRAPH_HOST}.evil.com", f"{GRAPH_HOST}@evil.com", f"evil.com#{GRAPH_HOST}",
     f"evil.com\\@{GRAPH_HOST}", "", "[::1]", f"{GRAPH_HOST}:99999"]
)  # fmt: skip
NEXT_LINKS = st.one_of(
    st.text(),
    st.builds(
        lambda scheme, host, path: f"{scheme}://{host}{path}",
        st.sampled_from(["https", "http", "HTTPS", "ftp", "javascript", ""]),
        NEXT_LINK_HOSTS,
        st.one_of(st.just("/v1.0/groups/x/members?$skiptoken=1"), PIECES),
    ),
)


@FUZZ
@given(next_link=NEXT_LINKS)
def test_a_next_link_is_followed_only_on_the_graph_host(next_link: str) -> None:
    pages = [Reply(200, {"value": [{"id": UID}], "@odata.nextLink": next_link}), Reply(200, {})]
    transport = FakeTransport(pages)
    client = client_for(transport)

    try:
        members = list(client.get_all(f"/groups/{GID}/members"))
    except PermanentGraphError as exc:
        assert len(transport.requests) == 1
        assert "nextLink" in exc.message or "could not be sent" in exc.message
        return
    assert members == [{"id": UID}]
    for request in transport.requests:
        parts = urlsplit(request.url)
        assert (parts.scheme, parts.hostname, parts.port or 443) == ("https", GRAPH_HOST, 443)
        assert request.headers["Authorization"].startswith("Bearer ")


# Python's urlsplit reads `evil.com\@graph...` as user info before the Graph host, while urllib3
# (what requests sends with) reads a backslash as the end of the host: such a link once sent
# our bearer token to evil.com.
def test_a_next_link_with_a_backslash_cannot_reach_another_host() -> None:
    smuggled = f"https://evil.example\\@{GRAPH_HOST}/v1.0/groups/x/members"
    transport = FakeTransport([Reply(200, {"value": [], "@odata.nextLink": smuggled}), Reply()])

    with pytest.raises(PermanentGraphError, match="nextLink"):
        list(client_for(transport).get_all(f"/groups/{GID}/members"))

    assert [urlsplit(request.url).hostname for request in transport.requests] == [GRAPH_HOST]


def test_a_next_link_to_another_host_never_carries_the_token() -> None:
    evil = "https://evil.example/v1.0/groups/x/members?$skiptoken=1"
    transport = FakeTransport([Reply(200, {"value": [], "@odata.nextLink": evil})])

    with pytest.raises(PermanentGraphError, match="nextLink"):
        list(client_for(transport).get_all(f"/groups/{GID}/members"))

    assert [request.url for request in transport.requests] == [f"{GRAPH_URL}/groups/{GID}/members"]


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), VALUES
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
ATTRIBUTES = ["specversion", "id", "source", "type", "data", "data_base64", "time", "subject"]


def events() -> st.SearchStrategy[dict[str, Any]]:
    """A valid event with any of its attributes replaced by, or removed for, anything."""
    valid = {"specversion": "1.0", "id": "e-1", "source": "tests", "type": "t", "data": {}}
    replaced = st.dictionaries(st.sampled_from(ATTRIBUTES), JSON_VALUES, max_size=3)
    removed = st.sets(st.sampled_from(ATTRIBUTES), max_size=2)
    return st.builds(
        lambda changes, gone: {
            name: value for name, value in {**valid, **changes}.items() if name not in gone
        },
        replaced,
        removed,
    )


RAW_EVENTS = st.one_of(
    events().map(lambda event: json.dumps(event).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
)


@FUZZ
@given(event=events())
def test_any_event_field_is_accepted_or_refused_as_an_invalid_event(event: dict[str, Any]) -> None:
    try:
        check_event(event)
    except InvalidEvent as exc:
        assert str(exc)
        return
    for name in ("id", "source", "type"):
        assert isinstance(event[name], str) and event[name]
    assert event.get("data") is None or isinstance(event["data"], dict)


@FUZZ
@given(raw=RAW_EVENTS)
def test_any_raw_event_is_parsed_or_refused_as_an_invalid_event(raw: bytes) -> None:
    try:
        parsed = parse_event(raw)
    except InvalidEvent as exc:
        assert str(exc)
        return
    assert parsed["specversion"] == "1.0"


TRIGGER_TYPE = "t"


@pytest.fixture
def scheduler(settings: Settings, redis_client: redis.Redis) -> Scheduler:
    """A scheduler with one flow whose condition and inputs read the event's data."""
    definition = FlowDefinition.model_validate(
        {
            "name": "reads-data",
            "trigger": {"type": TRIGGER_TYPE, "if": "{{ event.data.department == 'Sales' }}"},
            "steps": [
                {"id": "u", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}}
            ],
        }
    )
    with session_scope(settings.resolved_database_url) as session:
        session.add(
            Flow(
                name="reads-data",
                trigger_type=TRIGGER_TYPE,
                definition=definition.model_dump(by_alias=True),
            )
        )
    return Scheduler(settings, redis_client, "fuzz")


def entries() -> st.SearchStrategy[dict[bytes, bytes]]:
    """A stream entry: the event field with any raw event (sometimes triggering the flow)."""
    data = st.fixed_dictionaries(
        {"department": st.one_of(st.just("Sales"), JSON_VALUES), "upn": JSON_VALUES}
    )
    triggering = st.builds(
        lambda event_id, event_data: json.dumps(
            {"specversion": "1.0", "id": event_id, "source": "fuzz", "type": TRIGGER_TYPE,
             "data": event_data}
        ).encode(),
        VALUES,
        data,
    )  # fmt: skip
    field = st.sampled_from([EVENT_FIELD.encode(), b"other"])
    return st.builds(lambda name, raw: {name: raw}, field, st.one_of(RAW_EVENTS, triggering))


@examples(
    max_examples=SCHEDULER_EXAMPLES,
    derandomize=True,
    deadline=None,
    # The scheduler and its Redis are meant to outlive many events: sharing them is the point.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(entry=entries())
def test_the_scheduler_turns_any_entry_into_runs_or_a_clear_dead_letter(
    scheduler: Scheduler, redis_client: redis.Redis, entry: dict[bytes, bytes]
) -> None:
    handled = scheduler.handle_entry("1-1", entry)

    raw = entry.get(EVENT_FIELD.encode())
    if handled.outcome is Outcome.DEAD:
        assert handled.reason
        letter = redis_client.xrevrange(keys.DEAD_EVENTS_STREAM, count=1)[0][1]
        assert letter[b"reason"].decode() == handled.reason
        if raw is not None:
            try:
                parse_event(raw)
            except InvalidEvent as exc:
                assert handled.reason == str(exc)
        return
    assert handled.outcome in {Outcome.ACCEPTED, Outcome.DUPLICATE}
    assert raw is not None
    parse_event(raw)
