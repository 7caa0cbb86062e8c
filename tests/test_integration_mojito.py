"""kis_safe_token.integrations.mojito: mojito2 0.1.6 (the real package) with the fleet's single
flight and a token refresh, against the simulator."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import time
from pathlib import Path
from typing import Any

import pytest
from refresh_cases import late_refresh_drops_only_its_token, price_ok, threads_refresh_once
from upstream_herd import (
    UPSTREAM_ACCOUNT,
    UPSTREAM_APP_KEY,
    UPSTREAM_SECRET,
    require_client,
    run_shipped_herd,
    upstream_simulator,
)

from kis_safe_token.kis import TOKEN_EXPIRED, VIRTUAL_BASE_URL
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token

mojito = require_client("mojito")  # [dev] installs mojito2

from kis_safe_token.integrations import mojito as integration  # noqa: E402
from kis_safe_token.integrations.mojito import KoreaInvestment  # noqa: E402

SCENARIO = "upstream_clients.mojito_scenario"
KEY, SECRET, ACCOUNT = UPSTREAM_APP_KEY, UPSTREAM_SECRET, UPSTREAM_ACCOUNT


@pytest.fixture
def usim() -> Any:
    with upstream_simulator() as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mojito keeps token.dat in the working directory: one of the test's."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def broker_for(sim: KisSimulator, storage: FileTokenStorage) -> KoreaInvestment:
    return KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage, base_url=sim.base_url)


# -- the fleet -------------------------------------------------------------------------------------
def test_as_shipped_the_herd_crashes_and_cannot_refresh(tmp_path: Path) -> None:
    """The harness sees what the integration fixes (so the zeros of its herd test in
    ``test_integration_herds.py`` mean something)."""
    result = run_shipped_herd(SCENARIO, tmp_path)
    assert result.rate_limited[0] == 3 and result.crashed(0) == 3, result.summary()
    assert all("KeyError: 'access_token'" in e for e in result.errors(0)), result.summary()
    assert [e.split(": ", 1)[1] for e in result.errors(1)] == [
        f"RuntimeError: no price: {TOKEN_EXPIRED} 기간이 만료된 token 입니다."
    ]
    assert "cwd:token.dat" in result.cache_files()


# -- host and storage ------------------------------------------------------------------------------
def test_base_url_keyword_and_environment(
    usim: KisSimulator, storage: FileTokenStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = broker_for(usim, storage)
    assert broker.base_url == usim.base_url and usim.issued == 1
    assert price_ok(broker.fetch_price("005930"))
    monkeypatch.setenv("KOREA_INVESTMENT_BASE_URL", usim.base_url)
    from_env = KoreaInvestment(KEY, SECRET, ACCOUNT, mock=True, token_storage=storage)
    assert from_env.base_url == usim.base_url
    assert price_ok(from_env.fetch_price("005930")) and usim.issued == 1


def test_issuance_follows_a_subclass_set_base_url(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    """Like mojito, the token is issued at self.base_url: redirecting mojito redirects us."""

    class Redirected(KoreaInvestment):
        def set_base_url(self, mock: bool = True) -> None:
            self.base_url = usim.base_url

    broker = Redirected(KEY, SECRET, ACCOUNT, token_storage=storage)
    assert usim.issued == 1 and price_ok(broker.fetch_price("005930"))


def test_default_host_is_mojitos(storage: FileTokenStorage) -> None:
    # A stored token: construction needs no network, so the real hosts are never called.
    storage.save_token(Token("stored-token", time.time() + 3600).to_token_data(KEY, SECRET))
    broker = KoreaInvestment(KEY, SECRET, ACCOUNT, mock=True, token_storage=storage)
    assert broker.base_url == VIRTUAL_BASE_URL
    assert broker.access_token == "Bearer stored-token"


def test_token_dat_is_never_read_or_written(
    usim: KisSimulator, storage: FileTokenStorage, cwd: Path
) -> None:
    (cwd / "token.dat").write_bytes(b"not a pickle: mojito would crash unpickling this")
    broker = broker_for(usim, storage)
    assert price_ok(broker.fetch_price("005930"))
    usim.expire_tokens()
    assert price_ok(broker.fetch_price("005930"))
    assert (cwd / "token.dat").read_bytes().startswith(b"not a pickle")
    (cwd / "token.dat").unlink()
    broker_for(usim, storage).issue_access_token()
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_upstream_storage_objects_are_refused() -> None:
    with pytest.raises(TypeError, match="token_storage must be a kis_safe_token storage"):
        KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage={"a": "dict"})  # type: ignore[arg-type]


# -- the token -------------------------------------------------------------------------------------
def test_check_access_token_is_a_pure_read(usim: KisSimulator, storage: FileTokenStorage) -> None:
    broker = broker_for(usim, storage)
    assert broker.check_access_token() is True
    storage.delete_token(KEY, SECRET)
    assert broker.check_access_token() is False
    assert usim.issued == 1 and usim.counts["issue_requests"] == 1


def test_refresh_after_expiry_reuses_a_token_another_broker_got(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    first, second = broker_for(usim, storage), broker_for(usim, storage)
    usim.expire_tokens()
    assert price_ok(first.fetch_domestic_price("J", "005930"))
    assert price_ok(second.fetch_price("005930"))
    assert usim.issued == 2 and usim.rate_limited == 0 and usim.counts[TOKEN_EXPIRED] == 2
    assert first.access_token == second.access_token


def test_a_late_refresh_drops_only_the_token_its_thread_sent(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    broker = broker_for(usim, storage)
    late_refresh_drops_only_its_token(
        broker,
        usim,
        storage,
        (KEY, SECRET),
        lambda: broker.fetch_price("005930"),
        lambda: broker._kst_shared().refresh_rejected(),
    )


def test_threads_sharing_a_broker_refresh_once(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    broker = broker_for(usim, storage)
    threads_refresh_once(usim, lambda: broker.fetch_price("005930"))


def test_one_refresh_per_outermost_call(usim: KisSimulator, storage: FileTokenStorage) -> None:
    """fetch_price calls fetch_domestic_price, both wrapped: a token rejected again after the
    refresh is answered to the caller, not refreshed a second time by the outer wrapper."""
    broker = broker_for(usim, storage)
    shared = broker._kst_shared()
    refresh = shared.refresh_rejected
    refreshes: list[str] = []

    def refresh_then_expire_again() -> str:
        refreshes.append(refresh())
        usim.expire_tokens()  # the retry meets EGW00123 once more
        return refreshes[-1]

    shared.refresh_rejected = refresh_then_expire_again  # type: ignore[method-assign]
    usim.expire_tokens()
    answer = broker.fetch_price("005930")
    assert answer["msg_cd"] == TOKEN_EXPIRED
    assert len(refreshes) == 1 and usim.issued == 2
    shared.refresh_rejected = refresh  # type: ignore[method-assign]
    assert price_ok(broker.fetch_price("005930"))  # the next outermost call refreshes again
    assert usim.issued == 3


def test_the_rest_methods_are_wrapped() -> None:
    wrapped = set(integration.REFRESHING_METHODS)
    assert {"fetch_domestic_price", "fetch_oversea_price", "create_order"} <= wrapped
    assert not wrapped & {"__init__", "issue_access_token", "check_access_token", "fetch_price"}
    for name in wrapped:
        assert getattr(KoreaInvestment, name).__wrapped__ is getattr(mojito.KoreaInvestment, name)


# -- packaging and the upstream version ------------------------------------------------------------
def test_upstream_is_the_version_the_overrides_were_written_for() -> None:
    """Fails loudly when an upgrade moves what the overrides depend on (module docstring)."""
    assert importlib.metadata.version("mojito2") == integration.UPSTREAM_VERSION == "0.1.6"
    cls = mojito.KoreaInvestment
    assert list(inspect.signature(cls.__init__).parameters) == [
        "self",
        "api_key",
        "api_secret",
        "acc_no",
        "exchange",
        "mock",
    ]
    source = Path(inspect.getfile(cls)).read_text(encoding="utf-8").splitlines()
    expected = {
        352: "self.set_base_url(mock)",
        364: "self.access_token = None",
        365: "if self.check_access_token():",
        366: "self.load_access_token()",
        368: "self.issue_access_token()",
        370: "def set_base_url(self, mock: bool = True):",
        380: "def issue_access_token(self):",
        406: "def check_access_token(self):",
        431: "def load_access_token(self):",
        472: "def fetch_domestic_price(self, market_code: str, symbol: str) -> dict:",
        484: '"authorization": self.access_token,',
        494: "return resp.json()",
    }
    for line, text in expected.items():
        assert source[line - 1].strip() == text, f"mojito/koreainvestment.py:{line} moved"
