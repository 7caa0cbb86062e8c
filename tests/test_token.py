from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kis_safe_token.token import REFRESH_MARGIN_S, Token, format_kst, mask, parse_kst

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + "a" * 200
NOW = 1_736_000_000.0  # 2025-01-04 23:13:20 KST


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
        "'access_token_token_expired': '2025-01-05 09:30:00', 'expires_in': 86400}, "
        "now=1736000000)\n"
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
        # already expired, or dead within a second: re-issued on every access if accepted
        pytest.param(
            {"access_token": TOKEN, "access_token_token_expired": format_kst(NOW - 3600)},
            id="kst-expiry-in-the-past",
        ),
        pytest.param(
            {"access_token": TOKEN, "access_token_token_expired": format_kst(NOW)},
            id="kst-expiry-now",
        ),
        pytest.param({"access_token": TOKEN, "expires_in": 0}, id="expires_in-0"),
        pytest.param({"access_token": TOKEN, "expires_in": 0.5}, id="expires_in-half-second"),
        pytest.param({"access_token": TOKEN, "expires_in": -86400}, id="expires_in-negative"),
        pytest.param({"access_token": TOKEN, "expires_in": -1e300}, id="expires_in-minus-1e300"),
        # beyond any real lifetime, or beyond what datetime / time_t can represent
        pytest.param(
            {"access_token": TOKEN, "access_token_token_expired": "2999-01-01 00:00:00"},
            id="kst-expiry-year-2999",
        ),
        pytest.param(
            {"access_token": TOKEN, "access_token_token_expired": "9999-12-31 23:59:59"},
            id="kst-expiry-year-9999",
        ),
        pytest.param({"access_token": TOKEN, "expires_in": 400 * 86400}, id="expires_in-400-days"),
        pytest.param({"access_token": TOKEN, "expires_in": 1e300}, id="expires_in-1e300"),
        pytest.param({"access_token": TOKEN, "expires_in": 10**400}, id="expires_in-10**400"),
        pytest.param({"access_token": TOKEN, "expires_in": float("inf")}, id="expires_in-inf"),
        # cannot be sent in an HTTP header
        pytest.param({"access_token": "토큰" * 20, "expires_in": 86400}, id="token-hangul"),
        pytest.param({"access_token": "\u00e9" * 40, "expires_in": 86400}, id="token-latin-1"),
        pytest.param({"access_token": TOKEN + "\x00", "expires_in": 86400}, id="token-nul"),
        pytest.param(
            {"access_token": TOKEN[:20] + " " + TOKEN[20:], "expires_in": 86400}, id="token-space"
        ),
        pytest.param({"access_token": TOKEN + "\t", "expires_in": 86400}, id="token-tab"),
        pytest.param({"access_token": TOKEN + "\x7f", "expires_in": 86400}, id="token-del"),
        pytest.param({"access_token": "Bearer ", "expires_in": 86400}, id="token-bearer-only"),
    ],
)
def test_unusable_kis_response_is_a_value_error(payload: dict) -> None:
    with pytest.raises(ValueError):
        Token.from_kis_response(payload, now=NOW)


kis_payloads = st.fixed_dictionaries(
    {},
    optional={
        "access_token": st.sampled_from([TOKEN, "Bearer " + TOKEN, "", " "])
        | st.text(max_size=30)
        | st.integers(),
        "access_token_token_expired": st.floats(-1e12, 1e12).map(
            lambda d: format_kst(NOW + d) if -NOW < d < 1e10 else str(d)
        )
        | st.text(max_size=25),
        "expires_in": st.integers() | st.floats() | st.text(max_size=8) | st.none(),
        "token_type": st.text(max_size=8) | st.none(),
    },
)


@settings(max_examples=300, deadline=None)
@given(kis_payloads, st.floats(0, 4e9))
def test_any_kis_response_is_a_value_error_or_a_usable_token(payload: dict, now: float) -> None:
    try:
        token = Token.from_kis_response(payload, now=now)
    except ValueError:
        return
    assert token.is_valid(now) and token.is_valid(now, REFRESH_MARGIN_S)
    token.bearer.encode("ascii")
    assert token.to_token_data("k", "s")["access_token_token_expired"] == token.expired_kst
    assert Token.from_payload(token.to_payload("fp")) == (token, "fp")


@pytest.mark.parametrize(
    "access_token",
    ["토큰" * 20, "\u00e9" * 40, TOKEN + "\x00", "a b" * 10, TOKEN + "\x1b", " "],
    ids=["hangul", "latin-1", "nul", "spaces", "escape", "blank"],
)
def test_token_that_cannot_go_in_an_http_header_is_a_value_error(access_token: str) -> None:
    with pytest.raises(ValueError, match="access_token") as info:
        Token(access_token, NOW + 86400)
    assert len(access_token) < 8 or access_token[:8] not in str(info.value)


@pytest.mark.parametrize(
    "expires_at",
    [1e300, -1.0, 1e13, float("nan"), 10**400],
    ids=["1e300", "negative", "year-318857", "nan", "10**400"],
)
def test_expiry_out_of_range_is_a_value_error_not_an_overflow(expires_at: float) -> None:
    with pytest.raises(ValueError, match="expires_at"):
        Token(TOKEN, expires_at)
    with pytest.raises(ValueError):
        Token.from_token_data({"access_token": TOKEN, "timestamp": expires_at})


@pytest.mark.parametrize("epoch", [1e300, -1e300, 1e13, float("inf"), float("nan")])
def test_format_kst_of_an_unrepresentable_time_is_a_value_error(epoch: float) -> None:
    with pytest.raises(ValueError):
        format_kst(epoch)


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


def test_short_lived_token_is_refreshed_in_the_last_tenth_of_its_life() -> None:
    short = Token(TOKEN, NOW + 120, issued_at=NOW)
    assert short.refresh_at(300) == NOW + 108
    assert short.is_valid(NOW + 107, 300) and not short.is_valid(NOW + 109, 300)
    day = Token(TOKEN, NOW + 86_400, issued_at=NOW)
    assert day.refresh_at(300) == NOW + 86_100  # the full margin when the token lives long
    unknown = Token(TOKEN, NOW + 120)  # issued when? (an old payload): the full margin
    assert unknown.refresh_at(300) == NOW - 180 and not unknown.is_valid(NOW, 300)


def test_kis_response_records_when_the_token_was_issued() -> None:
    token = Token.from_kis_response({"access_token": TOKEN, "expires_in": 120}, now=NOW)
    assert token.issued_at == NOW
    assert token.is_valid(NOW + 100, REFRESH_MARGIN_S)


def test_issued_at_round_trips_and_old_payloads_still_open() -> None:
    token = Token(TOKEN, NOW + 120, issued_at=NOW)
    assert Token.from_payload(token.to_payload("fp")) == (token, "fp")
    assert Token.from_token_data(token.to_token_data("k", "s")) == token
    old = json.dumps(
        {"v": 1, "fp": "fp", "access_token": TOKEN, "token_type": "Bearer", "expires_at": NOW}
    ).encode()
    assert Token.from_payload(old) == (Token(TOKEN, NOW), "fp")
    assert "issued_at" not in Token(TOKEN, NOW).to_token_data("k", "s")  # the seed's shape


@pytest.mark.parametrize("issued_at", [NOW + 121, float("nan"), 1e300, "soon"])
def test_issued_at_after_expiry_or_not_a_time_is_a_value_error(issued_at: object) -> None:
    with pytest.raises(ValueError, match="issued_at"):
        Token(TOKEN, NOW + 120, issued_at=issued_at)  # type: ignore[arg-type]


def test_bearer_prefix_is_never_doubled() -> None:
    assert Token("abc" * 10, 1.0).bearer == "Bearer " + "abc" * 10
    assert Token("Bearer " + "abc" * 10, 1.0).bearer == "Bearer " + "abc" * 10


def test_repr_and_mask_never_show_the_token() -> None:
    token = Token(TOKEN, 2e9)
    assert TOKEN not in repr(token) and TOKEN not in str(token)
    assert TOKEN[20:40] not in repr(token)
    assert mask(TOKEN) == f"eyJ0eX…({len(TOKEN)} chars)"
    assert mask("short") == "…(5 chars)"
