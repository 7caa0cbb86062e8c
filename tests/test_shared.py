"""SharedToken: the token in memory, single flight through the store, compare-and-delete, fork."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from conftest import APP_KEY, SECRET, report_from_forked_child

from kis_safe_token import FileTokenStorage, KoreaInvestment, SharedToken
from kis_safe_token.testing import KisSimulator


def shared(sim: KisSimulator, token_path: Path, **kwargs) -> SharedToken:
    return SharedToken(
        APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url, **kwargs
    )


def token_id(bearer: str) -> str:
    """A short, safe name for a token in a message."""
    return hashlib.sha256(bearer.encode()).hexdigest()[:8]


def stored_token(token_path: Path) -> str | None:
    data = FileTokenStorage(token_path).load_token(APP_KEY, SECRET)
    return data["access_token"] if data else None


def test_nothing_is_fetched_until_the_token_is_used(sim: KisSimulator, token_path: Path) -> None:
    holder = shared(sim, token_path)
    assert sim.counts["issue_requests"] == 0
    assert holder.bearer == holder.token.bearer and holder.bearer.startswith("Bearer ")
    assert sim.issued == 1


def test_bearer_is_served_from_memory_while_fresh(
    sim: KisSimulator, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = shared(sim, token_path)
    first = holder.bearer
    storage = holder.token_storage
    for method in ("get_or_issue", "load_token", "invalidate_token", "check_token_valid"):
        monkeypatch.setattr(storage, method, lambda *a: pytest.fail("storage touched"))
    for _ in range(1000):
        assert holder.bearer == first
    assert holder.token.bearer == first


def test_invalidate_deletes_only_the_token_that_was_rejected(
    sim: KisSimulator, token_path: Path
) -> None:
    a, b = shared(sim, token_path), shared(sim, token_path)
    old = a.token
    assert b.token == old and sim.issued == 1
    sim.expire_tokens()  # KIS rejects it now; the one-minute window is open again
    assert a.invalidate(old.access_token) is True
    fresh = a.token
    assert fresh != old and sim.issued == 2
    # b comes late with the same rejected token (in its bearer form): the fresh one stays.
    assert b.invalidate(old.bearer) is False
    assert stored_token(token_path) == fresh.access_token
    assert b.token == fresh and sim.issued == 2


def test_issue_force_reissues_once(sim: KisSimulator, token_path: Path) -> None:
    holder = shared(sim, token_path)
    old = holder.token
    sim.expire_tokens()
    forced = holder.issue(force=True)
    assert forced != old and holder.token == forced
    assert holder.issue() == forced
    assert sim.issued == 2 and sim.rate_limited == 0


def test_revoke_drops_the_token_at_kis_in_the_store_and_in_memory(
    sim: KisSimulator, token_path: Path
) -> None:
    holder = shared(sim, token_path)
    holder.revoke()  # nothing fetched yet: nothing to revoke
    assert sim.counts["revoke_requests"] == 0
    old = holder.bearer
    holder.revoke()
    assert sim.counts["revoke_requests"] == 1
    assert stored_token(token_path) is None
    sim.expire_tokens()
    assert holder.bearer != old and sim.issued == 2


def test_repr_masks_the_secret_and_the_token(sim: KisSimulator, token_path: Path) -> None:
    with shared(sim, token_path) as holder:
        token = holder.token.access_token
        for text in (repr(holder), str(holder)):
            assert SECRET not in text and token[10:] not in text and APP_KEY not in text


def test_a_client_built_on_it_shares_its_token(sim: KisSimulator, token_path: Path) -> None:
    holder = shared(sim, token_path)
    broker = KoreaInvestment.from_shared(holder, "50000000-01")
    assert broker.fetch_price("005930")["rt_cd"] == "0"
    assert broker.access_token == holder.bearer and broker.shared_token is holder
    broker.close()  # the holder is the caller's: still usable
    assert holder.token.bearer == broker.access_token and sim.issued == 1


def test_bad_arguments_are_named_value_errors(token_path: Path) -> None:
    storage = FileTokenStorage(token_path)
    with pytest.raises(ValueError, match="timeout must be"):
        SharedToken(APP_KEY, SECRET, storage, timeout=0)
    with pytest.raises(ValueError, match="api_secret") as info:
        SharedToken(APP_KEY, "bad secret", storage)
    assert "bad secret" not in str(info.value)
    with pytest.raises(ValueError, match="wait_timeout"):
        SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path, wait_timeout=float("nan")))


def test_child_forked_mid_refresh_gets_its_own_lock_and_session(token_path: Path) -> None:
    with KisSimulator(apps={APP_KEY: SECRET}, issue_latency_s=0, issue_window_s=0) as sim:
        holder = shared(sim, token_path)
        holder.token  # noqa: B018
        sim.issue_gate.clear()  # KIS hangs: the refreshing thread holds the refresh lock
        refresher = threading.Thread(target=holder.issue, kwargs={"force": True})
        refresher.start()
        assert sim.wait_for(lambda s: s.counts["issue_requests"] == 2, timeout=10)
        parent_session = id(holder.session)

        def child() -> str:
            own = "new-session" if id(holder.session) != parent_session else "same-session"
            return f"{own} {token_id(holder.bearer)}"

        def release_kis() -> None:
            sim.issue_gate.set()
            refresher.join(20)

        message = report_from_forked_child(child, then=release_kis)
        assert message == f"new-session {token_id(holder.bearer)}"
        assert sim.issued == 2  # the parent's refresh; the child reused it
