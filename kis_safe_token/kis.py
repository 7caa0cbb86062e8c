"""What KIS is: its hosts, paths, error codes and limits, written once for the client and the
simulator."""

from __future__ import annotations

from typing import Final

__all__ = [
    "HTTP_TIMEOUT_S",
    "ISSUE_WINDOW_S",
    "REAL_BASE_URL",
    "VIRTUAL_BASE_URL",
]

REAL_BASE_URL: Final = "https://openapi.koreainvestment.com:9443"
VIRTUAL_BASE_URL: Final = "https://openapivts.koreainvestment.com:29443"

#: KIS allows one token issuance per app key per minute (``EGW00133`` otherwise); a holder that
#: meets ``EGW00133`` sits out this long (a second more than the minute, for clock granularity).
ISSUE_WINDOW_S: Final = 61.0

#: The client's default (connect, read) timeout of one KIS call, in seconds.
HTTP_TIMEOUT_S: Final = (3.05, 10.0)
