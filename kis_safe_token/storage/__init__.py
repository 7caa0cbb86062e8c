"""Token storage backends, and the protocol (:class:`TokenStorage`, :class:`IssuanceLock`) a
backend of your own implements."""

from ..failure import IssueFailure
from ..flight.lock import HELD, Attempt, Busy, IssuanceLock
from .base import SealedTokenStorage, TokenStorage
from .factory import create_token_storage
from .file import FileTokenStorage
from .redis import LockedRedisTokenStorage, RedisTokenStorage

__all__ = [
    "HELD",
    "Attempt",
    "Busy",
    "IssuanceLock",
    "IssueFailure",
    "FileTokenStorage",
    "LockedRedisTokenStorage",
    "RedisTokenStorage",
    "SealedTokenStorage",
    "TokenStorage",
    "create_token_storage",
]
