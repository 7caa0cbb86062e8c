"""Token storage backends."""

from ..flight.lock import Busy, IssuanceLock
from .base import SealedTokenStorage, TokenStorage
from .factory import create_token_storage
from .file import FileTokenStorage
from .redis import LockedRedisTokenStorage, RedisTokenStorage

__all__ = [
    "Busy",
    "IssuanceLock",
    "FileTokenStorage",
    "LockedRedisTokenStorage",
    "RedisTokenStorage",
    "SealedTokenStorage",
    "TokenStorage",
    "create_token_storage",
]
