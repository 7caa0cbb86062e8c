"""The token record, KST expiry parsing and masking.

KIS's expiry is KST (UTC+9): read as local time, a server in UTC would trust a dead token for
nine hours, so everything here converts with an explicit offset (see docs/design.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "KST",
    "MARGIN_FRACTION",
    "REFRESH_MARGIN_S",
    "Token",
    "format_kst",
    "header_safe",
    "mask",
    "parse_kst",
]

KST = timezone(timedelta(hours=9), "KST")
KST_FORMAT = "%Y-%m-%d %H:%M:%S"
#: A token this close to its expiry is treated as expired: no request leaves with a dying one.
REFRESH_MARGIN_S = 300.0
#: A token living shorter than ``REFRESH_MARGIN_S / MARGIN_FRACTION`` is refreshed in the last
#: tenth of its life instead.
MARGIN_FRACTION = 0.1
#: KIS's answer is refused if the token expires sooner than this after it (already expired)...
MIN_LIFETIME_S = 1.0
#: ... or later than this (KIS's live a day: garbage, or this host's clock far behind).
MAX_LIFETIME_S = 366 * 86_400.0
#: 3000-01-01 00:00 UTC: within ``datetime``, every ``time_t`` and Redis TTLs, never overflowing.
MAX_EXPIRES_AT = 32_503_680_000.0

PAYLOAD_VERSION = 1

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def parse_kst(text: str) -> float:
    """Epoch seconds of a KIS ``YYYY-MM-DD HH:MM:SS`` KST timestamp; ``ValueError`` if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"expected a 'YYYY-MM-DD HH:MM:SS' KST string, got {type(text).__name__}")
    try:
        naive = datetime.strptime(text.strip(), KST_FORMAT)
    except ValueError:
        raise ValueError(f"not a 'YYYY-MM-DD HH:MM:SS' KST timestamp: {text[:40]!r}") from None
    return naive.replace(tzinfo=KST).timestamp()


_EPOCH_KST = datetime(1970, 1, 1, 9, tzinfo=KST)


def format_kst(epoch_s: float) -> str:
    """The KIS ``YYYY-MM-DD HH:MM:SS`` KST string of an epoch time; ``ValueError`` if out of
    the years 1 to 9999."""
    # Epoch arithmetic, not fromtimestamp(): no platform time_t limit (OverflowError, OSError).
    try:
        return (_EPOCH_KST + timedelta(seconds=epoch_s)).strftime(KST_FORMAT)
    except (OverflowError, ValueError):
        raise ValueError("epoch time out of the representable range") from None


def header_safe(value: object) -> bool:
    """Whether ``value`` is a non-empty string of visible ASCII, which travels unchanged in an
    HTTP header."""
    return isinstance(value, str) and _VISIBLE_ASCII.fullmatch(value) is not None


def mask(value: str | None, keep: int = 6) -> str:
    """A short, safe stand-in for a secret or token: its first few characters and its length."""
    if not value:
        return "<none>"
    shown = value[:keep] if len(value) > 2 * keep else ""
    return f"{shown}…({len(value)} chars)"


def _finite(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a finite number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite")
    return number


def _epoch(value: Any, name: str) -> float:
    number = _finite(value, name)
    if not 0.0 <= number <= MAX_EXPIRES_AT:
        raise ValueError(f"{name} must be an epoch time between 1970 and 3000")
    return number


@dataclass(frozen=True, slots=True)
class Token:
    """One KIS access token and when it expires (epoch seconds); ``issued_at`` if known.

    ``ValueError`` if the token is not :func:`header_safe` (after an optional ``Bearer ``), a
    time is not an epoch between 1970 and 3000, or ``issued_at`` is after ``expires_at``.
    """

    access_token: str
    expires_at: float
    token_type: str = "Bearer"
    issued_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.access_token, str) or not header_safe(
            self.access_token.removeprefix("Bearer ")
        ):
            raise ValueError(
                "access_token must be printable ASCII without spaces or control characters "
                "(it is sent in an HTTP header)"
            )
        expires_at = _epoch(self.expires_at, "expires_at")
        object.__setattr__(self, "expires_at", expires_at)
        if self.issued_at is not None:
            issued_at = _epoch(self.issued_at, "issued_at")
            if issued_at > expires_at:
                raise ValueError("issued_at must not be after expires_at")
            object.__setattr__(self, "issued_at", issued_at)

    def __repr__(self) -> str:
        return f"Token(access_token={mask(self.access_token)!r}, expires={self.expired_kst!r} KST)"

    __str__ = __repr__

    @property
    def expired_kst(self) -> str:
        """Expiry as KIS writes it: ``YYYY-MM-DD HH:MM:SS`` in KST."""
        return format_kst(self.expires_at)

    @property
    def bearer(self) -> str:
        """The ``authorization`` header value: ``Bearer <token>``."""
        return f"Bearer {self.access_token.removeprefix('Bearer ')}"

    def refresh_at(self, margin_s: float = REFRESH_MARGIN_S) -> float:
        """When to stop using the token: ``margin_s`` before its expiry, at most the last
        ``MARGIN_FRACTION`` of its life."""
        margin = margin_s
        if self.issued_at is not None:
            margin = min(margin_s, MARGIN_FRACTION * (self.expires_at - self.issued_at))
        return self.expires_at - margin

    def is_valid(self, now: float, margin_s: float = 0.0) -> bool:
        """Whether the token is still good at ``now`` (see :meth:`refresh_at`)."""
        return now < self.refresh_at(margin_s)

    # -- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_kis_response(cls, payload: Mapping[str, Any], *, now: float) -> Token:
        """Build from the JSON body of ``POST /oauth2/tokenP`` received at ``now`` (the KST
        expiry string wins over ``expires_in``). ``ValueError`` if unusable: no token, not
        header-safe, or living less than ``MIN_LIFETIME_S`` or more than ``MAX_LIFETIME_S``."""
        if not isinstance(payload, Mapping):
            raise ValueError("token response is not a JSON object")
        access_token = payload.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ValueError("token response has no access_token")
        expired = payload.get("access_token_token_expired")
        if expired is not None:
            expires_at = parse_kst(expired)
        elif payload.get("expires_in") is not None:
            # Whole seconds, never later than KIS said: the seed's token_data keeps an int.
            expires_at = math.floor(now + _finite(payload["expires_in"], "expires_in"))
        else:
            raise ValueError("token response has neither access_token_token_expired nor expires_in")
        lifetime = expires_at - now
        if not lifetime >= MIN_LIFETIME_S:
            raise ValueError(
                f"KIS issued an already-expired token (it expires {lifetime:+.6g} s from now)"
            )
        if lifetime > MAX_LIFETIME_S:
            raise ValueError(
                f"token response expires {lifetime / 86_400:.6g} days from now (KIS's live a day)"
            )
        token_type = payload.get("token_type") or "Bearer"
        return cls(access_token, expires_at, str(token_type), issued_at=now)

    @classmethod
    def from_token_data(cls, data: Mapping[str, Any]) -> Token:
        """Build from the seed's ``token_data`` dict (``timestamp`` or the KST string)."""
        if not isinstance(data, Mapping):
            raise ValueError("token_data must be a dict")
        if "access_token" not in data:
            raise ValueError("token_data has no access_token")
        if data.get("timestamp") is not None:
            expires_at = _finite(data["timestamp"], "timestamp")
        elif data.get("access_token_token_expired") is not None:
            expires_at = parse_kst(data["access_token_token_expired"])
        else:
            raise ValueError("token_data has neither timestamp nor access_token_token_expired")
        return cls(
            data["access_token"],
            expires_at,
            str(data.get("token_type") or "Bearer"),
            issued_at=data.get("issued_at"),
        )

    def to_token_data(self, api_key: str, api_secret: str) -> dict[str, Any]:
        """The seed's ``token_data`` dict for these credentials (plus ``issued_at`` if known)."""
        data: dict[str, Any] = {
            "access_token": self.access_token,
            "access_token_token_expired": self.expired_kst,
            "timestamp": int(self.expires_at),
            "token_type": self.token_type,
            "api_key": api_key,
            "api_secret": api_secret,
        }
        if self.issued_at is not None:
            data["issued_at"] = self.issued_at
        return data

    def to_payload(self, fingerprint: str) -> bytes:
        """The JSON that is encrypted at rest (no api_secret, a fingerprint instead)."""
        body = {
            "v": PAYLOAD_VERSION,
            "fp": fingerprint,
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
        }
        if self.issued_at is not None:
            body["issued_at"] = self.issued_at  # optional: payloads without it still open
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, raw: bytes) -> tuple[Token, str]:
        """Inverse of :meth:`to_payload`: the token and its fingerprint; ``ValueError`` if bad."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("payload is not JSON") from None
        if not isinstance(body, dict) or body.get("v") != PAYLOAD_VERSION:
            raise ValueError("payload has an unknown format version")
        fingerprint = body.get("fp")
        if not isinstance(fingerprint, str):
            raise ValueError("payload has no fingerprint")
        token = cls(
            body.get("access_token", ""),
            body.get("expires_at", "nan"),
            str(body.get("token_type")),
            issued_at=body.get("issued_at"),
        )
        return token, fingerprint
