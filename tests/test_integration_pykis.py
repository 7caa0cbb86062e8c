"""kis_safe_token.integrations.pykis: python-kis 2.1.6 (the real package) with the fleet's single
flight and its own EGW00123 reset turned into a compare-and-delete, against the simulator. The
behaviour every integration owes is :class:`integration_contract.IntegrationContract`'s; the
tests below it are this client's."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from integration_contract import IntegrationContract
from upstream_herd import (
    UPSTREAM_ACCOUNT,
    UPSTREAM_APP_KEY,
    UPSTREAM_SECRET,
    UpstreamHerdResult,
    require_client,
    upstream_simulator,
)

from kis_safe_token.errors import TokenIssueError
from kis_safe_token.kis import (
    PRICE_PATH,
    PRICE_TR_ID,
    RATE_LIMITED,
    TOKEN_INVALID,
    TOKEN_PATH,
)
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator

require_client("pykis")  # [dev] installs python-kis

import pykis.kis  # noqa: E402
from pykis.api.stock.quote import domestic_quote  # noqa: E402

from kis_safe_token.integrations import pykis as integration  # noqa: E402
from kis_safe_token.integrations.pykis import PyKis  # noqa: E402

KEY, SECRET, ACCOUNT = UPSTREAM_APP_KEY, UPSTREAM_SECRET, UPSTREAM_ACCOUNT
VKEY, VSECRET = "PSvirtualHerdKey".ljust(36, "0"), "virtual-secret-".ljust(180, "v")
QUOTE = {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}


@pytest.fixture
def usim(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[KisSimulator]:
    """The simulator, with pykis's hosts (module constants, read per call) pointed at it and
    HOME in the test's folder (pykis's cache would go to ~/.pykis)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with upstream_simulator(apps={KEY: SECRET, VKEY: VSECRET}) as simulator:
        monkeypatch.setattr(pykis.kis, "REAL_DOMAIN", simulator.base_url)
        monkeypatch.setattr(pykis.kis, "VIRTUAL_DOMAIN", simulator.base_url)
        yield simulator


def client(storage: TokenStorage, **kwargs: Any) -> PyKis:
    return PyKis(
        id="tester",
        account=ACCOUNT,
        appkey=KEY,
        secretkey=SECRET,
        use_websocket=False,
        token_storage=storage,
        **kwargs,
    )


def price(kis: PyKis, domain: str = "real") -> str:
    """A quote through pykis's own fetch/request loop."""
    answer = kis.fetch(PRICE_PATH, api=PRICE_TR_ID, params=dict(QUOTE), domain=domain)
    return str(answer.output.stck_prpr)


def stored(storage: FileTokenStorage, key: str = KEY, secret: str = SECRET) -> str | None:
    data = storage.load_token(key, secret)
    return None if data is None else str(data["access_token"])


class TestPyKis(IntegrationContract):
    """No host setting (pykis joins its module constants REAL_DOMAIN/VIRTUAL_DOMAIN per call:
    ``usim`` points them, test_issuance_goes_where_pykis_sends checks it) and no storage
    keyword of upstream's to refuse (test_keep_token_and_handed_in_tokens_are_refused): not a
    :class:`integration_contract.BrokerContract`."""

    SCENARIO = "upstream_clients.pykis_scenario"
    SHIPPED_HERD = {"expire_between": False}
    SHIPPED_ERRORS = ("KisHTTPError", RATE_LIMITED)
    SHIPPED_CACHE = "home:.pykis/cache/token_real_*"  # plaintext JSON (keep_token=True)
    DISTRIBUTION, PINNED_VERSION, INTEGRATION = "python-kis", "2.1.6", integration

    def make_client(self, usim: KisSimulator, storage: TokenStorage) -> PyKis:
        return client(storage)

    def make_default_client(self, usim: KisSimulator) -> PyKis:
        return PyKis(
            id="tester", account=ACCOUNT, appkey=KEY, secretkey=SECRET, use_websocket=False
        )

    def storage_of(self, client: PyKis) -> TokenStorage:
        return client.token_storage

    def price(self, client: PyKis) -> bool:
        return bool(price(client))

    def token_of(self, client: PyKis) -> str:
        return str(client.token.token)

    def refresh_rejected(self, client: PyKis, sent: str) -> None:
        """pykis resets self._token after EGW00123 without saying which token was rejected: the
        one dropped is the one this thread sent."""
        client._token = None  # what pykis's loop does after EGW00123 (kis.py:589)

    def own_cache(self, tmp_path: Path) -> Path:
        return tmp_path / "home"  # ~/.pykis/cache

    def assert_shipped_later_rounds(self, result: UpstreamHerdResult) -> None:
        """Nothing: the shipped herd runs without an expiry between its rounds."""

    def assert_upstream_unmoved(self) -> None:
        upstream = pykis.PyKis
        params = inspect.signature(upstream.__init__).parameters
        assert list(params)[:3] == ["self", "auth", "virtual_auth"]
        names = {"keep_token", "token", "virtual_token", "appkey", "secretkey", "virtual_appkey"}
        assert names <= set(params)
        for name in ("token", "primary_token"):
            assert isinstance(inspect.getattr_static(upstream, name), property)
        assert list(inspect.signature(upstream.discard).parameters) == ["self", "domain"]
        token_api = pykis.api.auth.token
        assert list(inspect.signature(token_api.token_issue).parameters) == ["self", "domain"]
        assert list(inspect.signature(token_api.token_revoke).parameters) == ["self", "token"]
        kis_py = Path(inspect.getfile(upstream)).read_text(encoding="utf-8").splitlines()
        expected = {
            419: "self._token = token if isinstance(token, KisAccessToken) else KisAccessToken.load(token) if token else None",  # noqa: E501
            420: "self._virtual_token = (",
            425: "self._sessions = {",
            555: "while True:",
            559: '(self.token if domain == "real" else self.primary_token).build(request_headers)',
            505: "def request(",
            561: "resp = session.request(",
            563: 'url=urljoin(REAL_DOMAIN if domain == "real" else VIRTUAL_DOMAIN, path),',
            586: 'case "EGW00123":',
            589: "self._token = None",
            591: "self._virtual_token = None",
            594: "raise KisHTTPError(response=resp)",
            666: "def token(self) -> KisAccessToken:",
            687: "def primary_token(self) -> KisAccessToken:",
            709: 'def discard(self, domain: Literal["real", "virtual"] | None = None) -> None:',
        }
        for line, text in expected.items():
            assert kis_py[line - 1].strip() == text, f"pykis/kis.py:{line} moved"
        token_py = Path(inspect.getfile(token_api)).read_text(encoding="utf-8").splitlines()
        assert token_py[80 - 1].strip() == '"/oauth2/tokenP",', "pykis/api/auth/token.py:80 moved"


# -- the token pykis reads -------------------------------------------------------------------------
def test_no_network_at_construction_and_one_issuance_for_many_calls(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    kis = client(storage)
    assert usim.counts["issue_requests"] == 0  # lazy, as pykis is
    assert price(kis) and domestic_quote(kis, "005930").price
    assert usim.issued == 1 and stored(storage) == kis.token.token
    assert client(storage).token.token == kis.token.token and usim.issued == 1


def test_a_reset_from_a_thread_that_sent_nothing_drops_nothing(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    """pykis's reset names no token (the contract's late-refresh test has a thread drop the one
    it sent): a thread that sent none has none to drop."""
    kis = client(storage)
    assert price(kis)
    current = kis.token.token
    idle = threading.Thread(target=lambda: setattr(kis, "_token", None))  # sent nothing
    idle.start()
    idle.join()
    assert stored(storage) == current and kis.token.token == current and usim.issued == 1


def test_virtual_mode_shares_the_virtual_app_keys_token(
    usim: KisSimulator, storage: FileTokenStorage
) -> None:
    def virtual_client() -> PyKis:
        return client(storage, virtual_id="tester", virtual_appkey=VKEY, virtual_secretkey=VSECRET)

    kis = virtual_client()
    assert kis.virtual and price(kis, "virtual")
    assert usim.issued == 1 and stored(storage, VKEY, VSECRET) == kis.primary_token.token
    assert stored(storage) is None  # the real app key was never used
    usim.expire_tokens()
    stale = kis.primary_token.token
    assert price(virtual_client(), "virtual") and usim.issued == 2
    assert price(kis, "virtual") and usim.issued == 2  # kis._virtual_token = None path
    assert stored(storage, VKEY, VSECRET) not in (None, stale)


def test_discard_revokes_and_drops_the_token(usim: KisSimulator, storage: FileTokenStorage) -> None:
    kis = client(storage)
    client(storage).discard()  # nothing fetched yet: nothing to revoke
    assert usim.counts["revoke_requests"] == 0
    price(kis)
    kis.discard()
    assert usim.counts["revoke_requests"] == 1 and stored(storage) is None
    assert kis._token is None


def test_a_token_another_process_discarded_is_replaced(
    monkeypatch: pytest.MonkeyPatch, storage: FileTokenStorage
) -> None:
    """discard() in one process revokes the fleet's token; another still holding it meets
    EGW00121 (pykis raises it) and gets the fleet's next token instead."""
    with upstream_simulator(issue_window_s=0.0) as sim:
        monkeypatch.setattr(pykis.kis, "REAL_DOMAIN", sim.base_url)
        first, second = client(storage), client(storage)
        price(first), price(second)
        first.discard()
        assert price(second) and sim.counts[TOKEN_INVALID] == 1 and sim.issued == 2
        assert price(first) and sim.issued == 2 and first.token.token == second.token.token
        token_call = pykis.api.auth.token.token_revoke  # auth=False calls are left alone
        with pytest.raises(pykis.client.exceptions.KisHTTPError):
            token_call(second, "not-a-token")


# -- issuance through pykis's own path ------------------------------------------------------------
def test_egw00133_is_sat_out_not_raised(tmp_path: Path, storage: FileTokenStorage) -> None:
    """A token issued outside the storage (another tool, a holder that died after KIS answered)
    makes KIS refuse ours for a minute: the holder waits the window out and retries."""
    # The window ends with the second refusal (ours below, then the holder's first ask), not
    # after a second of wall clock that a loaded machine could let pass before either.
    with upstream_simulator(refusals_per_window=2) as sim:
        pykis.kis.REAL_DOMAIN, real = sim.base_url, pykis.kis.REAL_DOMAIN
        try:
            body = {"grant_type": "client_credentials", "appkey": KEY, "appsecret": SECRET}
            assert requests.post(sim.base_url + TOKEN_PATH, json=body, timeout=5).ok
            kis = client(storage)
            shared = kis._kst_tokens["real"]
            with pytest.raises(TokenIssueError) as refused:
                shared._issue()  # pykis's KisHTTPError, as ours
            assert refused.value.code == RATE_LIMITED and refused.value.status == 403
            assert refused.value.retry_after_s == shared.rate_limit_wait_s
            assert SECRET not in str(refused.value) and KEY not in str(refused.value)
            shared.rate_limit_wait_s = 1.5  # stands for KIS's minute
            assert price(kis) and sim.issued == 2 and sim.rate_limited == 2
        finally:
            pykis.kis.REAL_DOMAIN = real


def test_a_hanging_token_call_times_out(usim: KisSimulator, storage: FileTokenStorage) -> None:
    """pykis sends without a timeout; its token call gets ours (it holds the issuance lock)."""
    kis = client(storage)
    kis._kst_tokens["real"].timeout = (1.0, 0.3)
    usim.issue_gate.clear()  # tokenP hangs
    release = threading.Timer(10.0, usim.issue_gate.set)  # bounds the test if the timeout fails
    release.start()
    try:
        started = time.monotonic()
        with pytest.raises(TokenIssueError, match="ReadTimeout"):
            price(kis)
        assert time.monotonic() - started < 5.0
    finally:
        usim.issue_gate.set()
        release.cancel()


def test_issuance_goes_where_pykis_sends(storage: FileTokenStorage) -> None:
    """Issued at pykis.kis.REAL_DOMAIN as pykis reads it per call (no host of our own)."""
    with upstream_simulator() as first, upstream_simulator() as second:
        real = pykis.kis.REAL_DOMAIN
        try:
            pykis.kis.REAL_DOMAIN = first.base_url
            kis = client(storage)
            pykis.kis.REAL_DOMAIN = second.base_url  # after construction: still followed
            assert price(kis)
        finally:
            pykis.kis.REAL_DOMAIN = real
        assert (first.counts["issue_requests"], second.issued) == (0, 1)


# -- pykis's own cache -----------------------------------------------------------------------------
def test_keep_token_and_handed_in_tokens_are_refused(storage: FileTokenStorage) -> None:
    with pytest.raises(ValueError, match="keep_token is not supported"):
        client(storage, keep_token=True)
    with pytest.raises(ValueError, match="token / virtual_token are not supported"):
        client(storage, token="/some/token.json")
    kis = client(storage)
    with pytest.raises(ValueError, match="cannot be set"):
        kis.token = None


def test_nothing_is_written_under_home(
    usim: KisSimulator, storage: FileTokenStorage, tmp_path: Path
) -> None:
    kis = client(storage)
    price(kis)
    usim.expire_tokens()
    price(kis)
    kis.discard()
    home = tmp_path / "home"
    assert not home.exists() or list(home.rglob("*")) == []
