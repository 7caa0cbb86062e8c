"""kis_safe_token.integrations.kis_trader: kis-trader 0.12.2 (the real package) with the fleet's
single flight, and a refresh after EGW00123 through the transport's ``send``, against the
simulator. The behaviour every integration owes is
:class:`integration_contract.IntegrationContract`'s; the tests below it are this client's."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from integration_contract import IntegrationContract
from upstream_herd import (
    UPSTREAM_APP_KEY,
    UPSTREAM_SECRET,
    UpstreamHerdResult,
    require_client,
    upstream_simulator,
)

from kis_safe_token.kis import PRICE_PATH, PRICE_TR_ID, RATE_LIMITED, TOKEN_EXPIRED, TOKEN_PATH
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator

kis_trader = require_client("kis_trader", min_python=(3, 11))  # [dev] installs kis-trader

from kis_trader import transport as kt_transport  # noqa: E402
from kis_trader._internal import _auth, _endpoints, _http  # noqa: E402
from kis_trader.errors import KISAuthError  # noqa: E402

from kis_safe_token.integrations import kis_trader as integration  # noqa: E402
from kis_safe_token.integrations.kis_trader import (  # noqa: E402
    RequestsTransport,
    TokenManager,
    refreshing_send,
)

KEY, SECRET = UPSTREAM_APP_KEY, UPSTREAM_SECRET
QUOTE = {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """kis-trader's own token cache would go under $XDG_CACHE_HOME: the test's."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def simulator(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> KisSimulator:
    """A started simulator that kis-trader's endpoint table (read per call) points at, for both
    environments (the test stops it)."""
    sim = upstream_simulator(**kwargs).start()
    for environment in ("real", "paper"):
        monkeypatch.setitem(_endpoints._BASE_URL_BY_ENVIRONMENT, environment, sim.base_url)
    return sim


@pytest.fixture
def usim(monkeypatch: pytest.MonkeyPatch) -> Iterator[KisSimulator]:
    sim = simulator(monkeypatch)
    yield sim
    sim.stop()


def manager(storage: TokenStorage, environment: str = "real") -> TokenManager:
    return TokenManager(
        app_key=KEY, app_secret=SECRET, environment=environment, token_storage=storage
    )


def price(transport: Any) -> str:
    """A quote through kis-trader's own request path (``RequestsTransport.request``)."""
    answer = transport.request(
        method="GET", path=PRICE_PATH, tr_id=PRICE_TR_ID, params=dict(QUOTE), idempotent=True
    )
    return str(answer.body["output"]["stck_prpr"])


def stored(storage: FileTokenStorage) -> str | None:
    data = storage.load_token(KEY, SECRET)
    return None if data is None else str(data["access_token"])


@dataclass
class Trader:
    """The contract's client: the token manager (holds the token) and the transport over it
    (sends, and refreshes after EGW00123)."""

    tokens: TokenManager
    transport: RequestsTransport

    @classmethod
    def over(cls, tokens: TokenManager) -> Trader:
        return cls(tokens, RequestsTransport(token_manager=tokens))


class TestKisTrader(IntegrationContract):
    """No host setting (kis-trader reads its endpoint table per call: ``usim`` points it,
    test_environments_and_the_endpoint_table checks it) and no storage keyword of upstream's
    to refuse (test_other_token_managers_are_left_as_kis_traders): not a
    :class:`integration_contract.BrokerContract`."""

    SCENARIO = "upstream_clients.kis_trader_scenario"
    SHIPPED_ERRORS = ("KISAuthError",)
    SHIPPED_CACHE = "home:.cache/kis-trader/tokens/real-*"
    DISTRIBUTION, PINNED_VERSION, INTEGRATION = "kis-trader", "0.12.2", integration

    def make_client(self, usim: KisSimulator, storage: TokenStorage) -> Trader:
        return Trader.over(manager(storage))

    def make_default_client(self, usim: KisSimulator) -> Trader:
        return Trader.over(TokenManager(app_key=KEY, app_secret=SECRET, environment="real"))

    def storage_of(self, client: Trader) -> TokenStorage:
        return client.tokens.token_storage

    def price(self, client: Trader) -> bool:
        return bool(price(client.transport))

    def token_of(self, client: Trader) -> str:
        return client.tokens.access_token()

    def refresh_rejected(self, client: Trader, sent: str) -> None:
        """refreshing_send names the token its request sent (kis-trader's header is built from
        access_token() per request)."""
        client.tokens.invalidate(sent)

    def own_cache(self, tmp_path: Path) -> Path:
        return tmp_path / "xdg-cache"  # $XDG_CACHE_HOME/kis-trader/tokens

    def assert_shipped_later_rounds(self, result: UpstreamHerdResult) -> None:
        """The one process with a token: upstream retries the expired token, then gives up."""
        assert any(
            e.endswith("KISError: KIS HTTP 요청에 실패했다 (status 500).") for e in result.errors(1)
        ), result.summary()

    def assert_upstream_unmoved(self) -> None:
        manager_params = inspect.signature(_auth.TokenManager.__init__).parameters
        assert list(manager_params) == [
            "self",
            "app_key",
            "app_secret",
            "environment",
            "post",
            "clock",
            "cache_dir",
            "refresh_margin",
        ]
        assert list(inspect.signature(_auth.TokenManager.access_token).parameters) == ["self"]
        assert list(inspect.signature(_auth.TokenManager.revoke).parameters) == ["self"]
        assert list(inspect.signature(_auth._requests_post).parameters) == ["url", "body"]
        transport_params = inspect.signature(_http.RequestsTransport.__init__).parameters
        assert {"app_key", "app_secret", "environment", "token_manager", "send"} <= set(
            transport_params
        )
        assert list(inspect.signature(_http._requests_send).parameters) == [
            "method",
            "url",
            "headers",
            "params",
            "json_body",
        ]
        assert typing.get_args(kt_transport.Environment) == ("real", "paper")
        assert set(_endpoints._BASE_URL_BY_ENVIRONMENT) == {"real", "paper"}
        http_py = Path(inspect.getfile(_http)).read_text(encoding="utf-8").splitlines()
        expected = {
            182: "token = self._token_manager.access_token()",
            190: '"authorization": f"Bearer {token}",',
            197: "url = base_url(self.environment) + path",
            205: "status, response_headers, payload = self._send(",
        }
        for line, text in expected.items():
            assert http_py[line - 1].strip() == text, f"kis_trader/_internal/_http.py:{line} moved"
        auth_py = Path(inspect.getfile(_auth)).read_text(encoding="utf-8").splitlines()
        assert auth_py[131 - 1].strip() == 'base_url(self._environment) + "/oauth2/tokenP", body'
        assert RATE_LIMITED == "EGW00133"  # what the holder sits out


# -- the transport's refresh -----------------------------------------------------------------------
def test_other_answers_pass_through_unchanged(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    calls: list[str] = []

    def send(method: str, url: str, **kwargs: Any) -> Any:
        calls.append(kwargs["headers"]["authorization"])
        return 500, {}, {"rt_cd": "1", "msg_cd": "OPSQ0001", "msg1": "other"}

    tokens = manager(storage)
    answer = refreshing_send(tokens, send)(
        "GET", usim.base_url, headers={"authorization": "Bearer x"}, params=None, json_body=None
    )
    assert answer[2]["msg_cd"] == "OPSQ0001" and calls == ["Bearer x"]
    assert usim.counts["issue_requests"] == 0


def test_a_token_the_storage_keeps_is_not_sent_again(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    """If the rejected token is still the fleet's next one (nothing was deleted), the answer
    goes back instead of a second send with the same token."""
    tokens = manager(storage)
    current = f"Bearer {tokens.access_token()}"
    calls: list[str] = []

    def send(method: str, url: str, **kwargs: Any) -> Any:
        calls.append(kwargs["headers"]["authorization"])
        return 500, {}, {"rt_cd": "1", "msg_cd": TOKEN_EXPIRED, "msg1": "expired"}

    refresh = refreshing_send(tokens, send)
    tokens.invalidate = lambda token: False  # type: ignore[method-assign] # a store that kept it
    answer = refresh("GET", "u", headers={"authorization": current}, params=None, json_body=None)
    assert answer[2]["msg_cd"] == TOKEN_EXPIRED and calls == [current]


def test_environments_and_the_endpoint_table(
    monkeypatch: pytest.MonkeyPatch, storage: FileTokenStorage
) -> None:
    """'virtual' is kis-trader's 'paper'; issuance goes to the endpoint table's host for it."""
    monkeypatch.setitem(_endpoints._BASE_URL_BY_ENVIRONMENT, "real", "http://127.0.0.1:9")
    sim = upstream_simulator().start()
    try:
        monkeypatch.setitem(_endpoints._BASE_URL_BY_ENVIRONMENT, "paper", sim.base_url)
        for name in ("virtual", "paper"):
            tokens = manager(storage, name)
            assert tokens.environment == "paper" and tokens.access_token()
            transport = RequestsTransport(token_manager=tokens)
            assert transport.environment == "paper" and price(transport)
        assert sim.issued == 1
    finally:
        sim.stop()
    with pytest.raises(ValueError, match="environment must be one of 'real', 'virtual', 'paper'"):
        manager(storage, "mock")
    with pytest.raises(ValueError, match="environment must be one of"):
        RequestsTransport(token_manager=manager(storage), environment="live")


def test_short_lived_tokens_are_accepted(
    monkeypatch: pytest.MonkeyPatch, storage: FileTokenStorage, tmp_path: Path
) -> None:
    """Upstream refuses a token living 600 s or less (its refresh margin); ours uses it for 90 %
    of its life."""
    sim = simulator(monkeypatch, token_lifetime_s=120.0)
    try:
        upstream = _auth.TokenManager(
            app_key=KEY, app_secret=SECRET, environment="real", cache_dir=str(tmp_path / "up")
        )
        with pytest.raises(KISAuthError):
            upstream.access_token()
        sim.expire_tokens()  # reopen the issue window
        tokens = manager(storage)
        assert tokens.access_token() == tokens.access_token() and sim.issued == 2
        assert price(RequestsTransport(token_manager=tokens))
    finally:
        sim.stop()


def test_egw00133_is_sat_out_and_a_refusal_is_a_kis_auth_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sim = simulator(monkeypatch, refusals_per_window=1)  # the window ends with one refusal
    try:
        body = {"grant_type": "client_credentials", "appkey": KEY, "appsecret": SECRET}
        assert requests.post(sim.base_url + TOKEN_PATH, json=body, timeout=5).ok  # elsewhere
        tokens = manager(FileTokenStorage(tmp_path / "a.json"))
        tokens._kst_token.rate_limit_wait_s = 1.5  # stands for KIS's minute
        assert tokens.access_token() and sim.issued == 2 and sim.rate_limited == 1
        wrong = TokenManager(
            app_key=KEY,
            app_secret="wrong-secret",
            environment="real",
            token_storage=FileTokenStorage(tmp_path / "b.json"),
        )
        with pytest.raises(KISAuthError) as refused:
            wrong.access_token()
        assert refused.value.msg_cd == "EGW00105" and "wrong-secret" not in str(refused.value)
    finally:
        sim.stop()


def test_an_injected_post_is_used(usim: KisSimulator, storage: FileTokenStorage) -> None:
    urls: list[str] = []

    def post(url: str, body: Mapping[str, str]) -> tuple[int, Mapping[str, Any]]:
        urls.append(url)
        return _auth._requests_post(url, body)

    tokens = TokenManager(
        app_key=KEY, app_secret=SECRET, environment="real", token_storage=storage, post=post
    )
    assert tokens.access_token() and urls == [usim.base_url + TOKEN_PATH]


def test_revoke_revokes_and_drops_the_token(
    monkeypatch: pytest.MonkeyPatch, storage: FileTokenStorage
) -> None:
    sim = simulator(monkeypatch, issue_window_s=0.0)
    try:
        tokens = manager(storage)
        tokens.revoke()  # nothing fetched or stored yet: nothing to revoke
        assert sim.counts["revoke_requests"] == 0
        first = tokens.access_token()
        manager(storage).revoke()  # another process's manager: the token comes from the store
        assert sim.counts["revoke_requests"] == 1 and stored(storage) is None
        tokens.invalidate(first)  # this one drops it from memory once KIS rejects it
        assert tokens.access_token() != first and sim.issued == 2
        RequestsTransport(token_manager=tokens).revoke_token()  # kis-trader's own entry point
        assert sim.counts["revoke_requests"] == 2 and stored(storage) is None
    finally:
        sim.stop()


def test_kis_traders_cache_is_never_written(
    usim: KisSimulator, storage: FileTokenStorage, cache_home: Path
) -> None:
    tokens = manager(storage)
    client = kis_trader.KISClient(
        app_key=KEY,
        app_secret=SECRET,
        environment="real",
        transport=RequestsTransport(token_manager=tokens),
    )
    assert client.domestic.stock("005930").quote().current_price
    usim.expire_tokens()
    assert client.domestic.stock("005930").quote().current_price
    tokens.revoke()
    assert not cache_home.exists() or list(cache_home.rglob("*")) == []


def test_other_token_managers_are_left_as_kis_traders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_FILE", str(tmp_path / "env" / "token.json"))
    tokens = TokenManager(app_key=KEY, app_secret=SECRET, environment="real")
    assert SECRET not in repr(tokens)
    upstream = _auth.TokenManager(app_key=KEY, app_secret=SECRET, environment="real")
    with pytest.raises(ValueError, match="required with a token_manager"):
        RequestsTransport(token_manager=upstream)
    plain = RequestsTransport(
        token_manager=upstream, app_key=KEY, app_secret=SECRET, environment="real"
    )
    assert plain._send is _http._requests_send  # not ours: left as kis-trader's
