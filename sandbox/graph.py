"""Graph v1.0 resources: which routes exist, what they cost and what they do to the directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from sandbox.config import PatchWriteCost, SandboxConfig
from sandbox.directory import GROUP_DEFAULT_PROPERTIES, USER_DEFAULT_PROPERTIES, Directory
from sandbox.odata import (
    decode_skiptoken,
    directory_object_id,
    encode_skiptoken,
    is_guid,
    parse_key_segment,
    parse_mail_filter,
    parse_select,
    parse_top,
)
from sandbox.responses import (
    GraphAnswer,
    GraphError,
    already_member,
    invalid_id,
    not_found,
)
from sandbox.stats import RouteKind, Stats
from sandbox.throttle import Cost, request_cost

# Graph's cap on references bound in one PATCH, and on parts in one `$batch`.
MAX_MEMBERS_PER_PATCH = 20
MAX_BATCH_REQUESTS = 20
# Properties a user or group has in the sandbox (what `$select` may name).
USER_PROPERTIES = (*USER_DEFAULT_PROPERTIES, "department", "userType", "accountEnabled")
GROUP_PROPERTIES = GROUP_DEFAULT_PROPERTIES
# Page size of `GET /users` without `$top`, as Graph pages it.
USERS_PAGE_SIZE = 100
USER_ODATA_TYPE = "#microsoft.graph.user"


@dataclass(frozen=True)
class GraphRequest:
    """One Graph request, top-level or a `$batch` part, with its path under `/v1.0` decoded."""

    method: str
    segments: list[str]
    query: dict[str, str]
    body: bytes
    base_url: str  # scheme and host the client used, for absolute links

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object."""
        try:
            value = json.loads(self.body or b"null")
        except ValueError as exc:
            raise GraphError(400, "BadRequest", "Invalid JSON in the request body.") from exc
        if not isinstance(value, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        return value


@dataclass(frozen=True)
class Route:
    """What a request addresses: its kind and the resource method that answers it."""

    kind: RouteKind
    action: Callable[..., GraphAnswer]
    args: tuple[str, ...] = ()


def resolve(method: str, segments: list[str]) -> Route:
    """The route for a method and decoded path segments; an unknown route answers 400."""
    match method, segments:
        case "GET", ["users"]:
            return Route(RouteKind.USERS, GraphResources.list_users)
        case "GET", ["users", key]:
            if key.startswith("$"):
                # Graph reads a `$` segment as a system segment; such UPNs need users('...').
                raise GraphError(
                    400, "Request_BadRequest", f"Resource not found for the segment '{key}'."
                )
            return Route(RouteKind.USER, GraphResources.get_user, (key,))
        case "GET", [segment] if segment.startswith("users("):
            quoted = parse_key_segment(segment, "users")
            if quoted is not None:
                return Route(RouteKind.USER, GraphResources.get_user, (quoted,))
        case "GET", ["groups", gid]:
            return Route(RouteKind.GROUP, GraphResources.get_group, (gid,))
        case "PATCH", ["groups", gid]:
            return Route(RouteKind.GROUP_UPDATE, GraphResources.update_group, (gid,))
        case "GET", ["groups", gid, "members"]:
            return Route(RouteKind.MEMBERS, GraphResources.list_members, (gid,))
        case "POST", ["groups", gid, "members", "$ref"]:
            return Route(RouteKind.MEMBER_ADD, GraphResources.add_member, (gid,))
        case "DELETE", ["groups", gid, "members", uid, "$ref"]:
            return Route(RouteKind.MEMBER_REMOVE, GraphResources.remove_member, (gid, uid))
        case "DELETE", ["groups", gid, "members", uid]:
            return Route(RouteKind.MEMBER_OBJECT_DELETE, GraphResources.delete_member_object,
                         (gid, uid))  # fmt: skip
    raise GraphError(400, "BadRequest", f"Unsupported request: {method} /{'/'.join(segments)}.")


def cost_of(route: RouteKind, request: GraphRequest, config: SandboxConfig) -> Cost:
    """What the request costs against the budgets."""
    top = request.query.get("$top") or ""
    writes = 1
    if route is RouteKind.GROUP_UPDATE and config.patch_write_cost is PatchWriteCost.MEMBER:
        writes = max(1, len(_binds_leniently(request.body)))
    return request_cost(
        request.method,
        users_collection=route is RouteKind.USERS,
        group_members=route is RouteKind.MEMBERS,
        select="$select" in request.query,
        expand="$expand" in request.query,
        top=int(top) if top.isdigit() else None,
        writes=writes,
    )


def _binds_leniently(body: bytes) -> list[object]:
    try:
        binds = json.loads(body or b"{}").get("members@odata.bind", [])
    except (ValueError, AttributeError):
        return []
    return binds if isinstance(binds, list) else []


class GraphResources:
    """The Graph resources over one directory; the caller holds the lock."""

    def __init__(self, directory: Directory, config: SandboxConfig, stats: Stats) -> None:
        self.directory = directory
        self.config = config
        self.stats = stats

    def answer(self, route: Route, request: GraphRequest) -> GraphAnswer:
        """Perform the route; Graph errors come back as answers."""
        try:
            return route.action(self, request, *route.args)
        except GraphError as exc:
            return exc.answer()

    def get_user(self, request: GraphRequest, key: str) -> GraphAnswer:
        """GET /users/{id-or-upn} and GET /users('{upn}')."""
        select = parse_select(request.query.get("$select"), USER_PROPERTIES, "user")
        user = self.directory.user(key)
        if user is None:
            raise not_found(key)
        context = _context(request, "users", select) + "/$entity"
        return _ok({"@odata.context": context, **_project(user, select, USER_DEFAULT_PROPERTIES)})

    def list_users(self, request: GraphRequest) -> GraphAnswer:
        """GET /users, optionally with `$filter=mail eq '...'`."""
        select = parse_select(request.query.get("$select"), USER_PROPERTIES, "user")
        expression = request.query.get("$filter")
        if expression is None:
            users = list(self.directory.users.values())
        else:
            users = self.directory.users_by_mail(parse_mail_filter(expression))
        return self._page(request, "users", users, select, USERS_PAGE_SIZE, with_type=False)

    def get_group(self, request: GraphRequest, gid: str) -> GraphAnswer:
        """GET /groups/{id}."""
        select = parse_select(request.query.get("$select"), GROUP_PROPERTIES, "group")
        group = self._group(gid)
        context = _context(request, "groups", select) + "/$entity"
        return _ok({"@odata.context": context, **_project(group, select, GROUP_DEFAULT_PROPERTIES)})

    def list_members(self, request: GraphRequest, gid: str) -> GraphAnswer:
        """GET /groups/{id}/members, paged with `$top` and `$skiptoken`."""
        select = parse_select(request.query.get("$select"), USER_PROPERTIES, "user")
        self._group(gid)
        users = [self.directory.users[uid] for uid in self.directory.members(gid)]
        return self._page(
            request, "directoryObjects", users, select, self.config.members_page_size, True
        )

    def add_member(self, request: GraphRequest, gid: str) -> GraphAnswer:
        """POST /groups/{id}/members/$ref."""
        uid = directory_object_id(request.json_body().get("@odata.id"))
        self._group(gid)
        self._user(uid)
        if self.directory.is_member(gid, uid):
            raise already_member()
        self.directory.add_member(gid, uid)
        self.stats.members_added += 1
        return GraphAnswer(204)

    def update_group(self, request: GraphRequest, gid: str) -> GraphAnswer:
        """PATCH /groups/{id} binding up to 20 members, all or nothing."""
        body = request.json_body()
        self._group(gid)
        others = set(body) - {"members@odata.bind"}
        if others:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"The sandbox only updates members@odata.bind, not {', '.join(sorted(others))}.",
            )
        binds = body.get("members@odata.bind")
        if not isinstance(binds, list) or not binds:
            raise GraphError(
                400, "BadRequest", "members@odata.bind must be a non-empty list of URLs."
            )
        if len(binds) > MAX_MEMBERS_PER_PATCH:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"The number of members to add ({len(binds)}) exceeds the limit of "
                f"{MAX_MEMBERS_PER_PATCH} per request.",
            )
        uids = [directory_object_id(url).lower() for url in binds]
        for uid in uids:
            self._user(uid)
        if len(set(uids)) < len(uids) or any(self.directory.is_member(gid, u) for u in uids):
            raise already_member()
        for uid in uids:
            self.directory.add_member(gid, uid)
        self.stats.members_added += len(uids)
        return GraphAnswer(204)

    def remove_member(self, request: GraphRequest, gid: str, uid: str) -> GraphAnswer:
        """DELETE /groups/{id}/members/{id}/$ref."""
        self._group(gid)
        if not is_guid(uid):
            raise invalid_id(uid)
        if not self.directory.is_member(gid, uid):
            raise not_found(uid)
        self.directory.remove_member(gid, uid)
        self.stats.members_removed += 1
        return GraphAnswer(204)

    def delete_member_object(self, request: GraphRequest, gid: str, uid: str) -> GraphAnswer:
        """DELETE /groups/{id}/members/{id} without /$ref: Graph deletes the user itself."""
        self._group(gid)
        if not is_guid(uid):
            raise invalid_id(uid)
        if not self.directory.is_member(gid, uid):
            raise not_found(uid)
        self.directory.delete_user(uid)
        self.stats.users_deleted += 1
        return GraphAnswer(204)

    def _group(self, gid: str) -> dict[str, Any]:
        if not is_guid(gid):
            raise invalid_id(gid)
        group = self.directory.group(gid)
        if group is None:
            raise not_found(gid)
        return group

    def _user(self, uid: str) -> dict[str, Any]:
        user = self.directory.user(uid)
        if user is None:
            raise not_found(uid)
        return user

    def _page(
        self,
        request: GraphRequest,
        entity_set: str,
        items: list[dict[str, Any]],
        select: list[str] | None,
        default_top: int,
        with_type: bool,
    ) -> GraphAnswer:
        top = parse_top(request.query.get("$top"), default_top, self.config.members_page_max)
        offset = decode_skiptoken(request.query.get("$skiptoken"))
        page = items[offset : offset + top]
        odata_type = {"@odata.type": USER_ODATA_TYPE} if with_type else {}
        body: dict[str, Any] = {
            "@odata.context": _context(request, entity_set, select),
            "value": [
                {**odata_type, **_project(item, select, USER_DEFAULT_PROPERTIES)} for item in page
            ],
        }
        if offset + top < len(items):
            query = {k: v for k, v in request.query.items() if k != "$skiptoken"}
            query["$skiptoken"] = encode_skiptoken(offset + top)
            path = "/".join(quote(segment, safe="") for segment in request.segments)
            link_query = urlencode(query, safe="$,'", quote_via=quote)
            body["@odata.nextLink"] = f"{request.base_url}/v1.0/{path}?{link_query}"
        return _ok(body)


def _ok(body: dict[str, Any]) -> GraphAnswer:
    return GraphAnswer(200, body)


def _context(request: GraphRequest, entity_set: str, select: list[str] | None) -> str:
    selection = f"({','.join(select)})" if select else ""
    return f"{request.base_url}/v1.0/$metadata#{entity_set}{selection}"


def _project(
    item: dict[str, Any], select: list[str] | None, defaults: tuple[str, ...]
) -> dict[str, Any]:
    return {name: item[name] for name in (select or defaults)}
