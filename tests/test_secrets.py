"""Encryption at rest: Fernet keys from ENTRAFLOW_SECRET_KEY, refusal without one, rotation."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from entraflow.secrets import SecretBox, SecretKeyError, generate_key, parse_keys
from entraflow.settings import Settings
from models.connections import (
    Connection,
    ConnectionKind,
    load_connection,
    reencrypt_connection,
    save_connection,
)
from models.db import get_engine

PLAINTEXT = "refresh-token-0123456789"


def test_encryption_round_trips_and_hides_the_plaintext() -> None:
    box = SecretBox([generate_key()])

    ciphertext = box.encrypt(PLAINTEXT)

    assert PLAINTEXT not in ciphertext
    assert box.decrypt(ciphertext) == PLAINTEXT


def test_without_a_key_nothing_can_be_encrypted() -> None:
    settings = Settings(_env_file=None, secret_key=None)  # type: ignore[call-arg]

    with pytest.raises(SecretKeyError, match="entraflow connect --generate-key"):
        SecretBox.from_settings(settings)


def test_a_malformed_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(SecretKeyError, match="key 2") as raised:
        SecretBox([generate_key(), "not-a-fernet-key"])

    assert "not-a-fernet-key" not in str(raised.value)


def test_the_setting_lists_keys_newest_first() -> None:
    new, old = generate_key(), generate_key()

    assert parse_keys(SecretStr(f" {new} , {old} ")) == [new, old]


def test_old_ciphertext_stays_readable_with_the_old_key_listed_second() -> None:
    old, new = generate_key(), generate_key()
    ciphertext = SecretBox([old]).encrypt(PLAINTEXT)

    assert SecretBox([new, old]).decrypt(ciphertext) == PLAINTEXT
    with pytest.raises(SecretKeyError, match="no key"):
        SecretBox([new]).decrypt(ciphertext)


def test_rotate_re_encrypts_with_the_newest_key() -> None:
    old, new = generate_key(), generate_key()
    ciphertext = SecretBox([old]).encrypt(PLAINTEXT)

    rotated = SecretBox([new, old]).rotate(ciphertext)

    assert SecretBox([new]).decrypt(rotated) == PLAINTEXT


def test_rotating_the_stored_connection_re_encrypts_every_secret(database_url: str) -> None:
    old, new = generate_key(), generate_key()
    old_box = SecretBox([old])
    save_connection(
        database_url,
        Connection(
            kind=ConnectionKind.DELEGATED,
            tenant_id="t",
            client_id="c",
            refresh_token_ciphertext=old_box.encrypt("refresh-secret"),
            access_token_ciphertext=old_box.encrypt("access-secret"),
        ),
    )

    assert reencrypt_connection(database_url, SecretBox([new, old]).rotate)

    stored = load_connection(database_url)
    assert stored is not None
    assert SecretBox([new]).decrypt(stored.refresh_token_ciphertext or "") == "refresh-secret"
    assert SecretBox([new]).decrypt(stored.access_token_ciphertext or "") == "access-secret"
    with get_engine(database_url).connect() as connection:
        raw = str(connection.execute(text("SELECT * FROM connection")).all())
    assert "refresh-secret" not in raw and "access-secret" not in raw
