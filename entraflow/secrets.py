"""Encryption at rest for tokens and client secrets: Fernet keys from `ENTRAFLOW_SECRET_KEY`.

The setting may list several comma-separated keys, newest first: the first encrypts, every one
decrypts, so a key can be rotated in without losing what the old one encrypted.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from entraflow.settings import Settings

KEY_SEPARATOR = ","
MISSING_KEY_MESSAGE = (
    "ENTRAFLOW_SECRET_KEY is not set, and entraflow refuses to store tokens or secrets "
    "unencrypted: generate a key with `entraflow connect --generate-key` and set it"
)


class SecretKeyError(Exception):
    """Raised when no usable ENTRAFLOW_SECRET_KEY is set, or none of its keys opens a secret."""


def generate_key() -> str:
    """A new random key in the form ENTRAFLOW_SECRET_KEY takes."""
    return Fernet.generate_key().decode()


class SecretBox:
    """Encrypts with the newest key, decrypts with any listed key."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise SecretKeyError(MISSING_KEY_MESSAGE)
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.encode()))
            except ValueError:
                # Say which key is wrong, never what it holds.
                raise SecretKeyError(
                    f"key {position} of ENTRAFLOW_SECRET_KEY is not a Fernet key (32 url-safe "
                    "base64-encoded bytes): generate one with `entraflow connect --generate-key`"
                ) from None
        self._fernet = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for `settings.secret_key`; SecretKeyError when it is not set."""
        return cls(parse_keys(settings.secret_key))

    def encrypt(self, plaintext: str) -> str:
        """`plaintext` encrypted with the newest key."""
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        """The plaintext of `ciphertext`, encrypted with any listed key."""
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "no key in ENTRAFLOW_SECRET_KEY decrypts the stored secret: list the key it "
                "was stored with (after the new one), or connect again"
            ) from None

    def rotate(self, ciphertext: str) -> str:
        """`ciphertext` re-encrypted with the newest key."""
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "no key in ENTRAFLOW_SECRET_KEY decrypts the stored secret, so it cannot be "
                "re-encrypted: keep the old key listed after the new one"
            ) from None


def parse_keys(secret_key: SecretStr | None) -> list[str]:
    """The keys the setting lists, newest first."""
    if secret_key is None:
        return []
    return [
        key.strip() for key in secret_key.get_secret_value().split(KEY_SEPARATOR) if key.strip()
    ]
