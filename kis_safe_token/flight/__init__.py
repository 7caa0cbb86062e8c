"""Single flight: the protocol once (:mod:`.engine`), the lock it drives (:mod:`.lock`), and the
two drivers that perform its steps (:mod:`.drivers`, blocking; :mod:`.aio`, asyncio)."""

from .engine import Flight, get_or_issue
from .lock import HELD, Busy, IssuanceLock, LocalIssuanceLock

__all__ = ["HELD", "Busy", "Flight", "IssuanceLock", "LocalIssuanceLock", "get_or_issue"]
