"""Kept for old imports only: the keyring functions live in :mod:`kis_safe_token.keyring_secrets`.

This module shared its name with the standard library's :mod:`secrets`. It re-exports the same
objects, so ``from kis_safe_token.secrets import resolve_api_secret`` keeps working for one
release; import from ``kis_safe_token`` or ``kis_safe_token.keyring_secrets`` instead.
"""

from __future__ import annotations

from .keyring_secrets import (
    ALLOW_INSECURE_KEYRING_ENV,
    ENCRYPTED_FILE_KEYRINGS,
    KEYRING_SERVICE,
    SECRET_ENV,
    delete_api_secret,
    get_api_secret,
    resolve_api_secret,
    set_api_secret,
)

__all__ = [
    "ALLOW_INSECURE_KEYRING_ENV",
    "ENCRYPTED_FILE_KEYRINGS",
    "KEYRING_SERVICE",
    "SECRET_ENV",
    "delete_api_secret",
    "get_api_secret",
    "resolve_api_secret",
    "set_api_secret",
]
