"""kis_safe_token.kis's answer classifier (one verdict per KIS answer, for every client) and the
reading of tokenP answers it serves (oauth.py): the clock-skew failure is this host's own in
every integration, and a KIS that cannot be reached is named by host, port and cause."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from conftest import APP_KEY, SECRET

from kis_safe_token import AsyncKoreaInvestment, FileTokenStorage, KoreaInvestment, TokenIssueError
from kis_safe_token.kis import Verdict, verdict, verdict_of
from kis_safe_token.oauth import token_from
from kis_safe_token.token import format_kst

DAY_S = 86_400.0

ANSWERS: dict[str, tuple[Mapping[str, Any] | None, int | None, Verdict]] = {
    "rest-success": ({"rt_cd": "0", "msg_cd": "MCA00000", "msg1": "정상처리"}, 200, Verdict.OK),
    "token-success": ({"access_token": "x", "expires_in": 86400}, 200, Verdict.OK),
    "approval-success": ({"approval_key": "k"}, 200, Verdict.OK),
    "json-without-status": ({"rt_cd": "0"}, None, Verdict.OK),
    "expired": ({"rt_cd": "1", "msg_cd": "EGW00123", "msg1": "..."}, 500, Verdict.TOKEN_REJECTED),
    "invalid": ({"rt_cd": "1", "msg_cd": "EGW00121", "msg1": "..."}, 500, Verdict.TOKEN_REJECTED),
    "expired-by-message": (
        {"rt_cd": "1", "msg_cd": "", "msg1": "기간이 만료된 token 입니다."},
        None,
        Verdict.TOKEN_REJECTED,
    ),
    "issue-refused": (
        {"error_code": "EGW00133", "error_description": "1분당 1회"},
        403,
        Verdict.ISSUE_REFUSED,
    ),
    "too-many-calls": ({"rt_cd": "1", "msg_cd": "EGW00201"}, 500, Verdict.TOO_MANY_CALLS),
    "too-many-calls-json-only": ({"msg_cd": "EGW00201"}, None, Verdict.TOO_MANY_CALLS),
    "business-error": ({"rt_cd": "7", "msg_cd": "KIOK0560", "msg1": "없음"}, 200, Verdict.OTHER),
    "bad-secret": ({"error_code": "EGW00105", "error_description": "x"}, 403, Verdict.OTHER),
    "not-json": (None, 502, Verdict.OTHER),
    "gateway-500": ({}, 500, Verdict.OTHER),
}


@pytest.mark.parametrize("name", ANSWERS)
def test_every_answer_has_exactly_one_verdict(name: str) -> None:
    payload, status, expected = ANSWERS[name]
    assert verdict(payload, status) is expected


def _requests_response(status: int, body: bytes) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body
    return resp


@pytest.mark.parametrize("name", [n for n, (p, s, _) in ANSWERS.items() if p and s])
def test_http_answers_read_as_their_json(name: str) -> None:
    import json

    payload, status, expected = ANSWERS[name]
    assert status is not None
    body = json.dumps(payload, ensure_ascii=False).encode()
    assert verdict_of(_requests_response(status, body)) is expected
    assert verdict_of(httpx.Response(status, content=body)) is expected


class _Undecodable(requests.Response):
    def json(self, **kwargs: Any) -> Any:
        pytest.fail("a success naming no KIS code was decoded")


def test_a_success_is_classified_without_decoding_its_json() -> None:
    resp = _Undecodable()
    resp.status_code = 200
    resp._content = b'{"rt_cd":"0","output":{"stck_prpr":"70000"}}'
    assert verdict_of(resp) is Verdict.OK


def test_a_streamed_success_is_left_unread() -> None:
    resp = _Undecodable()
    resp.status_code = 200
    resp._content = False  # reading it would consume the stream
    assert verdict_of(resp, stream=True) is Verdict.OK


# -- tokenP answers and the host's clock ----------------------------------------------------------
def _token_answer(now: float) -> dict[str, Any]:
    return {
        "access_token": "eyJ" + "a" * 40,
        "token_type": "Bearer",
        "expires_in": 86400,
        "access_token_token_expired": format_kst(now + DAY_S),
    }


def test_a_token_usable_only_by_kis_clock_is_clock_skew() -> None:
    kis_now = time.time()
    answer = _token_answer(kis_now)
    ahead = kis_now + 3 * DAY_S
    assert verdict(answer, 200, now=ahead, kis_now=kis_now) is Verdict.CLOCK_SKEW
    assert verdict(answer, 200, now=kis_now + 2, kis_now=kis_now) is Verdict.OK
    with pytest.raises(TokenIssueError, match="clock") as info:
        token_from(200, answer, kis_now, clock=lambda: ahead, rate_limit_wait_s=61)
    assert info.value.local
    with pytest.raises(TokenIssueError, match="unusable") as unknown:
        token_from(200, answer, None, clock=lambda: ahead, rate_limit_wait_s=61)
    assert not unknown.value.local  # without KIS's Date the clock cannot be blamed


def test_kis_trader_keeps_a_clock_skew_failure_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host clock 3 days ahead: the failure is this process's (as in the core client), so a
    healthy process on the same store is not held back by it."""
    from upstream_herd import UPSTREAM_APP_KEY, UPSTREAM_SECRET, require_client, upstream_simulator

    require_client("kis_trader", min_python=(3, 11))
    from kis_trader._internal import _endpoints
    from kis_trader.errors import KISAuthError

    from kis_safe_token.integrations.kis_trader import TokenManager

    def ahead() -> float:
        return time.time() + 3 * DAY_S

    path = tmp_path / "token.json"
    with upstream_simulator(issue_window_s=0, issue_latency_s=0) as sim:
        for environment in ("real", "paper"):
            monkeypatch.setitem(_endpoints._BASE_URL_BY_ENVIRONMENT, environment, sim.base_url)
        skewed = TokenManager(
            app_key=UPSTREAM_APP_KEY,
            app_secret=UPSTREAM_SECRET,
            environment="real",
            token_storage=FileTokenStorage(path, clock=ahead),
            clock=ahead,
        )
        with pytest.raises(KISAuthError, match="clock") as info:
            skewed.access_token()
        cause = info.value.__cause__
        assert isinstance(cause, TokenIssueError) and cause.local
        healthy = TokenManager(
            app_key=UPSTREAM_APP_KEY,
            app_secret=UPSTREAM_SECRET,
            environment="real",
            token_storage=FileTokenStorage(path),
        )
        assert healthy.access_token()
        assert sim.issued == 2


# -- KIS unreachable -------------------------------------------------------------------------------
@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


def test_an_unreachable_kis_is_named_by_host_port_and_cause(
    closed_port: int, token_path: Path
) -> None:
    with pytest.raises(TokenIssueError) as info:
        KoreaInvestment(
            APP_KEY,
            SECRET,
            token_storage=FileTokenStorage(token_path),
            base_url=f"http://127.0.0.1:{closed_port}",
        )
    message = str(info.value)
    assert message.startswith(f"KIS token request to 127.0.0.1:{closed_port} failed: ")
    assert "connection refused" in message and SECRET not in message


def test_an_unreachable_kis_is_named_from_asyncio_too(closed_port: int, token_path: Path) -> None:
    async def main() -> None:
        async with AsyncKoreaInvestment(
            APP_KEY,
            SECRET,
            token_storage=FileTokenStorage(token_path),
            base_url=f"http://127.0.0.1:{closed_port}",
        ):
            pass

    with pytest.raises(TokenIssueError) as info:
        asyncio.run(main())
    message = str(info.value)
    assert f"127.0.0.1:{closed_port} failed: connection refused" in message
    assert SECRET not in message
