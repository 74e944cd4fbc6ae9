"""Graph permissions: the scope a token asks for, and what each action needs of the grant."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from entraflow.settings import check_transport, is_loopback_host

# The public cloud's Graph, and the sandbox's, which stands in for it on loopback. Every other
# Graph host (the national clouds: graph.microsoft.us, dod-graph.microsoft.us,
# microsoftgraph.chinacloudapi.cn) is its own resource, with its own `.default` scope.
PUBLIC_GRAPH_SCOPE = "https://graph.microsoft.com/.default"
DEFAULT_SCOPE_SUFFIX = "/.default"

# The least-privileged delegated Graph permission of each action (GRAPH.md).
LEAST_PRIVILEGE_BY_ACTION = {
    "lookup_user": "User.Read.All",
    "lookup_group": "GroupMember.Read.All",
    "add_user_to_group": "GroupMember.ReadWrite.All",
    "remove_member_from_group": "GroupMember.ReadWrite.All",
}
_GROUP_WRITERS = frozenset(
    {"GroupMember.ReadWrite.All", "Group.ReadWrite.All", "Directory.ReadWrite.All"}
)
# Graph accepts a more privileged permission in place of the least one: any of these will do.
SUFFICIENT_PERMISSIONS_BY_ACTION = {
    "lookup_user": frozenset(
        {"User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"}
    ),
    "lookup_group": _GROUP_WRITERS
    | {"GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"},
    "add_user_to_group": _GROUP_WRITERS,
    "remove_member_from_group": _GROUP_WRITERS,
}
# Asked besides the permissions: without it Entra issues no refresh token.
OFFLINE_ACCESS = "offline_access"
# Sign-in scopes Entra lists in its answer; they grant nothing in the directory.
SIGN_IN_SCOPES = frozenset({"openid", "profile", "email", OFFLINE_ACCESS})


def scope_for_graph(graph_url: str) -> str:
    """The `.default` scope of the Graph at `graph_url`: its cloud's, or the public one (sandbox).

    A host we do not know gets its own scope too: Entra then refuses it (`invalid_scope`) or
    issues a token for that resource alone, never one that opens the public Graph.
    """
    parts = urlsplit(check_transport(graph_url, "the Graph URL"))
    host = (parts.hostname or "").removesuffix(".")
    # Plain http reaches only the sandbox (loopback, or a host ENTRAFLOW_PLAIN_HTTP_HOSTS names).
    if is_loopback_host(host) or parts.scheme.lower() == "http":
        return PUBLIC_GRAPH_SCOPE
    # An address literal keeps its brackets; a port or user:password never belongs to a scope.
    resource_host = f"[{host}]" if ":" in host else host
    return f"https://{resource_host}{DEFAULT_SCOPE_SUFFIX}"


def graph_resource(graph_url: str) -> str:
    """The Graph resource scopes are prefixed with, e.g. `https://graph.microsoft.com/`."""
    return scope_for_graph(graph_url).removesuffix(DEFAULT_SCOPE_SUFFIX) + "/"


def delegated_scopes(graph_url: str) -> list[str]:
    """The scopes to ask a signing-in account for: least privilege for every action."""
    resource = graph_resource(graph_url)
    permissions = sorted(set(LEAST_PRIVILEGE_BY_ACTION.values()))
    return [resource + permission for permission in permissions] + [OFFLINE_ACCESS]


def permission_name(scope: str) -> str:
    """`User.Read.All` for `https://graph.microsoft.com/User.Read.All` (any resource) or itself."""
    if "://" in scope:
        return scope.rsplit("/", 1)[-1]
    return scope


@dataclass(frozen=True)
class ScopeReview:
    """Granted permissions against the actions' needs."""

    granted: tuple[str, ...]
    # Each disabled action and the least-privileged permission it lacks.
    missing: dict[str, str]
    # Granted Graph permissions no action needs.
    extra: tuple[str, ...]

    @property
    def available_actions(self) -> list[str]:
        """The actions the granted permissions allow."""
        return [action for action in LEAST_PRIVILEGE_BY_ACTION if action not in self.missing]

    @property
    def has_refresh(self) -> bool:
        """Whether `offline_access` was granted, so the connection outlives its access token."""
        return OFFLINE_ACCESS in {scope.lower() for scope in self.granted}


def review_scopes(granted: Iterable[str]) -> ScopeReview:
    """Which actions the granted scopes allow, and which granted permissions exceed the need."""
    names = tuple(permission_name(scope) for scope in granted)
    # Entra compares permission names without regard to case.
    lowered = {name.lower() for name in names}
    missing = {
        action: LEAST_PRIVILEGE_BY_ACTION[action]
        for action, sufficient in SUFFICIENT_PERMISSIONS_BY_ACTION.items()
        if not lowered & {name.lower() for name in sufficient}
    }
    needed = {name.lower() for name in LEAST_PRIVILEGE_BY_ACTION.values()}
    extra = tuple(
        name for name in names if name.lower() not in needed and name.lower() not in SIGN_IN_SCOPES
    )
    return ScopeReview(names, missing, extra)
