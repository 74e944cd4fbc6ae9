"""A local stand-in for Microsoft Graph v1.0 and the identity platform's token endpoint."""

from sandbox.app import SandboxApp
from sandbox.config import PatchWriteCost, SandboxConfig
from sandbox.directory import (
    DEMO_GROUP_ID,
    DEMO_GROUPS,
    DEMO_USER_ID,
    DEMO_USER_UPN,
    DEMO_USERS,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SANDBOX_DOMAIN,
    SANDBOX_TENANT_ID,
    SeedGroup,
    SeedUser,
    bulk_user_id,
)
from sandbox.faults import FaultRule
from sandbox.responses import SandboxResponse
from sandbox.server import SandboxServer
from sandbox.transport import IN_PROCESS_URL, SandboxAdapter

__all__ = [
    "DEMO_GROUPS",
    "DEMO_GROUP_ID",
    "DEMO_USERS",
    "DEMO_USER_ID",
    "DEMO_USER_UPN",
    "IN_PROCESS_URL",
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "SANDBOX_DOMAIN",
    "SANDBOX_TENANT_ID",
    "FaultRule",
    "PatchWriteCost",
    "SandboxAdapter",
    "SandboxApp",
    "SandboxConfig",
    "SandboxResponse",
    "SandboxServer",
    "SeedGroup",
    "SeedUser",
    "bulk_user_id",
]
