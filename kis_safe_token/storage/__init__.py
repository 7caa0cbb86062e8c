"""Token storage backends, and the protocol a backend of your own implements: a
:class:`TokenStorage` whose ``issuance_lock`` returns an :class:`IssuanceLock` (``attempt`` answers
:data:`HELD`, a token or failure already stored, or :class:`Busy`)."""

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
