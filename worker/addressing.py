"""Graph's addressing rules (GRAPH.md, "Addressing rules"), each a small pure function.

Paths and query values come out percent-encoded, ready to be appended to the Graph URL as
they are. No function here builds `/groups/{gid}/members/{uid}` without `/$ref`: that form
deletes the user object itself.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from worker.errors import InvalidInputError, PermanentGraphError

GUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Active Directory's upper bound for userPrincipalName; Entra's own limit is lower and Graph
# answers the rest, this only keeps garbage out of URLs.
MAX_UPN_LENGTH = 1024
# RFC 5321's limit on a forward path, the longest address mail can carry.
MAX_EMAIL_LENGTH = 254
# Characters a UPN may not contain besides whitespace and control characters: they are path
# or query syntax, or quotes (a lone `'` is allowed, as in o'brien@contoso.com).
UPN_FORBIDDEN_CHARS = frozenset('/\\?"`\u2018\u2019\u201c\u201d')
DOMAIN_LABEL_PATTERN = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# RFC 5322 dot-atom text: what an address's local part may hold without quoting.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
EMAIL_LOCAL_PATTERN = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# Left as they are inside a path segment: `@` reads better and `$` and `'` are the documented
# key syntax of `/users('$x@y.com')`. Everything else, `#` and `/` included, is encoded.
PATH_SEGMENT_SAFE_CHARS = "@$'"
# A UPN starting with this must be addressed with the key syntax (GRAPH.md).
KEY_SYNTAX_PREFIX = "$"
# Longest part of a bad input echoed in an error message.
MAX_SHOWN_VALUE_CHARS = 80
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Spaces and control characters end a URL for some parsers and not for others.
SPACE_CODE_POINT = 0x20


def invalid_input(field: str, value: object, expected: str) -> InvalidInputError:
    """The error for input `field` holding `value` where `expected` was needed."""
    shown = repr(value)
    if len(shown) > MAX_SHOWN_VALUE_CHARS:
        shown = shown[:MAX_SHOWN_VALUE_CHARS] + "..."
    return InvalidInputError(f"{field} must be {expected}, got {shown}")


def is_guid(value: str) -> bool:
    """Whether `value` is a GUID such as an Entra object id."""
    return GUID_PATTERN.fullmatch(value) is not None


def is_upn(value: str) -> bool:
    """Whether `value` looks like a user principal name, guests' `#EXT#` and `$x@y` included."""
    if len(value) > MAX_UPN_LENGTH or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return (
        bool(local)
        and not local.startswith(".")
        and not local.endswith(".")
        and all(_is_upn_char(char) for char in local)
        and _is_domain(domain)
    )


def is_email(value: str) -> bool:
    """Whether `value` is a plain email address (`local@domain.tld`)."""
    if len(value) > MAX_EMAIL_LENGTH or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return EMAIL_LOCAL_PATTERN.fullmatch(local) is not None and _is_domain(domain)


def _is_upn_char(char: str) -> bool:
    # Category C: control, format, surrogate, private-use and unassigned code points.
    return not (
        char.isspace() or char in UPN_FORBIDDEN_CHARS or unicodedata.category(char)[0] == "C"
    )


def _is_domain(domain: str) -> bool:
    labels = domain.split(".")
    return len(labels) >= 2 and all(DOMAIN_LABEL_PATTERN.fullmatch(label) for label in labels)


def _segment(value: str) -> str:
    return quote(value, safe=PATH_SEGMENT_SAFE_CHARS)


def require_guid(value: str, field: str) -> str:
    """`value` if it is a GUID, else `InvalidInputError` naming `field`."""
    if not is_guid(value):
        raise invalid_input(field, value, "an object id (GUID)")
    return value


def require_upn(value: str, field: str) -> str:
    """`value` if it is a user principal name, else `InvalidInputError` naming `field`."""
    if not is_upn(value):
        raise invalid_input(field, value, "a user principal name (name@domain)")
    return value


def user_path(id_or_upn: str, *, field: str = "user_id") -> str:
    """`/users/{id-or-upn}`, or `/users('{upn}')` for a UPN starting with `$`."""
    if is_guid(id_or_upn):
        return f"/users/{id_or_upn}"
    if not is_upn(id_or_upn):
        raise invalid_input(field, id_or_upn, "a user id (GUID) or a user principal name")
    if id_or_upn.startswith(KEY_SYNTAX_PREFIX):
        # `/users/$x@y` would read as an OData system segment such as `$ref`.
        key = id_or_upn.replace("'", "''")
        return f"/users('{_segment(key)}')"
    return f"/users/{_segment(id_or_upn)}"


def group_path(group_id: str, *, field: str = "group_id") -> str:
    """`/groups/{id}` for a group object id."""
    return f"/groups/{require_guid(group_id, field)}"


def add_member_ref_path(group_id: str) -> str:
    """`/groups/{gid}/members/$ref`, where a member reference is POSTed."""
    return f"{group_path(group_id)}/members/$ref"


def member_ref_path(group_id: str, user_id: str) -> str:
    """`/groups/{gid}/members/{uid}/$ref`: removes the membership, never the user."""
    return f"{group_path(group_id)}/members/{require_guid(user_id, 'user_id')}/$ref"


def directory_object_url(graph_url: str, user_id: str) -> str:
    """The absolute `directoryObjects/{id}` URL an `@odata.id` reference names."""
    return f"{graph_url.rstrip('/')}/directoryObjects/{require_guid(user_id, 'user_id')}"


def odata_string_literal(value: str) -> str:
    """`'value'` for `$filter`: quotes doubled, then all of it percent-encoded (`+` is `%2B`)."""
    return "'" + quote(value.replace("'", "''"), safe="") + "'"


def mail_filter(email: str, *, field: str = "email") -> str:
    """The encoded `$filter` value matching users whose `mail` is `email`."""
    if not is_email(email):
        raise invalid_input(field, email, "an email address (name@domain)")
    return quote("mail eq ", safe="") + odata_string_literal(email)


def check_next_link(next_link: str, graph_url: str) -> str:
    """`next_link` if it points at the configured Graph origin; our token goes nowhere else."""
    origin = _origin(next_link)
    if origin is None or origin != _origin(graph_url):
        raise PermanentGraphError(
            f"refusing to follow @odata.nextLink outside {graph_url}: {next_link[:200]!r}"
        )
    return next_link


def _origin(url: str) -> tuple[str, str, int] | None:
    # Parsers disagree on backslashes, user info and control characters (`https://evil\@graph`
    # is graph.microsoft.com to urlsplit and evil to urllib3, which sends): refuse them, and
    # accept only an origin that urlsplit and urllib3 read alike.
    if "\\" in url or any(ord(char) <= SPACE_CODE_POINT for char in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
        sent_to = parse_url(url)
    except (ValueError, LocationParseError):
        return None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc or not parts.hostname or scheme not in _DEFAULT_PORTS:
        return None
    origin = (scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme])
    sent_origin = (
        (sent_to.scheme or "").lower(),
        (sent_to.host or "").lower(),
        sent_to.port or _DEFAULT_PORTS.get((sent_to.scheme or "").lower(), 0),
    )
    return origin if origin == sent_origin else None
