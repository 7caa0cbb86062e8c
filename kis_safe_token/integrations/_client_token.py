"""What the client integrations share: the token a third-party client object reads, through our
single flight, issued at the client's own host, and the call policy applied to its answers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ..kis import Verdict, verdict
from ..policy import CallPolicy, backoff_s, drive
from ..ratelimit import RateLimiter
from ..shared import BASE_URL_ENV, SharedToken
from ..storage.base import TokenStorage

__all__ = ["CallMeter", "ClientToken", "ClientTokenHolder", "env_base_url"]

R = TypeVar("R")


class CallMeter:
    """The :class:`~kis_safe_token.policy.CallPolicy` of the call each thread is making through
    an upstream client (nested calls of a thread share the outermost one's: one budget, one
    refresh)."""

    def __init__(self, shared: SharedToken) -> None:
        self.shared = shared
        self._local = threading.local()

    @contextmanager
    def call(self) -> Iterator[CallPolicy]:
        """The policy of this thread's call: new for an outermost call, else the enclosing one's."""
        current: CallPolicy | None = getattr(self._local, "policy", None)
        if current is not None:
            yield current
            return
        # backoff_s is looked up here, at each call: tests make it quick.
        self._local.policy = current = CallPolicy(backoff=backoff_s, on_refusal=self.shared.refused)
        try:
            yield current
        finally:
            self._local.policy = None

    def before_send(self) -> None:
        """A slot for this thread's next HTTP send, if inside :meth:`call`, within the call's
        budget (``RateLimitTimeout`` if none comes in time). Call it once the send's token is in
        hand: a slot taken before a refresh would pass unused while the token is issued."""
        current: CallPolicy | None = getattr(self._local, "policy", None)
        if current is not None:
            self.shared.throttle(current.left_s())

    def run(
        self,
        send: Callable[[], R],
        verdict_of: Callable[[R], Verdict] = verdict,
        *,
        refresh: Callable[[], bool] | None = None,
        slots: bool = True,
    ) -> R:
        """``send()`` as this thread's call, acted on as :func:`~kis_safe_token.policy.drive` says.
        ``slots=False``: ``send`` takes its own slots (:meth:`before_send`); ``refresh``: drop the
        rejected token (``False``: none better); ``verdict_of``: of what ``send`` returns."""
        with self.call() as policy:
            if slots:
                self.before_send()
            return drive(
                policy,
                send(),
                verdict_of,
                lambda _last: send(),
                limiter=self.shared.rate_limiter,
                throttle=self.shared.throttle if slots else None,
                refresh=None if refresh is None else lambda _last: refresh(),
            )


class ClientToken(SharedToken):
    """The token of one third-party ``client`` object, shared through ``token_storage``
    (``None``: from the environment), issued at the client's ``base_url`` as it is at issuance;
    :attr:`meter` hands out the fleet's call-rate slots to the client's calls."""

    def __init__(
        self,
        client: Any,
        api_key: str,
        api_secret: str,
        token_storage: TokenStorage | None,
        *,
        mock: bool = False,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._client = client
        self._served = threading.local()
        super().__init__(
            api_key,
            api_secret,
            token_storage,
            base_url=str(client.base_url),
            mock=mock,
            calls_per_second=calls_per_second,
            rate_limiter=rate_limiter,
        )
        self.meter = CallMeter(self)

    @property
    def base_url(self) -> str:
        """The client's host now (``SharedToken`` issues and revokes there)."""
        return str(self._client.base_url).rstrip("/")

    @base_url.setter
    def base_url(self, value: str) -> None:
        """``SharedToken.__init__`` sets it; the client's own attribute is the one used."""

    def serve(self) -> str:
        """``Bearer <token>`` for a request header, remembered as this thread's last one."""
        bearer = self.bearer
        self._served.bearer = bearer
        return bearer

    def refresh_rejected(self) -> bool:
        """KIS rejected the token this thread served last: drop it (compare-and-delete) and serve
        the fleet's next one; whether that is another token."""
        # The token this thread sent, never the one in memory: that may be the fresh token
        # another thread already got after the same rejection.
        rejected: str | None = getattr(self._served, "bearer", None)
        held = self.in_memory()
        if rejected is None and held is not None:
            rejected = held.bearer
        if rejected:
            self.invalidate(rejected)
        return self.serve() != rejected


class ClientTokenHolder:
    """The token side of a client subclass whose token is a :class:`ClientToken`, made at first
    use from what :meth:`_kst_setup` kept."""

    api_key: str
    api_secret: str

    def _kst_setup(self, token_storage: object, **rate: Any) -> None:
        """Keep the token's arguments; ``TypeError`` unless ``token_storage`` is ours or None."""
        if token_storage is not None and not isinstance(token_storage, TokenStorage):
            raise TypeError(
                "token_storage must be a kis_safe_token storage (FileTokenStorage, "
                f"LockedRedisTokenStorage, ...) or None, not {type(token_storage).__name__}: a "
                "storage without get_or_issue cannot make the fleet's single issuance"
            )
        self._kst_storage = token_storage
        self._kst_rate = rate
        self._kst_token: ClientToken | None = None

    def _kst_shared(self, api_key: str | None = None, api_secret: str | None = None) -> ClientToken:
        if self._kst_token is None:
            self._kst_token = ClientToken(
                self,
                api_key or self.api_key,
                api_secret or self.api_secret,
                self._kst_storage,
                **self._kst_rate,
            )
        return self._kst_token

    def check_access_token(self) -> bool:
        """Whether the store holds a valid token (a read: never issues, never takes the seed
        lease of a store that has it on)."""
        storage = self._kst_shared().token_storage
        return storage.load_token(self.api_key, self.api_secret) is not None

    def load_access_token(self) -> None:
        """Take the fleet's token (issued through the single flight if the store has none)."""
        self._kst_shared().serve()

    def _kst_close(self) -> None:
        if self._kst_token is not None:
            self._kst_token.close()


def env_base_url(base_url: str | None) -> str | None:
    """``base_url``, else ``$KOREA_INVESTMENT_BASE_URL``, else ``None``, without a trailing /."""
    chosen = base_url or os.environ.get(BASE_URL_ENV, "").strip()
    return chosen.rstrip("/") if chosen else None
