from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import APP_KEY, SECRET

from kis_safe_token import (
    FileTokenStorage,
    KisApiError,
    KoreaInvestment,
    LockedRedisTokenStorage,
    SharedToken,
    TokenIssueError,
    TokenStorageError,
)
from kis_safe_token.kis import ISSUE_WINDOW_ENV
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import format_kst

DAY_S = 86_400.0


def client(sim: KisSimulator, token_path: Path, **kwargs) -> KoreaInvestment:
    return KoreaInvestment(
        APP_KEY,
        SECRET,
        "50000000-01",
        token_storage=FileTokenStorage(token_path),
        base_url=sim.base_url,
        **kwargs,
    )


def test_fetch_price_sends_the_kis_headers_and_returns_the_json(
    sim: KisSimulator, token_path: Path
) -> None:
    with client(sim, token_path) as broker:
        assert broker.access_token.startswith("Bearer ")
        quote = broker.fetch_price("005930")
    assert quote["rt_cd"] == "0"
    assert quote["output"]["stck_shrn_iscd"] == "005930"
    assert sim.issued == 1 and sim.counts["price_requests"] == 1


def test_token_is_checked_in_memory_without_touching_storage(
    sim: KisSimulator, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = client(sim, token_path)
    storage = broker.token_storage
    monkeypatch.setattr(storage, "get_or_issue", lambda *a: pytest.fail("storage touched"))
    monkeypatch.setattr(storage, "load_token", lambda *a: pytest.fail("storage touched"))
    for _ in range(100):
        assert broker.access_token.startswith("Bearer ")


def test_token_near_expiry_is_refreshed_through_the_store(
    sim: KisSimulator, token_path: Path
) -> None:
    now = [time.time()]
    broker = client(sim, token_path, clock=lambda: now[0])
    first = broker.access_token
    now[0] = broker.token.expires_at - 100  # inside the refresh margin
    broker.token_storage.clock = lambda: now[0]
    sim.expire_tokens()
    assert broker.access_token != first
    assert sim.issued == 2


def test_seed_methods_on_the_client(sim: KisSimulator, token_path: Path) -> None:
    broker = client(sim, token_path)
    assert broker.check_access_token()
    other = client(sim, token_path)
    other.load_access_token()
    assert other.access_token == broker.access_token
    assert sim.issued == 1
    sim.expire_tokens()  # opens the one-minute window for the forced issue
    forced = broker.issue_access_token(force=True)
    assert forced.bearer != other.access_token
    assert sim.issued == 2 and sim.rate_limited == 0


def test_expired_token_at_kis_is_replaced_once_and_the_call_retried(
    sim: KisSimulator, token_path: Path
) -> None:
    broker = client(sim, token_path)
    old = broker.access_token
    sim.expire_tokens()
    assert broker.fetch_price("000660")["rt_cd"] == "0"
    assert sim.counts["EGW00123"] == 1
    assert sim.issued == 2
    assert broker.access_token != old


def test_revoke_drops_the_token_everywhere(sim: KisSimulator, token_path: Path) -> None:
    broker = client(sim, token_path)
    broker.revoke_access_token()
    assert sim.counts["revoke_requests"] == 1
    assert not broker.check_access_token()
    sim.expire_tokens()  # let the next issue through the one-minute window
    assert broker.fetch_price("005930")["rt_cd"] == "0"
    assert sim.issued == 2


def test_wrong_secret_is_a_token_issue_error_with_kis_code(
    sim: KisSimulator, token_path: Path
) -> None:
    with pytest.raises(TokenIssueError) as info:
        KoreaInvestment(
            APP_KEY,
            "wrong-secret",
            token_storage=FileTokenStorage(token_path),
            base_url=sim.base_url,
        )
    assert info.value.code == "EGW00105"
    assert info.value.status == 403
    assert "wrong-secret" not in str(info.value)


def issue_elsewhere(sim: KisSimulator) -> None:
    """Someone else (a process that died after KIS answered) issued within the window."""
    answer = requests.post(
        f"{sim.base_url}/oauth2/tokenP",
        timeout=5,
        json={"grant_type": "client_credentials", "appkey": APP_KEY, "appsecret": SECRET},
    )
    assert answer.status_code == 200


def test_rate_limited_issue_backs_off_rechecks_and_retries(token_path: Path) -> None:
    # The window ends with the first refusal, not after a second of wall clock: the client's
    # first ask is refused and its ask after the sit-out issued, however loaded the machine.
    with KisSimulator(apps={APP_KEY: SECRET}, refusals_per_window=1, issue_latency_s=0) as sim:
        issue_elsewhere(sim)
        started = time.monotonic()
        broker = client(sim, token_path, rate_limit_wait_s=1.1)
        assert broker.fetch_price("005930")["rt_cd"] == "0"
        assert sim.rate_limited == 1
        assert sim.issued == 2
        assert 1.0 <= time.monotonic() - started < 10


NOWHERE = "http://127.0.0.1:9"  # never called: these clients are only built


def test_a_short_wait_is_accepted_and_noted_once_per_store(
    token_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A web request with a 5 s budget may say so: the trade-off is logged, not refused.
    storage = FileTokenStorage(token_path, wait_timeout=5)
    with caplog.at_level(logging.INFO, logger="kis_safe_token"):
        for _ in range(2):
            SharedToken(APP_KEY, SECRET, storage, base_url=NOWHERE)
    notes = [r.getMessage() for r in caplog.records if "shorter than a holder" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("FileTokenStorage: wait_timeout 5.0 s")
    assert "KIS issue window 61.0 s" in notes[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kis_safe_token"):  # the default covers it: silent
        SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=NOWHERE)
    assert not [r for r in caplog.records if "shorter than a holder" in r.getMessage()]
    for nonsense in (0, -1, float("nan"), float("inf"), 10**9):
        with pytest.raises(ValueError, match="wait_timeout"):
            FileTokenStorage(token_path, wait_timeout=nonsense)


def test_a_short_waiter_gives_up_holding_nothing_while_the_holder_goes_on(
    token_path: Path,
) -> None:
    """The holder meets EGW00133 and sits out the window holding the lock; a caller with a
    0.5 s budget raises TokenStorageError saying so, and the fleet still issues once."""
    with KisSimulator(apps={APP_KEY: SECRET}, refusals_per_window=1, issue_latency_s=0) as sim:
        issue_elsewhere(sim)
        answers: list[object] = []

        def hold() -> None:
            answers.append(client(sim, token_path, rate_limit_wait_s=3.0).fetch_price("005930"))

        thread = threading.Thread(target=hold)
        thread.start()
        short = FileTokenStorage(token_path, wait_timeout=0.5)
        try:
            assert sim.wait_for(lambda s: s.rate_limited == 1)  # the holder is sitting it out
            started = time.monotonic()
            with pytest.raises(TokenStorageError) as info:
                KoreaInvestment(APP_KEY, SECRET, token_storage=short, base_url=sim.base_url)
            assert time.monotonic() - started < 5
            message = str(info.value)
            assert "wait_timeout" in message and "EGW00133" in message
            assert "holds nothing" in message and "tokens.json" in message
            assert sim.issued == 1  # the waiter never asked KIS
        finally:
            thread.join(30)
        assert answers and answers[0]["rt_cd"] == "0"  # type: ignore[index]
        assert sim.issued == 2 and sim.rate_limited == 1  # elsewhere, then the holder: once
        waiter = KoreaInvestment(APP_KEY, SECRET, token_storage=short, base_url=sim.base_url)
        assert waiter.fetch_price("005930")["rt_cd"] == "0"  # the holder's token
        assert sim.issued == 2


def test_the_issue_window_is_a_setting(token_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KIS (a simulator, a gateway) with a short window: the client sits out what the
    environment says, not 61 s. (The simulator's window ends with its first refusal, so the
    sit-out measured is the client's own.)"""
    monkeypatch.setenv(ISSUE_WINDOW_ENV, "1.5")
    with KisSimulator(apps={APP_KEY: SECRET}, refusals_per_window=1, issue_latency_s=0) as sim:
        issue_elsewhere(sim)
        started = time.monotonic()
        broker = client(sim, token_path)  # issues: refused, sits out 1.5 s, asks again
        assert 1.5 <= time.monotonic() - started < 15
        assert broker.rate_limit_wait_s == 1.5
        assert broker.fetch_price("005930")["rt_cd"] == "0"
        assert sim.issued == 2 and sim.rate_limited == 1
    assert client(sim, token_path, rate_limit_wait_s=2).rate_limit_wait_s == 2.0  # argument wins
    for bad in ("0", "-3", "soon", "nan", "1e9"):
        monkeypatch.setenv(ISSUE_WINDOW_ENV, bad)
        with pytest.raises(ValueError, match=ISSUE_WINDOW_ENV):
            client(sim, token_path)


def test_base_url_comes_from_the_environment(
    sim: KisSimulator, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOREA_INVESTMENT_BASE_URL", sim.base_url)
    broker = KoreaInvestment(APP_KEY, SECRET, token_storage=FileTokenStorage(token_path))
    assert broker.base_url == sim.base_url
    assert sim.issued == 1


def test_default_hosts() -> None:
    from kis_safe_token.client import REAL_BASE_URL, VIRTUAL_BASE_URL

    assert "openapi.koreainvestment.com:9443" in REAL_BASE_URL
    assert "openapivts.koreainvestment.com:29443" in VIRTUAL_BASE_URL


def test_lock_ttl_shorter_than_the_http_timeout_is_refused() -> None:
    import fakeredis

    storage = LockedRedisTokenStorage(client=fakeredis.FakeRedis(), lock_ttl=5.0)
    with pytest.raises(ValueError, match="lock_ttl"):
        KoreaInvestment(
            APP_KEY,
            SECRET,
            token_storage=storage,
            base_url="http://127.0.0.1:9",
            timeout=(3.0, 10.0),
        )


def test_other_kis_errors_are_kis_api_errors(sim: KisSimulator, token_path: Path) -> None:
    broker = client(sim, token_path)
    with pytest.raises(KisApiError) as info:
        broker.request(
            "GET",
            "/uapi/domestic-stock/v1/quotations/inquire-price",
            tr_id="WRONG",
            params={"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"},
        )
    assert info.value.code == "OPSQ0002"  # not EGW00201: that code means only the rate limit
    assert sim.issued == 1


def test_repr_hides_the_secret_and_token(sim: KisSimulator, token_path: Path) -> None:
    broker = client(sim, token_path)
    text = repr(broker)
    assert SECRET not in text and broker.access_token[7:] not in text


# -- tokens KIS should never have issued, and a host whose clock is off -------------------------


def tamper(
    sim: KisSimulator, monkeypatch: pytest.MonkeyPatch, change: Callable[[dict], None]
) -> None:
    """Let the simulator issue (and count) as usual, then ``change`` its successful answer."""
    issue = sim._issue

    def tampered(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, payload = issue(body)
        if status == 200:
            change(payload)
        return status, payload

    monkeypatch.setattr(sim, "_issue", tampered)


def without_kst(**answer: Any) -> Callable[[dict], None]:
    def change(payload: dict) -> None:
        del payload["access_token_token_expired"]
        payload.update(answer)

    return change


def stored_at_all(token_path: Path) -> dict | None:
    """Whatever token the file holds, however expired (a storage whose clock reads 1970)."""
    return FileTokenStorage(token_path, clock=lambda: 0.0).load_token(APP_KEY, SECRET)


UNUSABLE_ANSWERS = {
    "kst-expiry-in-the-past": lambda p: p.update(
        access_token_token_expired=format_kst(time.time() - 3600)
    ),
    "expires_in-0": without_kst(expires_in=0),
    "expires_in-negative": without_kst(expires_in=-60),
    "expires_in-1e300": without_kst(expires_in=1e300),
    "kst-expiry-year-2999": lambda p: p.update(access_token_token_expired="2999-01-01 00:00:00"),
    "token-hangul": lambda p: p.update(access_token="토큰" + p["access_token"]),
    "token-latin-1": lambda p: p.update(access_token="\u00e9" + p["access_token"]),
    "token-control-char": lambda p: p.update(access_token=p["access_token"] + "\x01"),
    "token-space": lambda p: p.update(access_token=p["access_token"].replace(".", " ")),
}


@pytest.mark.parametrize("answer", UNUSABLE_ANSWERS)
def test_unusable_token_from_kis_is_refused_before_it_is_stored(
    answer: str, sim: KisSimulator, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tamper(sim, monkeypatch, UNUSABLE_ANSWERS[answer])
    with pytest.raises(TokenIssueError) as info:
        client(sim, token_path)
    assert info.value.status == 200 and not info.value.local
    assert stored_at_all(token_path) is None
    assert sim.counts["issue_requests"] == 1
    for token in sim.issued_tokens():
        assert token[10:40] not in str(info.value)
    if answer == "kst-expiry-in-the-past":
        assert "already-expired" in str(info.value)  # KIS's Date agrees: not our clock


def test_token_shorter_lived_than_the_refresh_margin_is_issued_once(token_path: Path) -> None:
    with KisSimulator(
        apps={APP_KEY: SECRET}, token_lifetime_s=120, issue_window_s=0, issue_latency_s=0
    ) as sim:
        now = [time.time()]
        broker = client(sim, token_path, clock=lambda: now[0])
        broker.token_storage.clock = lambda: now[0]
        first = broker.access_token
        for _ in range(50):
            assert broker.fetch_price("005930")["rt_cd"] == "0"
        assert sim.issued == 1 and broker.access_token == first
        now[0] += 110  # inside the last tenth of the token's 120 s: refresh once
        assert broker.access_token != first
        for _ in range(10):
            broker.access_token  # noqa: B018
        assert sim.issued == 2


def test_host_clock_days_ahead_is_named_and_the_shared_token_is_kept(token_path: Path) -> None:
    with KisSimulator(apps={APP_KEY: SECRET}, issue_window_s=0, issue_latency_s=0) as sim:
        healthy = client(sim, token_path)
        kept = healthy.access_token

        def ahead() -> float:
            return time.time() + 2 * DAY_S

        with pytest.raises(TokenIssueError) as info:
            KoreaInvestment(
                APP_KEY,
                SECRET,
                token_storage=FileTokenStorage(token_path, clock=ahead),
                base_url=sim.base_url,
                clock=ahead,
            )
        message = str(info.value)
        assert "clock" in message and re.search(r"\b17\d{4} s\b", message), message
        assert info.value.local
        assert sim.issued == 2
        assert all(token[10:40] not in message for token in sim.issued_tokens())
        stored = FileTokenStorage(token_path).load_token(APP_KEY, SECRET)
        assert stored is not None and "Bearer " + stored["access_token"] == kept
        assert healthy.fetch_price("005930")["rt_cd"] == "0"
        assert healthy.access_token == kept and sim.issued == 2


def test_kis_clock_days_behind_is_named_too(token_path: Path) -> None:
    with KisSimulator(
        apps={APP_KEY: SECRET}, issue_latency_s=0, clock=lambda: time.time() - 2 * DAY_S
    ) as sim:
        with pytest.raises(TokenIssueError, match="clock") as info:
            client(sim, token_path)
        assert info.value.local
        assert stored_at_all(token_path) is None


def test_simulator_date_header_follows_its_clock() -> None:
    with KisSimulator(issue_latency_s=0, clock=lambda: 1_000_000_000.0) as sim:
        answer = requests.get(f"{sim.base_url}/nowhere", timeout=5)
    assert parsedate_to_datetime(answer.headers["Date"]).timestamp() == 1_000_000_000.0


def test_the_issue_window_variable_is_read_when_a_store_is_built_not_at_import(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    bad = {**os.environ, ISSUE_WINDOW_ENV: "soon"}
    imported = subprocess.run(
        [sys.executable, "-c", "import kis_safe_token"], env=bad, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr  # a bad setting never breaks the import
    monkeypatch.setenv(ISSUE_WINDOW_ENV, "soon")
    with pytest.raises(ValueError, match=ISSUE_WINDOW_ENV):
        FileTokenStorage(token_path)
    monkeypatch.setenv(ISSUE_WINDOW_ENV, "5")  # the default wait follows the window
    assert FileTokenStorage(token_path).wait_timeout == pytest.approx(5 + 2 * 13.05 + 5)
    assert FileTokenStorage(token_path, wait_timeout=3).wait_timeout == 3.0
