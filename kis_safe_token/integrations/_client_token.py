"""What the client integrations share: the token a third-party client object reads, through our
single flight, issued at the client's own host, and the call policy applied to its answers.

A :class:`ClientToken` issues at the client's current ``base_url`` (read at issuance, so
``set_base_url`` or a subclass redirects it) and remembers, per thread, the token it served
last, so the one a rejected call sent is the one dropped (compare-and-delete), never a fresh one
another thread already got. :class:`CallMeter` takes a slot of the fleet's limiter before each
REST call and acts on each answer as :mod:`kis_safe_token.policy` says.
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

__all__ = ["CallMeter", "ClientToken", "checked_storage", "env_base_url"]

R = TypeVar("R")


class CallMeter:
    """The :class:`~kis_safe_token.policy.CallPolicy` of the call each thread is making through
    an upstream client (nested calls of the same thread share the outermost one's: one budget,
    one refresh), for hooks that see the start of a call and each HTTP send at different
    places."""

    def __init__(self, shared: SharedToken) -> None:
        self.shared = shared
        self._local = threading.local()

    @contextmanager
    def call(self) -> Iterator[CallPolicy]:
        """The policy of this thread's call: new for an outermost call, else the enclosing
        one's."""
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
        """A slot for the HTTP send this thread is about to make, if it is inside :meth:`call`
        (a read of the token outside a call, say by the user, takes none), waited for within
        what is left of the call's budget. Call it once the send's token is in hand, as
        ``KisAuth`` does: a slot taken before a refresh would pass unused while the token is
        issued. :class:`~kis_safe_token.ratelimit.RateLimitTimeout` if no slot comes in time."""
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
        """``send()`` as this thread's call, acted on as its policy says
        (:func:`~kis_safe_token.policy.drive`): each send in a slot (``slots=False``: ``send``
        takes its own, :meth:`before_send`); ``refresh`` drops the token sent after a rejection
        (``False``: none better to send); ``verdict_of``: of the answer ``send`` returns (default:
        its parsed JSON)."""
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
    """The token of one third-party ``client`` object (its ``api_key``/``api_secret`` are passed
    here), shared through ``token_storage`` (``None``: from the environment). ``mock``,
    ``calls_per_second`` and ``rate_limiter`` choose the fleet-wide call-rate limit as in
    :class:`SharedToken`; :attr:`meter` hands out its slots to the client's calls."""

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
        """KIS rejected the token this thread served last: drop it from the store if the store
        still holds it (compare-and-delete) and serve the fleet's next one (one issuance for all
        the processes that saw it rejected); whether that is another token."""
        rejected: str | None = getattr(self._served, "bearer", None)
        held = self.in_memory()
        if rejected is None and held is not None:
            rejected = held.bearer
        if rejected:
            self.invalidate(rejected)
        return self.serve() != rejected


def checked_storage(token_storage: object) -> TokenStorage | None:
    """``token_storage`` if it is one of ours (or ``None``); ``TypeError`` otherwise."""
    if token_storage is None or isinstance(token_storage, TokenStorage):
        return token_storage
    raise TypeError(
        "token_storage must be a kis_safe_token storage (FileTokenStorage, "
        f"LockedRedisTokenStorage, ...) or None, not {type(token_storage).__name__}: a storage "
        "without get_or_issue cannot make the fleet's single issuance"
    )


def env_base_url(base_url: str | None) -> str | None:
    """``base_url``, else ``$KOREA_INVESTMENT_BASE_URL``, else ``None`` (the client's own host),
    without a trailing slash."""
    chosen = base_url or os.environ.get(BASE_URL_ENV, "").strip()
    return chosen.rstrip("/") if chosen else None
