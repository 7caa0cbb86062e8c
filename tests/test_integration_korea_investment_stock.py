"""kis_safe_token.integrations.korea_investment_stock: korea-investment-stock 0.19.0 (the real
package) with the fleet's single flight, against the simulator."""

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

from kis_safe_token.kis import REAL_BASE_URL
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token

# [dev] installs it (on Python >= 3.11, as its own metadata requires)
korea_investment_stock = require_client("korea_investment_stock", min_python=(3, 11))

from kis_safe_token.integrations import korea_investment_stock as integration  # noqa: E402
from kis_safe_token.integrations.korea_investment_stock import KoreaInvestment  # noqa: E402

SCENARIO = "upstream_clients.korea_investment_stock_scenario"
KEY, SECRET, ACCOUNT = UPSTREAM_APP_KEY, UPSTREAM_SECRET, UPSTREAM_ACCOUNT


@pytest.fixture
def usim() -> Any:
    with upstream_simulator() as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Upstream reads ~/.config/kis/config.yaml and writes ~/.cache/kis: a home of the test's."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def broker_for(sim: KisSimulator, storage: FileTokenStorage) -> KoreaInvestment:
    return KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage, base_url=sim.base_url)


# -- the fleet -------------------------------------------------------------------------------------
def test_as_shipped_the_herd_crashes_and_pickles_its_cache(tmp_path: Path) -> None:
    """The harness sees what the integration fixes (so the zeros of its herd test in
    ``test_integration_herds.py`` mean something)."""
    result = run_shipped_herd(SCENARIO, tmp_path, rounds=1)
    assert result.rate_limited == [3] and result.crashed() == 3, result.summary()
    assert all("HTTPError: 403" in e for e in result.errors()), result.summary()
    assert "home:.cache/kis/token.key" in result.cache_files()


# -- host and storage ------------------------------------------------------------------------------
def test_base_url_keyword_is_the_host_of_every_call(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    broker = broker_for(usim, storage)
    assert broker.base_url == usim.base_url
    assert broker._token_manager.base_url == usim.base_url  # upstream's hard-coded one ignored
    assert usim.issued == 1 and price_ok(broker.fetch_domestic_price("005930"))
    broker.base_url = usim.base_url + "/"  # a later assignment is the user's: honoured
    assert broker.base_url == usim.base_url


def test_base_url_from_the_environment(
    usim: KisSimulator, storage: FileTokenStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOREA_INVESTMENT_BASE_URL", usim.base_url)
    broker = KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage)
    assert broker.base_url == usim.base_url and usim.issued == 1
    assert price_ok(broker.fetch_domestic_price("005930"))


def test_default_host_is_upstreams(storage: FileTokenStorage) -> None:
    # A stored token: construction needs no network, so the real host is never called.
    storage.save_token(Token("stored-token", time.time() + 3600).to_token_data(KEY, SECRET))
    broker = KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage)
    assert broker.base_url == REAL_BASE_URL
    assert broker.access_token == "Bearer stored-token"


def test_default_storage_is_ours_from_the_environment(
    usim: KisSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _own_home: Path
) -> None:
    monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_STORAGE", "file")
    monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_FILE", str(tmp_path / "env" / "token.json"))
    broker = KoreaInvestment(KEY, SECRET, ACCOUNT, base_url=usim.base_url)
    assert isinstance(broker.token_storage, FileTokenStorage)
    assert broker.token_storage.check_token_valid(KEY, SECRET)
    assert (tmp_path / "env" / "token.json").exists()
    assert not (_own_home / ".cache").exists()  # upstream's pickle never written


def test_upstream_storage_is_refused(tmp_path: Path) -> None:
    theirs = korea_investment_stock.FileTokenStorage(tmp_path / "token.key")
    with pytest.raises(TypeError, match="token_storage must be a kis_safe_token storage"):
        KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=theirs)


# -- the token -------------------------------------------------------------------------------------
def test_check_access_token_is_a_pure_read(usim: KisSimulator, storage: FileTokenStorage) -> None:
    broker = broker_for(usim, storage)
    assert broker.check_access_token() is True
    storage.delete_token(KEY, SECRET)
    assert broker.check_access_token() is False
    assert broker.check_access_token() is False
    assert usim.issued == 1 and usim.counts["issue_requests"] == 1


def test_refresh_after_expiry_reuses_a_token_another_broker_got(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    """Compare-and-delete: the second broker drops only the token it sent (already gone), so it
    takes the first one's fresh token instead of deleting it and issuing a third."""
    first, second = broker_for(usim, storage), broker_for(usim, storage)
    usim.expire_tokens()
    assert price_ok(first.fetch_domestic_price("005930"))
    assert price_ok(second.fetch_domestic_price("005930"))
    assert usim.issued == 2 and usim.rate_limited == 0
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
        lambda: broker.fetch_domestic_price("005930"),
        lambda: broker.issue_access_token(force=True),
    )


def test_threads_sharing_a_broker_refresh_once(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    broker = broker_for(usim, storage)
    threads_refresh_once(usim, lambda: broker.fetch_domestic_price("005930"))


def test_forced_issue_gets_a_new_token(usim: KisSimulator, storage: FileTokenStorage) -> None:
    broker = broker_for(usim, storage)
    old = broker.access_token
    usim.expire_tokens()  # resets the issue window too
    broker.issue_access_token(force=True)
    assert broker.access_token != old and usim.issued == 2
    broker.load_access_token()
    broker.issue_access_token()
    assert usim.issued == 2  # without force: the fleet's token


def test_upstream_wrappers_work_on_top(usim: KisSimulator, storage: FileTokenStorage) -> None:
    broker = broker_for(usim, storage)
    limited = korea_investment_stock.RateLimitedKoreaInvestment(broker, calls_per_second=100)
    assert price_ok(limited.fetch_domestic_price("005930"))
    cached = korea_investment_stock.CachedKoreaInvestment(broker)
    assert price_ok(cached.fetch_domestic_price("005930"))
    before = usim.counts["price_requests"]
    assert price_ok(cached.fetch_domestic_price("005930"))
    assert usim.counts["price_requests"] == before  # served by upstream's cache
    usim.expire_tokens()
    assert price_ok(limited.fetch_domestic_price("005930"))  # refreshed under the wrapper
    assert usim.issued == 2


# -- packaging and the upstream version ------------------------------------------------------------
def test_upstream_is_the_version_the_overrides_were_written_for() -> None:
    """Fails loudly when an upgrade moves what the overrides depend on (module docstring)."""
    assert importlib.metadata.version("korea-investment-stock") == integration.UPSTREAM_VERSION
    assert integration.UPSTREAM_VERSION == "0.19.0"
    cls = korea_investment_stock.KoreaInvestment
    assert list(inspect.signature(cls.__init__).parameters) == [
        "self",
        "api_key",
        "api_secret",
        "acc_no",
        "config",
        "config_file",
        "token_storage",
    ]
    assert list(inspect.signature(cls.issue_access_token).parameters) == ["self", "force"]
    source = Path(inspect.getfile(cls)).read_text(encoding="utf-8").splitlines()
    expected = {
        127: 'self.base_url = "https://openapi.koreainvestment.com:9443"',
        142: "storage = token_storage or create_token_storage(self._resolved_config)",
        145: "self._token_manager = TokenManager(",
        156: "self.access_token = self._token_manager.get_valid_token()",
        174: "def issue_access_token(self, force: bool = False):",
        237: "self.issue_access_token(force=True)",
        238: 'headers["authorization"] = self.access_token',
        245: "def check_access_token(self) -> bool:",
        253: "def load_access_token(self):",
    }
    for line, text in expected.items():
        assert source[line - 1].strip() == text, f"korea_investment_stock.py:{line} moved"
    manager = inspect.getsource(korea_investment_stock.TokenManager.get_valid_token)
    assert "if self.is_token_valid():" in manager and "self._load_token()" in manager
    load = inspect.getsource(korea_investment_stock.TokenManager._load_token)
    assert 'token_data["access_token"]' in load
    headers = inspect.getsource(cls.fetch_domestic_price)
    assert '"authorization": self.access_token' in headers
