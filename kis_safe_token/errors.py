"""The errors this library raises: one base class and a few precise subclasses.

- KisTokenError
  - TokenStorageError
  - TokenIssueError
  - KisApiError
  - SecretNotFoundError (also a LookupError)
    - InsecureKeyringError
  - RealtimeError
    - RealtimeLimitError
"""

from __future__ import annotations

__all__ = [
    "InsecureKeyringError",
    "KisApiError",
    "KisTokenError",
    "RealtimeError",
    "RealtimeLimitError",
    "SecretNotFoundError",
    "TokenIssueError",
    "TokenStorageError",
]


class KisTokenError(Exception):
    """Base of every error this library raises."""


class TokenStorageError(KisTokenError):
    """The token store cannot be reached or used (Redis down, disk full, lock wait timed out)."""


class TokenIssueError(KisTokenError):
    """KIS refused to issue (or answered garbage to) a token request.

    ``code``: KIS's ``error_code`` / ``msg_cd``; ``status``: the HTTP status; ``retry_after_s``:
    when to ask again after a rate limit; ``local``: the failure is this host's own (its clock),
    so a storage keeps it to this process instead of sharing it with the fleet.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
        local: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after_s = retry_after_s
        self.local = local


class KisApiError(KisTokenError):
    """A KIS API call (other than token issuance) failed; carries ``msg_cd`` and HTTP status."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class SecretNotFoundError(KisTokenError, LookupError):
    """No api_secret was given and none could be found; the message says how to store one."""


class InsecureKeyringError(SecretNotFoundError):
    """The active keyring backend does not protect the api_secret, so it was not used.

    ``backend`` names it (``module.Class``, what ``PYTHON_KEYRING_BACKEND`` takes).
    """

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class RealtimeError(KisTokenError):
    """A realtime subscription was refused or not answered; ``code`` is KIS's ``msg_cd``."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RealtimeLimitError(RealtimeError):
    """The fleet's one session already holds KIS's 41 registrations: this pair was not added."""
