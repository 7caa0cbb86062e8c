"""kis_safe_token.integrations.mojito: mojito2 0.1.6 (the real package) with the fleet's single
flight and a token refresh, against the simulator. The behaviour every integration owes is
:class:`integration_contract.BrokerContract`'s; the tests below it are this client's."""

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

from kis_safe_token.kis import TOKEN_EXPIRED, VIRTUAL_BASE_URL
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator

mojito = require_client("mojito")  # [dev] installs mojito2

from kis_safe_token.integrations import mojito as integration  # noqa: E402
from kis_safe_token.integrations.mojito import KoreaInvestment  # noqa: E402

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


def broker_for(sim: KisSimulator, storage: TokenStorage) -> KoreaInvestment:
    return KoreaInvestment(KEY, SECRET, ACCOUNT, token_storage=storage, base_url=sim.base_url)


class TestMojito(BrokerContract):
    SCENARIO = "upstream_clients.mojito_scenario"
    SHIPPED_ERRORS = ("KeyError: 'access_token'",)
    SHIPPED_CACHE = "cwd:token.dat"
    DISTRIBUTION, PINNED_VERSION, INTEGRATION = "mojito2", "0.1.6", integration
    DEFAULT_HOST = VIRTUAL_BASE_URL  # with mock=True

    def make_client(self, usim: KisSimulator, storage: TokenStorage) -> KoreaInvestment:
        return broker_for(usim, storage)

    def make_default_client(self, usim: KisSimulator) -> KoreaInvestment:
        return KoreaInvestment(KEY, SECRET, ACCOUNT, base_url=usim.base_url)

    def make_hostless_broker(self, storage: TokenStorage) -> KoreaInvestment:
        return KoreaInvestment(KEY, SECRET, ACCOUNT, mock=True, token_storage=storage)

    def storage_of(self, client: KoreaInvestment) -> TokenStorage:
        return client._kst_shared().token_storage  # mojito's broker has no attribute for it

    def price(self, client: KoreaInvestment) -> bool:
        return price_ok(client.fetch_price("005930"))

    def other_price(self, client: KoreaInvestment) -> bool:
        """fetch_price calls fetch_domestic_price: both are wrapped, each refreshes alone."""
        return price_ok(client.fetch_domestic_price("J", "005930"))

    def refresh_rejected(self, client: KoreaInvestment, sent: str) -> None:
        client._kst_shared().refresh_rejected()  # what the wrapped methods call on EGW00123

    def own_cache(self, tmp_path: Path) -> Path:
        return tmp_path / "cwd"  # ./token.dat

    def foreign_storage(self, tmp_path: Path) -> object:
        return {"a": "dict"}  # mojito has no storage objects: anything not ours

    def assert_base_url_followed(self, broker: KoreaInvestment, usim: KisSimulator) -> None:
        """Nothing more: mojito issues at self.base_url (test_issuance_follows_a_subclass_set_
        base_url shows a redirection of mojito's own reaching the issuance)."""

    def assert_shipped_later_rounds(self, result: UpstreamHerdResult) -> None:
        """The one process with a token cannot refresh it after the expiry."""
        assert [e.split(": ", 1)[1] for e in result.errors(1)] == [
            f"RuntimeError: no price: {TOKEN_EXPIRED} 기간이 만료된 token 입니다."
        ]

    def assert_upstream_unmoved(self) -> None:
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


# -- this client's own -----------------------------------------------------------------------------
def test_issuance_follows_a_subclass_set_base_url(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    """Like mojito, the token is issued at self.base_url: redirecting mojito redirects us."""

    class Redirected(KoreaInvestment):
        def set_base_url(self, mock: bool = True) -> None:
            self.base_url = usim.base_url

    broker = Redirected(KEY, SECRET, ACCOUNT, token_storage=storage)
    assert usim.issued == 1 and price_ok(broker.fetch_price("005930"))


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


def test_its_calls_and_refusals_are_events(usim: KisSimulator, tmp_path: Path) -> None:
    from kis_safe_token.events import Event, Kind, subscribe

    seen: list[Event] = []
    unsubscribe = subscribe(seen.append)
    try:
        broker = broker_for(usim, FileTokenStorage(tmp_path / "tokens.json"))
        usim.refuse_calls(1)
        assert price_ok(broker.fetch_price("005930"))
    finally:
        unsubscribe()
    kinds = [e.kind for e in seen]
    assert kinds.count(Kind.ISSUED) == 1 and kinds.count(Kind.KIS_CALL) == 2
    assert [e.code for e in seen if e.kind is Kind.KIS_ERROR] == ["EGW00201"]
