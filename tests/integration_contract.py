"""The behaviour every client integration owes, written once: each
``test_integration_<client>.py`` subclasses :class:`IntegrationContract` (the two broker-shaped
ones, korea-investment-stock and mojito2, :class:`BrokerContract`) and supplies the hooks: how
to build its client, make a price call through the client's own request path, read the token it
sends, and what its upstream looks like as shipped. The model is keyring's
``keyring.testing.backend.BackendBasicTests``.

Test machinery, imported as ``integration_contract`` (pytest puts ``tests/`` on ``sys.path``; the
name keeps pytest from collecting it, and the class names from collecting the contracts
themselves: only the ``Test<Client>`` subclasses run). ``conftest.py`` registers it for
pytest's assertion rewriting.

Fixtures a subclass's module provides: ``usim``, the simulator the client is pointed at (the
herd's credentials, :func:`upstream_herd.upstream_simulator`); ``storage`` comes from
``conftest.py``. Its own token-cache folder (HOME, the working directory) is the module's
autouse fixture's business.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from fnmatch import fnmatchcase
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from upstream_herd import (
    UPSTREAM_APP_KEY,
    UPSTREAM_SECRET,
    UpstreamHerdResult,
    run_shipped_herd,
)

from kis_safe_token.kis import TOKEN_EXPIRED
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token

KEY, SECRET = UPSTREAM_APP_KEY, UPSTREAM_SECRET
THREADS = 8


def price_ok(answer: dict[str, Any]) -> bool:
    """A KIS price answer (as the broker-shaped clients return it) that carries a price."""
    return answer.get("rt_cd") == "0" and bool(answer["output"]["stck_prpr"])


def stored_token(storage: TokenStorage, key: str = KEY, secret: str = SECRET) -> str | None:
    """The access token ``storage`` holds for the app key (without ``Bearer``), or ``None``."""
    data = storage.load_token(key, secret)
    return None if data is None else str(data["access_token"])


class IntegrationContract:
    """Tests every integration passes. Hooks a subclass supplies (class attributes, then
    methods); a hook whose answer legitimately differs per client says so in its override."""

    #: ``upstream_clients.<client>_scenario``: the client as shipped, for the baseline herd.
    SCENARIO: ClassVar[str]
    #: Keywords of :func:`upstream_herd.run_shipped_herd` (``rounds``, ``expire_between``).
    SHIPPED_HERD: ClassVar[dict[str, Any]] = {}
    #: Text every error of the shipped herd's round 0 contains (the crash of its 3 refused).
    SHIPPED_ERRORS: ClassVar[tuple[str, ...]]
    #: ``fnmatch`` pattern (``home:``/``cwd:`` + path) of the cache the shipped client writes.
    SHIPPED_CACHE: ClassVar[str]
    #: The distribution on PyPI, and the release the integration's overrides were written for.
    DISTRIBUTION: ClassVar[str]
    PINNED_VERSION: ClassVar[str]
    #: ``kis_safe_token.integrations.<client>``.
    INTEGRATION: ClassVar[ModuleType]

    # -- hooks -------------------------------------------------------------------------------------
    def make_client(self, usim: KisSimulator, storage: TokenStorage) -> Any:
        """The client through the integration, on ``storage``, pointed at ``usim``."""
        raise NotImplementedError

    def make_default_client(self, usim: KisSimulator) -> Any:
        """The client built without ``token_storage`` (ours from the environment)."""
        raise NotImplementedError

    def storage_of(self, client: Any) -> TokenStorage:
        """The storage ``client``'s tokens come from."""
        raise NotImplementedError

    def price(self, client: Any) -> bool:
        """One price call through the client's own request path; whether it got a price."""
        raise NotImplementedError

    def other_price(self, client: Any) -> bool:
        """Another of the client's request methods, if it wraps more than one on its own; the
        first client of the two-client refresh sends through it."""
        return self.price(client)

    def token_of(self, client: Any) -> str:
        """The access token ``client`` sends next (without ``Bearer``)."""
        raise NotImplementedError

    def refresh_rejected(self, client: Any, sent: str) -> None:
        """What the client does when KIS rejects ``sent``, the token this thread sent."""
        raise NotImplementedError

    def own_cache(self, tmp_path: Path) -> Path:
        """Where the client as shipped keeps its token cache in this test (its HOME, cwd, ...)."""
        raise NotImplementedError

    def assert_shipped_later_rounds(self, result: UpstreamHerdResult) -> None:
        """What the shipped herd's rounds after round 0 show (each client says what, or why
        nothing)."""
        raise NotImplementedError

    def assert_upstream_unmoved(self) -> None:
        """The signatures and source lines of upstream the overrides depend on."""
        raise NotImplementedError

    # -- the fleet ---------------------------------------------------------------------------------
    def test_as_shipped_the_herd_crashes_and_writes_its_own_cache(self, tmp_path: Path) -> None:
        """The harness sees what the integration fixes (so the zeros of its herd test in
        ``test_integration_herds.py`` mean something): of 4 processes as shipped, the 3 that
        KIS refuses within its minute crash, and the client writes its own token cache."""
        result = run_shipped_herd(self.SCENARIO, tmp_path, **self.SHIPPED_HERD)
        assert result.rate_limited[0] == 3 and result.crashed(0) == 3, result.summary()
        assert all(all(text in e for text in self.SHIPPED_ERRORS) for e in result.errors(0)), (
            result.summary()
        )
        self.assert_shipped_later_rounds(result)
        cache = result.cache_files()
        assert any(fnmatchcase(f, self.SHIPPED_CACHE) for f in cache), cache

    # -- storage -----------------------------------------------------------------------------------
    @pytest.mark.parametrize("kind", [None, "file"], ids=["storage-unset", "storage-file"])
    def test_default_storage_is_ours_from_the_environment(
        self,
        kind: str | None,
        usim: KisSimulator,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        token_file = tmp_path / "env" / "token.json"
        if kind is not None:
            monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_STORAGE", kind)
        monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_FILE", str(token_file))
        client = self.make_default_client(usim)
        storage = self.storage_of(client)
        assert isinstance(storage, FileTokenStorage)
        assert Path(storage.token_file) == token_file
        assert self.price(client) and storage.check_token_valid(KEY, SECRET)
        assert token_file.exists()
        cache = self.own_cache(tmp_path)
        assert not cache.exists() or list(cache.rglob("*")) == []  # upstream's never written

    # -- the token ---------------------------------------------------------------------------------
    def test_refresh_after_expiry_drops_the_stale_token_with_one_extra_send(
        self, usim: KisSimulator, storage: TokenStorage
    ) -> None:
        client = self.make_client(usim, storage)
        assert self.price(client) and usim.issued == 1
        stale = self.token_of(client)
        usim.expire_tokens()
        before = usim.counts["price_requests"]
        assert self.price(client)
        # one rejected send, one more with the fleet's next token, never the stale one again
        assert usim.counts["price_requests"] - before == 2 and usim.counts[TOKEN_EXPIRED] == 1
        assert usim.issued == 2 and stored_token(storage) not in (None, stale)
        assert self.token_of(client) == stored_token(storage)

    def test_refresh_after_expiry_reuses_a_token_another_client_got(
        self, usim: KisSimulator, storage: TokenStorage
    ) -> None:
        """Two clients (two processes' worth) hold the same token; after the expiry the first
        refreshes. Compare-and-delete: the second drops only the token it sent (already gone),
        so it takes the first one's fresh token instead of deleting it and issuing a third."""
        first, second = self.make_client(usim, storage), self.make_client(usim, storage)
        assert self.price(first) and self.price(second)
        usim.expire_tokens()
        assert self.other_price(first) and usim.issued == 2
        fresh = stored_token(storage)
        assert self.price(second) and usim.issued == 2 and usim.rate_limited == 0
        assert usim.counts[TOKEN_EXPIRED] == 2
        assert stored_token(storage) == fresh == self.token_of(second) == self.token_of(first)

    def test_a_late_refresh_drops_only_the_token_its_thread_sent(
        self, usim: KisSimulator, storage: TokenStorage
    ) -> None:
        """A thread whose expired answer comes after another thread refreshed drops the token it
        sent (gone already), not the fresh one, so no second issuance (refused within the
        minute)."""
        client = self.make_client(usim, storage)
        sent, go, tokens = threading.Event(), threading.Event(), []

        def late() -> None:
            tokens.append(self.token_of(client))  # this thread's header: the first token
            sent.set()
            go.wait(10)
            self.refresh_rejected(client, tokens[0])  # the client's own reaction to EGW00123
            tokens.append(self.token_of(client))

        thread = threading.Thread(target=late)
        thread.start()
        assert sent.wait(10)
        usim.expire_tokens()
        assert self.price(client) and usim.issued == 2  # this thread refreshes first
        fresh = self.token_of(client)
        assert fresh != tokens[0] and stored_token(storage) == fresh
        go.set()
        thread.join(30)
        assert tokens[1:] == [fresh] and self.token_of(client) == fresh
        assert usim.issued == 2 and usim.rate_limited == 0
        assert stored_token(storage) == fresh

    def test_threads_sharing_a_client_refresh_once(
        self, usim: KisSimulator, storage: TokenStorage
    ) -> None:
        """8 threads of one client meet the expired token together: each drops the token it
        sent, not the one another thread just got (which would cost a second issuance within
        KIS's minute), so the fleet's token is issued once more, not eight times."""
        client = self.make_client(usim, storage)
        assert self.price(client)
        usim.expire_tokens()
        start = threading.Barrier(THREADS)
        answers: list[bool] = []

        def call() -> None:
            start.wait(10)
            answers.append(self.price(client))

        threads = [threading.Thread(target=call) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == [True] * THREADS
        assert usim.issued == 2 and usim.rate_limited == 0

    # -- packaging and the upstream version --------------------------------------------------------
    def test_upstream_is_the_version_the_overrides_were_written_for(self) -> None:
        """Fails loudly when an upgrade moves what the overrides depend on (the integration
        manual, docs/integrations.md)."""
        installed = importlib.metadata.version(self.DISTRIBUTION)
        assert installed == self.INTEGRATION.UPSTREAM_VERSION == self.PINNED_VERSION
        self.assert_upstream_unmoved()


class BrokerContract(IntegrationContract):
    """The integrations that are a ``KoreaInvestment`` broker (korea-investment-stock,
    mojito2): a ``base_url`` keyword, ``$KOREA_INVESTMENT_BASE_URL``, a ``token_storage`` keyword
    that refuses a storage not ours, ``check_access_token`` and an ``access_token`` attribute
    (``Bearer <token>``). The client of the hooks is the broker."""

    #: The host a broker built without ``base_url`` (or its variable) uses: upstream's.
    DEFAULT_HOST: ClassVar[str]

    def make_hostless_broker(self, storage: TokenStorage) -> Any:
        """The broker on ``storage`` built without ``base_url``."""
        raise NotImplementedError

    def foreign_storage(self, tmp_path: Path) -> object:
        """A token store the broker's upstream would take, not one of ours."""
        raise NotImplementedError

    def assert_base_url_followed(self, broker: Any, usim: KisSimulator) -> None:
        """What else of the broker's shows that the keyword's host is the one used."""
        raise NotImplementedError

    def token_of(self, client: Any) -> str:
        bearer = str(client.access_token)
        assert bearer.startswith("Bearer ")
        return bearer.removeprefix("Bearer ")

    # -- host and storage --------------------------------------------------------------------------
    def test_base_url_keyword_is_the_host_of_every_call(
        self, usim: KisSimulator, storage: TokenStorage
    ) -> None:
        broker = self.make_client(usim, storage)
        assert broker.base_url == usim.base_url and usim.issued == 1
        assert self.price(broker)
        self.assert_base_url_followed(broker, usim)

    def test_base_url_from_the_environment(
        self, usim: KisSimulator, storage: TokenStorage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("KOREA_INVESTMENT_BASE_URL", usim.base_url)
        broker = self.make_hostless_broker(storage)
        assert broker.base_url == usim.base_url and usim.issued == 1
        assert self.price(broker) and usim.issued == 1

    def test_default_host_is_upstreams(self, storage: TokenStorage) -> None:
        # A stored token: construction needs no network, so the real host is never called.
        storage.save_token(Token("stored-token", time.time() + 3600).to_token_data(KEY, SECRET))
        broker = self.make_hostless_broker(storage)
        assert broker.base_url == self.DEFAULT_HOST
        assert broker.access_token == "Bearer stored-token"

    def test_upstream_storage_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError, match="token_storage must be a kis_safe_token storage"):
            self.make_hostless_broker(self.foreign_storage(tmp_path))  # type: ignore[arg-type]

    # -- the token ---------------------------------------------------------------------------------
    def test_check_access_token_is_a_pure_read(
        self, usim: KisSimulator, storage: TokenStorage
    ) -> None:
        broker = self.make_client(usim, storage)
        assert broker.check_access_token() is True
        storage.delete_token(KEY, SECRET)
        assert broker.check_access_token() is False
        assert broker.check_access_token() is False
        assert usim.issued == 1 and usim.counts["issue_requests"] == 1
