"""``kis-token status --fleet``: every app key a store holds (docs/observability.md).

Key ids come from :meth:`TokenStorage.fleet`; an app key given with its secret is shown in full.
No secret, whole app key or whole token is ever shown.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .crypto import key_id
from .events import app_key_label
from .ratelimit import resolve_calls_per_second
from .shared import APPROVAL_SUFFIX
from .storage.base import TokenStorage
from .token import mask

__all__ = ["fleet_report", "format_fleet"]


def fleet_report(storage: TokenStorage, credentials: Mapping[str, str | None]) -> dict[str, Any]:
    """What ``storage`` holds, per app key; ``credentials``: app keys to name, with their
    secrets (``None``: not found here, so the token stays sealed)."""
    view = storage.fleet()
    known = {key_id(key): key for key in credentials}
    approvals = {key_id(key + APPROVAL_SUFFIX): key for key in credentials}
    keys: list[dict[str, Any]] = []
    for ident, info in view.items():
        if ident in approvals:
            continue  # shown with its app key
        entry: dict[str, Any] = {"key_id": ident, "app_key": None, **info}
        api_key = known.get(ident)
        if api_key is not None:
            entry["app_key"] = app_key_label(api_key)
            entry["approval_key"] = key_id(api_key + APPROVAL_SUFFIX) in view
            secret = credentials[api_key]
            if secret is not None:
                entry.update(_unsealed(storage, api_key, secret))
        keys.append(entry)
    return {"storage": repr(storage), "app_keys": keys}


def _unsealed(storage: TokenStorage, api_key: str, secret: str) -> dict[str, Any]:
    token = storage.read_token(api_key, secret)  # the record itself: never waits on a lease
    info: dict[str, Any] = {"token": None}
    if token is not None:
        info["token"] = {
            "token": mask(token.access_token),
            "expires_kst": token.expired_kst,
            "seconds_left": int(token.expires_at - time.time()),
        }
    rate = resolve_calls_per_second(None, mock=False)
    if rate is not None:
        limiter = storage.rate_limiter(api_key, rate, api_secret=secret)
        slowed = limiter.slowdown_left_s()
        info["rate_limit"] = {
            "calls_per_second": rate / 2 if slowed > 0 else rate,
            "configured": rate,
            "slowed_down_s": round(slowed, 1),
            "shared_by": limiter.where,
        }
    return info


def format_fleet(report: Mapping[str, Any]) -> str:
    """The report as text: one block per app key."""
    lines = [f"storage: {report['storage']}"]
    if not report["app_keys"]:
        lines.append("no app key stored")
    for entry in report["app_keys"]:
        name = entry["app_key"] or "unknown here (give it with --api-key)"
        lines.append(f"app key {name} (key id {entry['key_id']})")
        lines.append(f"  records:  {', '.join(entry['records'])}")
        token = entry.get("token")
        if token is not None:
            hours, rest = divmod(max(0, token["seconds_left"]), 3600)
            expires = f"expires {token['expires_kst']} KST, {hours}h {rest // 60:02d}m left"
            lines.append(f"  token:    {token['token']}, {expires}")
        elif entry.get("token_ttl_s") is not None:
            lines.append(f"  token:    sealed, the store drops it in {entry['token_ttl_s']:.0f} s")
        if "approval_key" in entry:
            lines.append(f"  approval: {'stored' if entry['approval_key'] else 'none'}")
        held, since = entry.get("lock_held"), entry.get("lock_held_s")
        lock = "unknown" if held is None else ("held" if held else "free")
        lines.append(f"  lock:     {lock}" + (f" (for {since:.1f} s)" if since else ""))
        lines.append(f"  lease:    {'held or marked' if 'lease' in entry['records'] else 'none'}")
        rate = entry.get("rate_limit")
        if rate is not None:
            slowed = rate["slowed_down_s"]
            text = f"{rate['calls_per_second']:g} calls/s, shared by {rate['shared_by']}"
            text += f" (slowed to half after EGW00201 for {slowed:.0f} s more)" if slowed else ""
            lines.append(f"  rate:     {text}")
    return "\n".join(lines)
