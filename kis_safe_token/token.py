"""The token record, KST expiry parsing and masking.

KIS states a token's expiry as ``YYYY-MM-DD HH:MM:SS`` in Korea Standard Time (UTC+9, no DST).
Reading that string as the host's local time is the classic bug: a server in UTC would then
trust a dead token for nine hours. Everything here converts with an explicit KST offset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["KST", "REFRESH_MARGIN_S", "Token", "format_kst", "mask", "parse_kst"]

KST = timezone(timedelta(hours=9), "KST")
KST_FORMAT = "%Y-%m-%d %H:%M:%S"
REFRESH_MARGIN_S = 300.0
"""A token this close to its expiry is treated as expired, so that no request leaves with a
token that dies on the way."""

PAYLOAD_VERSION = 1


def parse_kst(text: str) -> float:
    """Epoch seconds of a KIS ``YYYY-MM-DD HH:MM:SS`` KST timestamp; ``ValueError`` if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"expected a 'YYYY-MM-DD HH:MM:SS' KST string, got {type(text).__name__}")
    try:
        naive = datetime.strptime(text.strip(), KST_FORMAT)
    except ValueError:
        raise ValueError(f"not a 'YYYY-MM-DD HH:MM:SS' KST timestamp: {text[:40]!r}") from None
    return naive.replace(tzinfo=KST).timestamp()


def format_kst(epoch_s: float) -> str:
    """The KIS ``YYYY-MM-DD HH:MM:SS`` KST string of an epoch time."""
    return datetime.fromtimestamp(epoch_s, KST).strftime(KST_FORMAT)


def mask(value: str | None, keep: int = 6) -> str:
    """A short, safe stand-in for a secret or token: its first few characters and its length."""
    if not value:
        return "<none>"
    shown = value[:keep] if len(value) > 2 * keep else ""
    return f"{shown}…({len(value)} chars)"


def _finite(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite")
    return number


@dataclass(frozen=True, slots=True)
class Token:
    """One KIS access token and when it expires (epoch seconds, UTC-based)."""

    access_token: str
    expires_at: float
    token_type: str = "Bearer"

    def __post_init__(self) -> None:
        if not isinstance(self.access_token, str) or not self.access_token.strip():
            raise ValueError("access_token must be a non-empty string")
        if any(c in self.access_token for c in "\r\n"):
            raise ValueError("access_token must not contain line breaks")
        object.__setattr__(self, "expires_at", _finite(self.expires_at, "expires_at"))

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
        if self.access_token.startswith("Bearer "):
            return self.access_token
        return f"Bearer {self.access_token}"

    def is_valid(self, now: float, margin_s: float = 0.0) -> bool:
        """Whether the token is still good at ``now`` with ``margin_s`` to spare."""
        return now < self.expires_at - margin_s

    # -- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_kis_response(cls, payload: Mapping[str, Any], *, now: float) -> Token:
        """Build from the JSON body of ``POST /oauth2/tokenP``; ``ValueError`` if it is unusable.

        The KST ``access_token_token_expired`` string is authoritative; ``expires_in`` is used
        only when the string is missing.
        """
        if not isinstance(payload, Mapping):
            raise ValueError("token response is not a JSON object")
        access_token = payload.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ValueError("token response has no access_token")
        expired = payload.get("access_token_token_expired")
        if expired is not None:
            expires_at = parse_kst(expired)
        elif payload.get("expires_in") is not None:
            expires_at = now + _finite(payload["expires_in"], "expires_in")
        else:
            raise ValueError("token response has neither access_token_token_expired nor expires_in")
        token_type = payload.get("token_type") or "Bearer"
        return cls(access_token, expires_at, str(token_type))

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
        return cls(data["access_token"], expires_at, str(data.get("token_type") or "Bearer"))

    def to_token_data(self, api_key: str, api_secret: str) -> dict[str, Any]:
        """The seed's ``token_data`` dict for these credentials."""
        return {
            "access_token": self.access_token,
            "access_token_token_expired": self.expired_kst,
            "timestamp": int(self.expires_at),
            "token_type": self.token_type,
            "api_key": api_key,
            "api_secret": api_secret,
        }

    def to_payload(self, fingerprint: str) -> bytes:
        """The JSON that is encrypted at rest (no api_secret, a fingerprint instead)."""
        body = {
            "v": PAYLOAD_VERSION,
            "fp": fingerprint,
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
        }
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
            body.get("access_token", ""), body.get("expires_at", "nan"), str(body.get("token_type"))
        )
        return token, fingerprint
