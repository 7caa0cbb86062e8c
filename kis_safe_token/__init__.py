"""kis_safe_token: one KIS Open API access token, shared safely by a fleet of processes."""

from .auth import KisAuth
from .client import KoreaInvestment
from .errors import (
    InsecureKeyringError,
    KisApiError,
    KisTokenError,
    SecretNotFoundError,
    TokenIssueError,
    TokenStorageError,
)
from .keyring_secrets import delete_api_secret, get_api_secret, set_api_secret
from .shared import SharedToken
from .storage import (
    FileTokenStorage,
    LockedRedisTokenStorage,
    RedisTokenStorage,
    TokenStorage,
    create_token_storage,
)
from .token import Token

__version__ = "0.1.0"

__all__ = [
    "FileTokenStorage",
    "InsecureKeyringError",
    "KisApiError",
    "KisAuth",
    "KisTokenError",
    "KoreaInvestment",
    "LockedRedisTokenStorage",
    "RedisTokenStorage",
    "SecretNotFoundError",
    "SharedToken",
    "Token",
    "TokenIssueError",
    "TokenStorage",
    "TokenStorageError",
    "create_token_storage",
    "delete_api_secret",
    "get_api_secret",
    "set_api_secret",
]
