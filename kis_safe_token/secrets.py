"""The api_secret in the OS keyring (service ``kis_safe_token``, user = the app key).

Resolution order for a client built with ``api_secret=None``: the keyring, then the environment
variable ``KOREA_INVESTMENT_API_SECRET`` (containers usually have no keyring daemon).
"""

from __future__ import annotations

import os

import keyring
import keyring.errors

from .errors import SecretNotFoundError

__all__ = [
    "KEYRING_SERVICE",
    "SECRET_ENV",
    "delete_api_secret",
    "get_api_secret",
    "resolve_api_secret",
    "set_api_secret",
]

KEYRING_SERVICE = "kis_safe_token"
SECRET_ENV = "KOREA_INVESTMENT_API_SECRET"

_HOW_TO_STORE = (
    "store it once with `kis-token secret set {app_key}` (it prompts for the secret), "
    "call kis_safe_token.set_api_secret(app_key, secret), pass api_secret=..., "
    f"or set the environment variable {SECRET_ENV}"
)
_HOW_TO_PICK_BACKEND = (
    "no usable keyring backend on this machine ({cause}); pick one with "
    "PYTHON_KEYRING_BACKEND (for a headless server, `pip install keyrings.alt` and "
    "PYTHON_KEYRING_BACKEND=keyrings.alt.file.EncryptedKeyring), or set {env}"
)


def _check_app_key(api_key: str) -> None:
    if not isinstance(api_key, str) or not api_key.strip():
        raise ValueError("api_key must be a non-empty string")


def _no_backend(exc: BaseException) -> SecretNotFoundError:
    return SecretNotFoundError(
        _HOW_TO_PICK_BACKEND.format(cause=type(exc).__name__, env=SECRET_ENV)
    )


def set_api_secret(api_key: str, secret: str) -> None:
    """Store ``secret`` for ``api_key`` in the OS keyring.

    Raises :class:`SecretNotFoundError` (with how to pick a backend) when there is no keyring.
    """
    _check_app_key(api_key)
    if not isinstance(secret, str) or not secret.strip():
        raise ValueError("secret must be a non-empty string")
    try:
        keyring.set_password(KEYRING_SERVICE, api_key, secret)
    except (keyring.errors.NoKeyringError, keyring.errors.KeyringError, RuntimeError) as exc:
        raise _no_backend(exc) from None


def _keyring_secret(api_key: str) -> str | None:
    try:
        return keyring.get_password(KEYRING_SERVICE, api_key)
    except (keyring.errors.NoKeyringError, keyring.errors.KeyringError, RuntimeError) as exc:
        raise _no_backend(exc) from None


def get_api_secret(api_key: str) -> str:
    """The api_secret stored for ``api_key`` in the keyring.

    Raises :class:`SecretNotFoundError` saying how to store one (or how to pick a backend).
    """
    _check_app_key(api_key)
    secret = _keyring_secret(api_key)
    if not secret:
        raise SecretNotFoundError(
            "no api_secret in the keyring for this app key: "
            + _HOW_TO_STORE.format(app_key=api_key)
        )
    return secret


def delete_api_secret(api_key: str) -> bool:
    """Remove the stored secret; ``False`` if there was none."""
    _check_app_key(api_key)
    try:
        keyring.delete_password(KEYRING_SERVICE, api_key)
    except keyring.errors.PasswordDeleteError:
        return False
    except (keyring.errors.NoKeyringError, keyring.errors.KeyringError, RuntimeError) as exc:
        raise _no_backend(exc) from None
    return True


def resolve_api_secret(api_key: str, api_secret: str | None = None) -> str:
    """The explicit secret, else the keyring's, else ``$KOREA_INVESTMENT_API_SECRET``."""
    if api_secret:
        return api_secret
    _check_app_key(api_key)
    backend_error: SecretNotFoundError | None = None
    try:
        secret = _keyring_secret(api_key)
    except SecretNotFoundError as exc:
        backend_error, secret = exc, None
    if secret:
        return secret
    from_env = os.environ.get(SECRET_ENV, "").strip()
    if from_env:
        return from_env
    if backend_error is not None:
        raise backend_error
    raise SecretNotFoundError(
        "no api_secret given and none in the keyring for this app key: "
        + _HOW_TO_STORE.format(app_key=api_key)
    )
