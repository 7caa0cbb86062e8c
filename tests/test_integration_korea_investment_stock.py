"""kis_safe_token.integrations.korea_investment_stock: korea-investment-stock 0.19.0 (the real
package) with the fleet's single flight, against the simulator. The behaviour every integration
owes is :class:`integration_contract.BrokerContract`'s; the tests below it are this client's."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from integration_contract import BrokerContract, price_ok
from upstream_herd import (
    UPSTREAM_ACCOUNT,
    UPSTREAM_APP_KEY,
    UPSTREAM_SECRET,
    UpstreamHerdResult,
    require_client,
    upstream_simulator,
)

from kis_safe_token.kis import REAL_BASE_URL
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator

# [dev] installs it (on Python >= 3.11, as its own metadata requires)
korea_investment_stock = require_client("korea_investment_stock", min_python=(3, 11))

from kis_safe_token.integrations import korea_investment_stock as integration  # noqa: E402
from kis_safe_token.integrations.korea_investment_stock import KoreaInvestment  # noqa: E402

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


def broker_for(sim: KisSimulator, storage: TokenStorage) -> KoreaInvestment:
    return KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage, base_url=sim.base_url)


class TestKoreaInvestmentStock(BrokerContract):
    SCENARIO = "upstream_clients.korea_investment_stock_scenario"
    SHIPPED_HERD = {"rounds": 1}
    SHIPPED_ERRORS = ("HTTPError: 403",)
    SHIPPED_CACHE = "home:.cache/kis/token.key"  # a pickle
    DISTRIBUTION, PINNED_VERSION, INTEGRATION = "korea-investment-stock", "0.19.0", integration
    DEFAULT_HOST = REAL_BASE_URL

    def make_client(self, usim: KisSimulator, storage: TokenStorage) -> KoreaInvestment:
        return broker_for(usim, storage)

    def make_default_client(self, usim: KisSimulator) -> KoreaInvestment:
        return KoreaInvestment(KEY, SECRET, ACCOUNT, base_url=usim.base_url)

    def make_hostless_broker(self, storage: TokenStorage) -> KoreaInvestment:
        return KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage)

    def storage_of(self, client: KoreaInvestment) -> TokenStorage:
        return client.token_storage

    def price(self, client: KoreaInvestment) -> bool:
        return price_ok(client.fetch_domestic_price("005930"))

    def refresh_rejected(self, client: KoreaInvestment, sent: str) -> None:
        client.issue_access_token(force=True)  # what upstream's refresh path calls (:237)

    def own_cache(self, tmp_path: Path) -> Path:
        return tmp_path / "home"  # ~/.cache/kis/token.key

    def foreign_storage(self, tmp_path: Path) -> object:
        return korea_investment_stock.FileTokenStorage(tmp_path / "token.key")

    def assert_base_url_followed(self, broker: KoreaInvestment, usim: KisSimulator) -> None:
        assert broker._token_manager.base_url == usim.base_url  # upstream's hard-coded one ignored
        broker.base_url = usim.base_url + "/"  # a later assignment is the user's: honoured
        assert broker.base_url == usim.base_url

    def assert_shipped_later_rounds(self, result: UpstreamHerdResult) -> None:
        """One round only (no refresh to see: the crash is at construction)."""
        assert result.rate_limited == [3] and result.crashed() == 3, result.summary()

    def assert_upstream_unmoved(self) -> None:
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


# -- this client's own -----------------------------------------------------------------------------
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
