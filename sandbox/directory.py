"""The in-memory tenant: users, groups and memberships, seeded the same way on every run."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Final

# The sandbox's one tenant, app and secret: fixed so demos and tests can hard-code them.
SANDBOX_TENANT_ID: Final = "7f6c1a52-3d4e-4b8a-9c1f-5e2d8a0b4c61"
SANDBOX_CLIENT_ID: Final = "0b9e2d4c-6a1f-4e3b-8d5c-2f7a9e1b3c58"
SANDBOX_CLIENT_SECRET: Final = "sandbox-secret-not-for-production"
# The tenant's verified domain; the token endpoint accepts it in place of the tenant id.
SANDBOX_DOMAIN: Final = "contoso.example"
# Every seeded id is uuid5(SEED_NAMESPACE, key): stable across runs and machines.
SEED_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_DNS, f"sandbox.{SANDBOX_DOMAIN}")

# The properties Graph returns for a user when the request has no `$select`.
USER_DEFAULT_PROPERTIES: Final = (
    "businessPhones",
    "displayName",
    "givenName",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
    "id",
)
GROUP_DEFAULT_PROPERTIES: Final = (
    "id",
    "displayName",
    "description",
    "mail",
    "mailEnabled",
    "mailNickname",
    "securityEnabled",
    "groupTypes",
)


def seed_id(key: str) -> str:
    """The stable object id of the seeded object named `key`."""
    return str(uuid.uuid5(SEED_NAMESPACE, key))


@dataclass(frozen=True)
class SeedUser:
    """A well-known user every sandbox starts with."""

    key: str
    display_name: str
    given_name: str | None
    surname: str | None
    upn: str
    mail: str | None
    job_title: str | None = None
    department: str | None = None
    user_type: str = "Member"

    @property
    def id(self) -> str:
        """The user's object id."""
        return seed_id(f"user:{self.key}")


@dataclass(frozen=True)
class SeedGroup:
    """A well-known group every sandbox starts with, and the keys of its seeded members."""

    key: str
    display_name: str
    description: str
    mail: str | None
    mail_enabled: bool
    security_enabled: bool
    member_keys: tuple[str, ...] = ()
    # Whether every bulk user (`SandboxConfig.bulk_users`) is also a member.
    includes_bulk_users: bool = False

    @property
    def id(self) -> str:
        """The group's object id."""
        return seed_id(f"group:{self.key}")


_D = SANDBOX_DOMAIN

DEMO_USERS: Final[dict[str, SeedUser]] = {
    u.key: u
    for u in (
        SeedUser("adele", "Adele Vance", "Adele", "Vance", f"adele.vance@{_D}",
                 f"adele.vance@{_D}", "Sales Manager", "Sales"),
        # A new sales hire, not yet in the Sales Team: the demo adds and removes them.
        SeedUser("nestor", "Nestor Wilke", "Nestor", "Wilke", f"nestor.wilke@{_D}",
                 f"nestor.wilke@{_D}", "Account Executive", "Sales"),
        SeedUser("megan", "Megan Bowen", "Megan", "Bowen", f"megan.bowen@{_D}",
                 f"megan.bowen@{_D}", "Marketing Manager", "Marketing"),
        SeedUser("lee", "Lee Gu", "Lee", "Gu", f"lee.gu@{_D}", f"lee.gu@{_D}",
                 "Contractor", "Engineering"),
        # A UPN starting with `$` can only be addressed as /users('$svc@...').
        SeedUser("svc", "Sync Service", None, None, f"$svc@{_D}", None),
        # A B2B guest: `#` must be percent-encoded in the path.
        SeedUser("guest", "Alex Wilber (Fabrikam)", "Alex", "Wilber",
                 f"alex_fabrikam.com#EXT#@{_D}", "alex@fabrikam.com", user_type="Guest"),
        # A quote in the mail: OData literals must double it.
        SeedUser("obrien", "Pat O'Brien", "Pat", "O'Brien", f"pat.obrien@{_D}",
                 f"o'brien@{_D}", "Engineer", "Engineering"),
        # A plus in the mail: the query must encode it as %2B, or Graph reads a space.
        SeedUser("kim", "Kim Akers", "Kim", "Akers", f"kim.akers@{_D}", f"kim+ops@{_D}",
                 "Operations Lead", "Operations"),
        # Two users sharing one mail: a lookup by mail is ambiguous.
        SeedUser("diego", "Diego Siciliani", "Diego", "Siciliani", f"diego.siciliani@{_D}",
                 f"team@{_D}", "Support Engineer", "Support"),
        SeedUser("isaiah", "Isaiah Langer", "Isaiah", "Langer", f"isaiah.langer@{_D}",
                 f"team@{_D}", "Support Engineer", "Support"),
    )
}  # fmt: skip

DEMO_GROUPS: Final[dict[str, SeedGroup]] = {
    g.key: g
    for g in (
        SeedGroup("sales", "Sales Team", "Everyone who sells.", f"sales@{_D}", True, True,
                  ("adele",)),
        SeedGroup("engineering", "Engineering", "Builders of things.", None, False, True,
                  ("lee", "obrien")),
        SeedGroup("support", "Support", "The support desk.", f"support@{_D}", True, False,
                  ("diego", "isaiah", "kim")),
        SeedGroup("falcon", "Project Falcon", "A new project with no members yet.", None,
                  False, True),
        SeedGroup("all-staff", "All Staff", "Every employee, bulk users included.",
                  f"allstaff@{_D}", True, True,
                  ("adele", "nestor", "megan", "lee", "obrien", "kim", "diego", "isaiah"),
                  includes_bulk_users=True),
    )
}  # fmt: skip


# The user and group of the demo flow and the CLI tests: the user is not yet a member.
DEMO_USER_ID: Final = DEMO_USERS["nestor"].id
DEMO_USER_UPN: Final = DEMO_USERS["nestor"].upn
DEMO_GROUP_ID: Final = DEMO_GROUPS["sales"].id


def bulk_user_upn(n: int) -> str:
    """The UPN (and mail) of bulk user number `n`, counting from 1."""
    return f"user{n}@{SANDBOX_DOMAIN}"


def bulk_user_id(n: int) -> str:
    """The object id of bulk user number `n`."""
    return seed_id(f"bulk:{n}")


@dataclass
class Directory:
    """Users, groups and memberships of the sandbox tenant; not thread-safe on its own."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Members per group id, in insertion order so pages are stable.
    memberships: dict[str, dict[str, None]] = field(default_factory=dict)
    _by_upn: dict[str, str] = field(default_factory=dict)

    @classmethod
    def seeded(cls, bulk_users: int = 0) -> Directory:
        """The seed tenant plus `bulk_users` users `user{n}@contoso.example`."""
        directory = cls()
        for seed in DEMO_USERS.values():
            directory.add_user(
                seed.id,
                upn=seed.upn,
                display_name=seed.display_name,
                given_name=seed.given_name,
                surname=seed.surname,
                mail=seed.mail,
                job_title=seed.job_title,
                department=seed.department,
                user_type=seed.user_type,
            )
        for n in range(1, bulk_users + 1):
            directory.add_user(
                bulk_user_id(n),
                upn=bulk_user_upn(n),
                display_name=f"User {n}",
                given_name="User",
                surname=str(n),
                mail=bulk_user_upn(n),
            )
        for group in DEMO_GROUPS.values():
            directory.groups[group.id] = {
                "id": group.id,
                "displayName": group.display_name,
                "description": group.description,
                "mail": group.mail,
                "mailEnabled": group.mail_enabled,
                "mailNickname": group.key,
                "securityEnabled": group.security_enabled,
                "groupTypes": ["Unified"] if group.mail_enabled else [],
            }
            members = dict.fromkeys(DEMO_USERS[key].id for key in group.member_keys)
            if group.includes_bulk_users:
                members.update(dict.fromkeys(bulk_user_id(n) for n in range(1, bulk_users + 1)))
            directory.memberships[group.id] = members
        return directory

    def add_group(self, group_id: str, display_name: str) -> None:
        """Add an empty security group (not mail-enabled)."""
        group_id = group_id.lower()
        self.groups[group_id] = {
            "id": group_id,
            "displayName": display_name,
            "description": None,
            "mail": None,
            "mailEnabled": False,
            "mailNickname": display_name.lower().replace(" ", "-"),
            "securityEnabled": True,
            "groupTypes": [],
        }
        self.memberships[group_id] = {}

    def add_user(
        self,
        user_id: str,
        *,
        upn: str,
        display_name: str,
        given_name: str | None = None,
        surname: str | None = None,
        mail: str | None = None,
        job_title: str | None = None,
        department: str | None = None,
        user_type: str = "Member",
    ) -> None:
        """Create a user with Graph's property names."""
        self.users[user_id] = {
            "id": user_id,
            "businessPhones": [],
            "displayName": display_name,
            "givenName": given_name,
            "surname": surname,
            "mail": mail,
            "mobilePhone": None,
            "officeLocation": None,
            "preferredLanguage": None,
            "userPrincipalName": upn,
            "jobTitle": job_title,
            "department": department,
            "userType": user_type,
            "accountEnabled": True,
        }
        self._by_upn[upn.lower()] = user_id

    def user(self, id_or_upn: str) -> dict[str, Any] | None:
        """The user with this object id or UPN (case-insensitive), if any."""
        found = self.users.get(id_or_upn.lower())
        if found is not None:
            return found
        user_id = self._by_upn.get(id_or_upn.lower())
        return None if user_id is None else self.users[user_id]

    def users_by_mail(self, mail: str) -> list[dict[str, Any]]:
        """Every user whose mail equals `mail`, ignoring case as Graph does."""
        wanted = mail.lower()
        return [u for u in self.users.values() if (u["mail"] or "").lower() == wanted]

    def group(self, group_id: str) -> dict[str, Any] | None:
        """The group with this object id, if any."""
        return self.groups.get(group_id.lower())

    def members(self, group_id: str) -> list[str]:
        """The member ids of a group, in the order they were added."""
        return list(self.memberships.get(group_id.lower(), {}))

    def is_member(self, group_id: str, user_id: str) -> bool:
        """Whether the user is a direct member of the group."""
        return user_id.lower() in self.memberships.get(group_id.lower(), {})

    def add_member(self, group_id: str, user_id: str) -> None:
        """Make the user a member; the caller has checked both exist."""
        self.memberships[group_id.lower()][user_id.lower()] = None

    def remove_member(self, group_id: str, user_id: str) -> None:
        """End a membership; the caller has checked it exists."""
        del self.memberships[group_id.lower()][user_id.lower()]

    def delete_user(self, user_id: str) -> None:
        """Delete the user object and every membership it had."""
        user = self.users.pop(user_id.lower())
        del self._by_upn[user["userPrincipalName"].lower()]
        for members in self.memberships.values():
            members.pop(user_id.lower(), None)
