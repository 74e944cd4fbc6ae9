"""The one active connection to Entra: who entraflow acts as, and its secrets, encrypted.

Only ciphertext is stored here; `entraflow.secrets` encrypts and decrypts it. Token updates are
compare-and-set on the refresh token they replace, so a stale writer can never undo a refresh.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import StrEnum

from sqlalchemy import update
from sqlmodel import Field, SQLModel, delete, select

from models.db import Timestamp, session_scope, utcnow

# There is at most one connection: it always has this primary key.
ACTIVE_CONNECTION_ID = 1
SCOPE_SEPARATOR = " "


class ConnectionKind(StrEnum):
    DELEGATED = "delegated"  # a (service) account signed in: authorization code with PKCE
    APP = "app"  # the app itself: client credentials


class ConnectionStatus(StrEnum):
    CONNECTED = "connected"
    # The refresh token was refused (revoked, expired): nothing works until `entraflow connect`.
    BROKEN = "broken"


class Connection(SQLModel, table=True):
    """The stored connection; the `*_ciphertext` columns hold Fernet tokens, never plaintext."""

    __tablename__ = "connection"

    id: int = Field(default=ACTIVE_CONNECTION_ID, primary_key=True)
    kind: ConnectionKind
    tenant_id: str
    client_id: str
    account_upn: str | None = None
    # Space-separated, as the token endpoint granted them (empty for an app: Entra does not say).
    scopes: str = ""
    refresh_token_ciphertext: str | None = None
    client_secret_ciphertext: str | None = None
    access_token_ciphertext: str | None = None
    access_token_expires_at: datetime | None = Field(default=None, sa_type=Timestamp)
    # When a worker should refresh: the expiry minus the refresh margin.
    access_token_refresh_at: datetime | None = Field(default=None, sa_type=Timestamp)
    connected_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    status: ConnectionStatus = ConnectionStatus.CONNECTED
    broken_reason: str | None = None

    @property
    def scope_list(self) -> list[str]:
        """The granted scopes."""
        return self.scopes.split()


def load_connection(database_url: str) -> Connection | None:
    """The active connection, if there is one."""
    with session_scope(database_url) as session:
        return session.get(Connection, ACTIVE_CONNECTION_ID)


def save_connection(database_url: str, connection: Connection) -> Connection:
    """Make `connection` the active one, replacing any other."""
    connection.id = ACTIVE_CONNECTION_ID
    with session_scope(database_url) as session:
        session.exec(delete(Connection))
        session.add(connection)
    return connection


def delete_connection(database_url: str) -> bool:
    """Forget the active connection and its secrets; whether there was one."""
    with session_scope(database_url) as session:
        result = session.exec(delete(Connection))
        return bool(result.rowcount)


def replace_tokens(
    database_url: str,
    *,
    used_refresh_ciphertext: str,
    refresh_ciphertext: str,
    access_ciphertext: str,
    expires_at: datetime,
    refresh_at: datetime,
    scopes: str,
) -> bool:
    """Store a refresh's tokens in one statement, unless another refresh already did."""
    with session_scope(database_url) as session:
        result = session.exec(
            update(Connection)
            .where(
                Connection.id == ACTIVE_CONNECTION_ID,  # type: ignore[arg-type]
                Connection.refresh_token_ciphertext == used_refresh_ciphertext,  # type: ignore[arg-type]
            )
            .values(
                refresh_token_ciphertext=refresh_ciphertext,
                access_token_ciphertext=access_ciphertext,
                access_token_expires_at=expires_at,
                access_token_refresh_at=refresh_at,
                scopes=scopes,
            )
        )
        return bool(result.rowcount)


def mark_broken(database_url: str, reason: str, *, used_refresh_ciphertext: str) -> bool:
    """Mark the connection broken, unless its refresh token has changed since it was used."""
    with session_scope(database_url) as session:
        result = session.exec(
            update(Connection)
            .where(
                Connection.id == ACTIVE_CONNECTION_ID,  # type: ignore[arg-type]
                Connection.refresh_token_ciphertext == used_refresh_ciphertext,  # type: ignore[arg-type]
            )
            .values(
                status=ConnectionStatus.BROKEN,
                broken_reason=reason,
                # A broken connection keeps no usable token.
                access_token_ciphertext=None,
                access_token_expires_at=None,
                access_token_refresh_at=None,
            )
        )
        return bool(result.rowcount)


def reencrypt_connection(database_url: str, rotate: Callable[[str], str]) -> bool:
    """Re-encrypt every stored secret with `rotate` (the newest key); whether there was one."""
    with session_scope(database_url) as session:
        connection = session.exec(select(Connection).with_for_update()).first()
        if connection is None:
            return False
        for column in (
            "refresh_token_ciphertext",
            "client_secret_ciphertext",
            "access_token_ciphertext",
        ):
            ciphertext = getattr(connection, column)
            if ciphertext is not None:
                setattr(connection, column, rotate(ciphertext))
        session.add(connection)
        return True
