"""OData addressing as Graph parses it: key literals, `$select`, `$filter`, ids and page tokens."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote

from sandbox.responses import GraphError

_MAIL_FILTER = re.compile(r"\s*mail\s+eq\s+'", re.IGNORECASE)
_DIRECTORY_OBJECT_URL = re.compile(r"/directoryObjects/([^/?#]+)$", re.IGNORECASE)


def parse_query(query: str) -> dict[str, str]:
    """Query options by name; `+` reads as a space and `%2B` as a plus, as in Graph."""
    return dict(parse_qsl(query, keep_blank_values=True))


def path_segments(path: str) -> list[str]:
    """Percent-decoded segments of a path, split before decoding so `%2F` stays in its segment."""
    return [unquote(segment) for segment in path.strip("/").split("/") if segment]


def is_guid(text: str) -> bool:
    """Whether `text` is an object id Graph would accept."""
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == len("00000000-0000-0000-0000-000000000000")


def parse_string_literal(text: str, start: int) -> tuple[str, int]:
    """The OData string literal opening at `text[start]`, and the index just past it."""
    if start >= len(text) or text[start] != "'":
        raise _syntax_error(text, start)
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        if text[i] == "'":
            if text[i + 1 : i + 2] == "'":
                chars.append("'")
                i += 2
                continue
            return "".join(chars), i + 1
        chars.append(text[i])
        i += 1
    raise GraphError(400, "BadRequest", f"Unterminated string literal at {start} in '{text}'.")


def parse_key_segment(segment: str, entity_set: str) -> str | None:
    """The key in `users('key')`, or None if `segment` is not that form."""
    prefix = f"{entity_set}("
    if not (segment.startswith(prefix) and segment.endswith(")")):
        return None
    inner = segment[len(prefix) : -1]
    key, end = parse_string_literal(inner, 0)
    if end != len(inner):
        raise _syntax_error(inner, end)
    return key


def parse_mail_filter(expression: str) -> str:
    """The address in `mail eq '...'`, the one filter the sandbox supports."""
    opening = _MAIL_FILTER.match(expression)
    if opening is None:
        raise GraphError(
            400,
            "Request_UnsupportedQuery",
            "Unsupported or invalid query filter clause specified for property of resource 'User'.",
        )
    mail, end = parse_string_literal(expression, opening.end() - 1)
    if expression[end:].strip():
        raise _syntax_error(expression, end)
    return mail


def parse_select(value: str | None, known: Iterable[str], entity: str) -> list[str] | None:
    """Canonical names of the `$select`ed properties, or None without `$select`."""
    if value is None:
        return None
    by_lower = {name.lower(): name for name in known}
    selected = []
    for name in (part.strip() for part in value.split(",")):
        if name.lower() not in by_lower:
            raise GraphError(
                400,
                "BadRequest",
                f"Could not find a property named '{name}' on type 'microsoft.graph.{entity}'.",
            )
        selected.append(by_lower[name.lower()])
    return selected


def parse_top(value: str | None, default: int, maximum: int) -> int:
    """The page size asked by `$top`, checked against Graph's bounds."""
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise GraphError(
            400,
            "Request_BadRequest",
            f"Invalid page size specified: '{value}'. Must be between 1 and {maximum} inclusive.",
        )
    return int(value)


def directory_object_id(url: object) -> str:
    """The object id at the end of a `.../directoryObjects/{id}` reference URL."""
    match = _DIRECTORY_OBJECT_URL.search(url) if isinstance(url, str) else None
    if match is None:
        raise GraphError(
            400, "Request_BadRequest", f"Invalid URL format specified in @odata.bind: '{url}'."
        )
    object_id = unquote(match.group(1))
    if not is_guid(object_id):
        raise GraphError(400, "Request_BadRequest", f"Invalid object identifier '{object_id}'.")
    return object_id


def encode_skiptoken(offset: int) -> str:
    """An opaque `$skiptoken` for the page that starts at `offset`."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_skiptoken(token: str | None) -> int:
    """The offset a `$skiptoken` stands for (0 without one)."""
    if token is None:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        label, offset = text.split(":")
        if label != "offset" or not offset.isdigit():
            raise ValueError(text)
    except ValueError as exc:
        raise GraphError(400, "Request_BadRequest", "Invalid $skiptoken.") from exc
    return int(offset)


def _syntax_error(text: str, position: int) -> GraphError:
    found = text[position] if position < len(text) else "end of input"
    return GraphError(
        400,
        "BadRequest",
        f"Syntax error: character '{found}' is not valid at position {position} in '{text}'.",
    )
