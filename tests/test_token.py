from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from kis_safe_token.token import Token, format_kst, mask, parse_kst

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + "a" * 200


def test_kst_expiry_is_nine_hours_ahead_of_utc() -> None:
    epoch = parse_kst("2025-01-05 09:30:00")
    assert datetime.fromtimestamp(epoch, timezone.utc) == datetime(
        2025, 1, 5, 0, 30, tzinfo=timezone.utc
    )
    assert format_kst(epoch) == "2025-01-05 09:30:00"


@pytest.mark.parametrize("tz", ["UTC", "America/Los_Angeles", "Asia/Seoul"])
def test_expiry_is_the_same_instant_whatever_the_host_timezone(tz: str) -> None:
    code = (
        "import json, time\n"
        "from kis_safe_token.token import Token\n"
        "t = Token.from_kis_response({'access_token': 'x'*40, "
        "'access_token_token_expired': '2025-01-05 09:30:00', 'expires_in': 86400}, now=0)\n"
        "data = t.to_token_data('k', 's')\n"
        "print(json.dumps([t.expires_at, time.strftime('%Z'), data['timestamp']]))\n"
    )
    env = {**os.environ, "TZ": tz}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    expires_at, zone, timestamp = json.loads(out.stdout)
    assert expires_at == 1736037000.0  # 2025-01-05 00:30:00 UTC
    assert timestamp == 1736037000
    if tz == "UTC":
        assert zone == "UTC"


def test_kis_response_without_kst_string_uses_expires_in() -> None:
    token = Token.from_kis_response({"access_token": TOKEN, "expires_in": 86400}, now=1000.0)
    assert token.expires_at == 87400.0


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"access_token": ""},
        {"access_token": TOKEN},
        {"access_token": TOKEN, "access_token_token_expired": "tomorrow"},
        {"access_token": TOKEN, "access_token_token_expired": "2025-13-45 99:00:00"},
        {"access_token": TOKEN, "expires_in": "soon"},
        {"access_token": TOKEN, "expires_in": float("nan")},
        {"access_token": 12345, "expires_in": 10},
    ],
)
def test_unusable_kis_response_is_a_value_error(payload: dict) -> None:
    with pytest.raises(ValueError):
        Token.from_kis_response(payload, now=0)


def test_seed_token_data_round_trip() -> None:
    token = Token(TOKEN, parse_kst("2030-01-01 00:00:00"))
    data = token.to_token_data("key", "secret")
    assert data["access_token_token_expired"] == "2030-01-01 00:00:00"
    assert data["timestamp"] == int(token.expires_at)
    assert data["api_key"] == "key" and data["api_secret"] == "secret"
    assert Token.from_token_data(data) == token


def test_refresh_margin_makes_a_nearly_expired_token_invalid() -> None:
    token = Token(TOKEN, 1000.0)
    assert token.is_valid(699.0, margin_s=300)
    assert not token.is_valid(701.0, margin_s=300)
    assert not token.is_valid(1000.0)


def test_bearer_prefix_is_never_doubled() -> None:
    assert Token("abc" * 10, 1.0).bearer == "Bearer " + "abc" * 10
    assert Token("Bearer " + "abc" * 10, 1.0).bearer == "Bearer " + "abc" * 10


def test_repr_and_mask_never_show_the_token() -> None:
    token = Token(TOKEN, 2e9)
    assert TOKEN not in repr(token) and TOKEN not in str(token)
    assert TOKEN[20:40] not in repr(token)
    assert mask(TOKEN) == f"eyJ0eX…({len(TOKEN)} chars)"
    assert mask("short") == "…(5 chars)"
