"""Token storage backends."""

from .base import SealedTokenStorage, TokenStorage
from .factory import create_token_storage
from .file import FileTokenStorage
from .redis import LockedRedisTokenStorage, RedisTokenStorage

__all__ = [
    "FileTokenStorage",
    "LockedRedisTokenStorage",
    "RedisTokenStorage",
    "SealedTokenStorage",
    "TokenStorage",
    "create_token_storage",
]
