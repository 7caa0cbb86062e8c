"""The record of a failed issuance, shared with the fleet so that an outage costs KIS a few calls.

Stored (sealed) next to the token by the lock holder that failed; everyone re-raises it until its
hold ends, the hold doubling per consecutive failure (5, 10, 20, 30 s). A success clears it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

from .errors import TokenIssueError

__all__ = ["FAILURE_HOLD_MAX_S", "FAILURE_HOLD_S", "IssueFailure"]

#: How long the first failure is re-raised to everyone before somebody asks KIS again.
FAILURE_HOLD_S: Final = 5.0
#: The hold doubles per consecutive failure up to this.
FAILURE_HOLD_MAX_S: Final = 30.0
#: A failure older than its hold by this much no longer counts towards the next hold.
FAILURE_MEMORY_S: Final = 120.0

PAYLOAD_KIND = "issue-failure"
_FIELDS = ("message", "code", "status", "at", "hold_s", "count")  # stored, in this order


@dataclass(frozen=True, slots=True)
class IssueFailure:
    """An issuance failed at ``at`` (epoch s); callers re-raise it for ``hold_s`` seconds."""

    message: str
    code: str | None
    status: int | None
    at: float
    hold_s: float
    count: int = 1
    local: bool = False
    """This host's own failure (its clock): kept in memory, never stored for the fleet."""

    @classmethod
    def after(cls, exc: TokenIssueError, now: float, previous: IssueFailure | None) -> IssueFailure:
        """The record of ``exc``, its hold doubled if ``previous`` is a recent failure."""
        count = 1
        if previous is not None and now < previous.at + previous.hold_s + FAILURE_MEMORY_S:
            count = previous.count + 1
        hold = min(FAILURE_HOLD_MAX_S, FAILURE_HOLD_S * 2 ** min(count - 1, 16))
        return cls(str(exc)[:300], exc.code, exc.status, now, hold, count, exc.local)

    def active(self, now: float) -> bool:
        """Whether callers should still re-raise it instead of asking KIS."""
        # A record stamped ahead of our clock (a writer whose clock runs fast) counts only within
        # a hold's length of it, so a far-off writer cannot block us for long.
        return self.at - FAILURE_HOLD_S <= now < self.at + self.hold_s

    @property
    def ttl_s(self) -> float:
        """How long a store must keep the record (its hold, then its memory)."""
        return self.hold_s + FAILURE_MEMORY_S

    def error(self, now: float) -> TokenIssueError:
        """The error a caller raises while the failure is active."""
        left = max(0.0, self.at + self.hold_s - now)
        return TokenIssueError(
            f"{self.message} (the last issuance attempt failed {max(0.0, now - self.at):.0f} s "
            f"ago; the next one in {left:.0f} s)",
            code=self.code,
            status=self.status,
            local=self.local,
        )

    def to_payload(self, fingerprint: str) -> bytes:
        body = {"v": 1, "kind": PAYLOAD_KIND, "fp": fingerprint}
        body.update((name, getattr(self, name)) for name in _FIELDS)
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, raw: bytes) -> tuple[IssueFailure, str]:
        """Inverse of :meth:`to_payload`; ``ValueError`` if ``raw`` is not a failure record."""
        try:
            body: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("payload is not JSON") from None
        if not isinstance(body, dict) or body.get("kind") != PAYLOAD_KIND or body.get("v") != 1:
            raise ValueError("payload is not a failure record")
        fp = body.get("fp")
        message, code, status, at, hold, count = (body.get(k) for k in _FIELDS)
        if not (
            isinstance(fp, str)
            and isinstance(message, str)
            and (code is None or isinstance(code, str))
            and (status is None or isinstance(status, int))
            and isinstance(count, int)
            and count >= 1
            and isinstance(at, (int, float))
            and math.isfinite(at)
            and isinstance(hold, (int, float))
            and 0 <= hold <= FAILURE_HOLD_MAX_S
        ):
            raise ValueError("failure record is malformed")
        return cls(message, code, status, float(at), float(hold), count), fp
