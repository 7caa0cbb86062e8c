"""kis_safe_token.policy: the one call policy (EGW00201 back-off inside the caller's budget, one
re-send after a rejected token), sans I/O, and the integrations' driver of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import APP_KEY, SECRET

from kis_safe_token import FileTokenStorage, SharedToken
from kis_safe_token.integrations import _client_token
from kis_safe_token.integrations._client_token import CallMeter
from kis_safe_token.kis import Verdict, verdict
from kis_safe_token.policy import (
    RETRY_ATTEMPTS,
    RETRY_BUDGET_S,
    Action,
    CallPolicy,
    drive,
)
from kis_safe_token.ratelimit.memory import MemoryRateLimiter

REFUSED = {"rt_cd": "1", "msg_cd": "EGW00201"}
REJECTED = {"rt_cd": "1", "msg_cd": "EGW00123"}
OK = {"rt_cd": "0"}


class RecordingLimiter(MemoryRateLimiter):
    def __init__(self) -> None:
        super().__init__("test-policy-" + APP_KEY, 1000)
        self.budgets: list[float | None] = []

    def penalize(self, hold_s: float = 60.0, *, timeout_s: float | None = None) -> bool:
        self.budgets.append(timeout_s)
        return super().penalize(hold_s, timeout_s=timeout_s)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_egw00201_is_resent_at_most_retry_attempts_times_and_penalized_each_time() -> None:
    clock = Clock()
    policy = CallPolicy(backoff=lambda attempt: 0.5, clock=clock)
    steps = [policy.after(Verdict.TOO_MANY_CALLS) for _ in range(RETRY_ATTEMPTS + 1)]
    assert [s.action for s in steps] == [Action.RESEND] * RETRY_ATTEMPTS + [Action.DELIVER]
    assert all(s.penalize_s == RETRY_BUDGET_S for s in steps)  # the clock did not move
    assert policy.resends == RETRY_ATTEMPTS


def test_the_budget_bounds_back_offs_and_the_slot_wait() -> None:
    clock = Clock()
    policy = CallPolicy(backoff=lambda attempt: 2.0, clock=clock)
    assert policy.after(Verdict.TOO_MANY_CALLS).action is Action.RESEND
    clock.now += 7.0
    assert policy.left_s() == pytest.approx(RETRY_BUDGET_S - 7.0)
    step = policy.after(Verdict.TOO_MANY_CALLS)
    assert step.action is Action.RESEND and step.penalize_s == pytest.approx(3.0)
    clock.now += 2.0
    step = policy.after(Verdict.TOO_MANY_CALLS)  # 1 s left, a 2 s pause would outlast it
    assert step.action is Action.DELIVER and step.penalize_s == pytest.approx(1.0)


def test_a_rejected_token_is_refreshed_once() -> None:
    policy = CallPolicy()
    assert policy.after(Verdict.TOKEN_REJECTED).action is Action.REFRESH
    assert policy.after(Verdict.TOKEN_REJECTED).action is Action.DELIVER
    for kind in (Verdict.OK, Verdict.OTHER, Verdict.ISSUE_REFUSED, Verdict.CLOCK_SKEW):
        assert policy.after(kind).action is Action.DELIVER


def test_drive_refreshes_then_backs_off_on_one_budget() -> None:
    answers = iter([REFUSED, OK])
    refreshed: list[object] = []
    limiter = RecordingLimiter()

    def refresh(last: object) -> bool:
        refreshed.append(last)
        return True

    result = drive(
        CallPolicy(backoff=lambda attempt: 0.001),
        REJECTED,
        verdict,
        lambda last: next(answers),
        limiter=limiter,
        refresh=refresh,
    )
    assert result == OK and refreshed == [REJECTED] and len(limiter.budgets) == 1


def test_drive_delivers_the_rejection_when_the_store_has_nothing_better() -> None:
    result = drive(
        CallPolicy(),
        REJECTED,
        verdict,
        lambda last: pytest.fail("re-sent with the token KIS rejected"),
        limiter=None,
        refresh=lambda last: False,
    )
    assert result == REJECTED


def test_integrations_penalize_with_the_callers_budget_left(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The integrations' EGW00201 path tells the limiter how much of the 10 s budget is left,
    so a Redis limiter in a failover cannot make the call outlast it."""
    limiter = RecordingLimiter()
    shared = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), rate_limiter=limiter)
    monkeypatch.setattr(_client_token, "backoff_s", lambda attempt: 0.001)
    sends = []

    def send() -> dict[str, str]:
        sends.append(1)
        return REFUSED

    assert CallMeter(shared).run(send) == REFUSED
    assert len(sends) == 1 + RETRY_ATTEMPTS
    assert len(limiter.budgets) == 1 + RETRY_ATTEMPTS
    assert all(b is not None and 0 < b <= RETRY_BUDGET_S for b in limiter.budgets)
    assert limiter.budgets == sorted(limiter.budgets, reverse=True)


def test_kis_trader_penalizes_with_the_callers_budget_left(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from upstream_herd import require_client

    require_client("kis_trader", min_python=(3, 11))
    from kis_safe_token.integrations.kis_trader import TokenManager, refreshing_send

    monkeypatch.setattr(_client_token, "backoff_s", lambda attempt: 0.001)
    limiter = RecordingLimiter()
    tokens = TokenManager(
        app_key=APP_KEY,
        app_secret=SECRET,
        environment="real",
        token_storage=FileTokenStorage(token_path),
        rate_limiter=limiter,
    )
    send = refreshing_send(tokens, lambda *args, **kwargs: (500, {}, REFUSED))
    status, _headers, payload = send(
        "GET", "http://kis.invalid/uapi/x", headers={}, params=None, json_body=None
    )
    assert status == 500 and payload == REFUSED
    assert len(limiter.budgets) >= RETRY_ATTEMPTS
    assert all(b is not None and 0 < b <= RETRY_BUDGET_S for b in limiter.budgets)
