"""Graph's addressing rules: ids, UPNs, paths, filter literals and next links."""

from __future__ import annotations

import string
from urllib.parse import unquote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from worker import addressing
from worker.addressing import (
    add_member_ref_path,
    check_next_link,
    directory_object_url,
    group_path,
    is_email,
    is_guid,
    is_upn,
    mail_filter,
    member_ref_path,
    odata_string_literal,
    user_path,
)
from worker.errors import InvalidInputError, PermanentGraphError

GRAPH_URL = "https://graph.microsoft.com/v1.0"
GID = "0b5e3f43-7c2f-4f4a-9d6e-2a1b3c4d5e6f"
UID = "6f5e4d3c-2b1a-4e9d-a4f7-2c7f3e5b0b11"
# What may appear in a produced path: unreserved characters, `%` escapes, and the few kept.
PATH_CHARS = set(string.ascii_letters + string.digits + "-._~%/@$'()")
QUERY_LITERAL_CHARS = set(string.ascii_letters + string.digits + "-._~%")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (GID, True),
        (GID.upper(), True),
        (GID + "\n", False),
        (GID[:-1], False),
        ("{" + GID + "}", False),
        (GID.replace("-", ""), False),
        ("", False),
    ],
)
def test_is_guid(value: str, expected: bool) -> None:
    assert is_guid(value) is expected


@pytest.mark.parametrize(
    "value",
    [
        "adele@contoso.com",
        "$admin@contoso.com",
        "o'brien@contoso.com",
        "john_fabrikam.com#EXT#@contoso.onmicrosoft.com",
        "first.last-2@sub.contoso.co.uk",
    ],
)
def test_upns_accepted(value: str) -> None:
    assert is_upn(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "adele",
        "adele@contoso",
        "@contoso.com",
        "a@@contoso.com",
        "a@b@contoso.com",
        "a b@contoso.com",
        "a/b@contoso.com",
        "a\\b@contoso.com",
        "a?b@contoso.com",
        'a"b@contoso.com',
        "a`b@contoso.com",
        "a\u2019b@contoso.com",
        "a\tb@contoso.com",
        "a\x00b@contoso.com",
        "a\u200bb@contoso.com",
        ".a@contoso.com",
        "a.@contoso.com",
        "a@-contoso.com",
        "a@contoso..com",
        "a@contoso.com/../x",
        "a" * 1100 + "@contoso.com",
    ],
)
def test_upns_refused(value: str) -> None:
    assert not is_upn(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("adele@contoso.com", True),
        ("o'brien+tag@contoso.com", True),
        ("adele@contoso", False),
        ("a b@contoso.com", False),
        ("a..b@contoso.com", False),
        ("a@b@contoso.com", False),
        ("x" * 250 + "@contoso.com", False),
    ],
)
def test_is_email(value: str, expected: bool) -> None:
    assert is_email(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UID, f"/users/{UID}"),
        ("adele@contoso.com", "/users/adele@contoso.com"),
        (
            "john_fabrikam.com#EXT#@contoso.onmicrosoft.com",
            "/users/john_fabrikam.com%23EXT%23@contoso.onmicrosoft.com",
        ),
        ("a+b%c@contoso.com", "/users/a%2Bb%25c@contoso.com"),
        ("$admin@contoso.com", "/users('$admin@contoso.com')"),
        ("$o'brien@contoso.com", "/users('$o''brien@contoso.com')"),
        ("$g#EXT#@contoso.com", "/users('$g%23EXT%23@contoso.com')"),
    ],
)
def test_user_path(value: str, expected: str) -> None:
    assert user_path(value) == expected


def test_user_path_refuses_what_is_neither_id_nor_upn_naming_the_field() -> None:
    with pytest.raises(InvalidInputError) as raised:
        user_path("not a user", field="user_id")

    assert str(raised.value) == (
        "invalid input: user_id must be a user id (GUID) or a user principal name, got 'not a user'"
    )


def test_the_value_in_an_error_message_is_truncated() -> None:
    with pytest.raises(InvalidInputError) as raised:
        group_path("x" * 500)

    assert "group_id" in str(raised.value)
    # The repr, quote included, is cut at 80 characters.
    assert str(raised.value).endswith(", got '" + "x" * 79 + "...")


def test_group_path_wants_a_guid() -> None:
    assert group_path(GID) == f"/groups/{GID}"
    with pytest.raises(InvalidInputError, match="group_id"):
        group_path("sales@contoso.com")


def test_member_references_always_end_with_ref() -> None:
    assert add_member_ref_path(GID) == f"/groups/{GID}/members/$ref"
    assert member_ref_path(GID, UID) == f"/groups/{GID}/members/{UID}/$ref"


def test_no_public_function_builds_a_member_path_without_ref() -> None:
    results = []
    for name in dir(addressing):
        function = getattr(addressing, name)
        if name.startswith("_") or not callable(function) or "member" not in name:
            continue
        if name == "member_ref_path":
            results.append(function(GID, UID))
        else:
            results.append(function(GID))
    assert len(results) == 2
    assert all(path.endswith("/$ref") for path in results)


def test_member_ref_path_wants_guids() -> None:
    with pytest.raises(InvalidInputError, match="user_id"):
        member_ref_path(GID, "adele@contoso.com")


def test_directory_object_url() -> None:
    assert directory_object_url(GRAPH_URL + "/", UID) == f"{GRAPH_URL}/directoryObjects/{UID}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("adele@contoso.com", "'adele%40contoso.com'"),
        ("o'brien@x.com", "'o%27%27brien%40x.com'"),
        ("a+b@x.com", "'a%2Bb%40x.com'"),
        ("a&b=c #d", "'a%26b%3Dc%20%23d'"),
    ],
)
def test_odata_string_literal(value: str, expected: str) -> None:
    assert odata_string_literal(value) == expected


def test_mail_filter_is_encoded_with_the_quote_doubled() -> None:
    assert mail_filter("o'brien+x@contoso.com") == "mail%20eq%20'o%27%27brien%2Bx%40contoso.com'"


def test_mail_filter_refuses_what_is_not_an_email() -> None:
    with pytest.raises(InvalidInputError, match="email"):
        mail_filter("adele")


@pytest.mark.parametrize(
    "next_link",
    [
        f"{GRAPH_URL}/groups/{GID}/members?$skiptoken=abc",
        "https://GRAPH.microsoft.com:443/v1.0/users?$skiptoken=abc",
    ],
)
def test_next_links_on_the_graph_host_are_followed(next_link: str) -> None:
    assert check_next_link(next_link, GRAPH_URL) == next_link


@pytest.mark.parametrize(
    "next_link",
    [
        "https://evil.example.com/v1.0/users?$skiptoken=abc",
        "http://graph.microsoft.com/v1.0/users",
        "https://graph.microsoft.com:8443/v1.0/users",
        "https://graph.microsoft.com@evil.example.com/v1.0/users",
        "https://graph.microsoft.com.evil.example.com/v1.0/users",
        "/v1.0/users?$skiptoken=abc",
        "https://graph.microsoft.com:bad/v1.0/users",
        "ftp://graph.microsoft.com/v1.0/users",
    ],
)
def test_next_links_elsewhere_are_refused(next_link: str) -> None:
    with pytest.raises(PermanentGraphError, match="nextLink"):
        check_next_link(next_link, GRAPH_URL)


def test_next_link_check_respects_a_local_graph_port() -> None:
    local = "http://127.0.0.1:8080/v1.0"

    assert check_next_link("http://127.0.0.1:8080/v1.0/users?x=1", local)
    with pytest.raises(PermanentGraphError):
        check_next_link("http://127.0.0.1:8081/v1.0/users", local)


# Local parts made of anything a UPN allows, plus the characters that need encoding.
upn_local_parts = st.text(
    st.characters(codec="utf-8", exclude_categories=["C", "Z"], exclude_characters='@/\\?"`'),
    min_size=1,
    max_size=40,
)
domains = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)


@given(local=upn_local_parts, domain=domains)
def test_a_upn_never_escapes_its_path_segment(local: str, domain: str) -> None:
    upn = f"{local}@{domain}"
    assume(is_upn(upn))

    path = user_path(upn)

    assert set(path) <= PATH_CHARS
    if upn.startswith("$"):
        assert path.startswith("/users('") and path.endswith("')")
        assert path.count("/") == 1
        key = path.removeprefix("/users('").removesuffix("')")
        assert unquote(key).replace("''", "'") == upn
    else:
        assert path.split("/")[:2] == ["", "users"]
        assert path.count("/") == 2
        assert unquote(path.split("/")[2]) == upn


@given(value=st.text(max_size=60))
def test_any_string_is_a_clean_path_or_invalid_input(value: str) -> None:
    try:
        path = user_path(value)
    except InvalidInputError:
        return
    assert set(path) <= PATH_CHARS
    assert path.count("/") in (1, 2)


@given(value=st.text())
def test_filter_literals_round_trip(value: str) -> None:
    literal = odata_string_literal(value)

    inner = literal.removeprefix("'").removesuffix("'")
    assert literal == f"'{inner}'"
    assert set(inner) <= QUERY_LITERAL_CHARS
    assert unquote(inner).replace("''", "'") == value


@given(local=st.from_regex(r"[A-Za-z0-9'+._%-]{1,30}", fullmatch=True), domain=domains)
def test_mail_filters_round_trip(local: str, domain: str) -> None:
    email = f"{local}@{domain}"
    assume(is_email(email))

    encoded = mail_filter(email)

    assert unquote(encoded) == f"mail eq '{email.replace(chr(39), chr(39) * 2)}'"
    assert " " not in encoded and "+" not in encoded
