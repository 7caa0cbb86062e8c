"""What the client integrations share: the token a third-party client object reads, through our
single flight, issued at the client's own host.

Clients such as korea-investment-stock and mojito2 build every request's ``authorization`` header
from ``self.access_token``. The integrations make that attribute a property served by a
:class:`ClientToken`: a :class:`~kis_safe_token.shared.SharedToken` that issues at the client's
current ``base_url`` (read at issuance, so ``set_base_url`` or a subclass redirects it, as in the
client itself) and remembers, per thread, the token it served last, so the one a rejected call
sent is the one dropped (compare-and-delete), never a fresh one another thread already got.

The call-rate limit is shared here too. Each integration takes one slot of its token's fleet-wide
limiter (:meth:`~kis_safe_token.shared.SharedToken.throttle`, the limiter ``KoreaInvestment`` and
``KisAuth`` use for the same app key and storage) right before every KIS REST call the upstream
code sends, and answers ``EGW00201`` as :mod:`kis_safe_token.auth` does: tell the limiter
(``penalize``), back off with jitter, re-send, at most ``RETRY_ATTEMPTS`` times within
``RETRY_BUDGET_S`` (:class:`CallSlots`, :func:`send_metered`, :class:`CallMeter`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ..auth import RETRY_ATTEMPTS, RETRY_BUDGET_S, backoff_s
from ..kis import TOKEN_REJECTED, TOO_MANY_CALLS
from ..ratelimit import RateLimiter, RateLimitTimeout
from ..ratelimit.base import ACQUIRE_TIMEOUT_S
from ..shared import BASE_URL_ENV, SharedToken
from ..storage.base import TokenStorage

__all__ = [
    "CallMeter",
    "answer_code",
    "CallSlots",
    "ClientToken",
    "checked_storage",
    "env_base_url",
    "send_metered",
    "token_rejected",
    "too_many_calls",
]

R = TypeVar("R")


class CallSlots:
    """The fleet-limiter slots of one logical call (the first send and its ``EGW00201``
    re-sends), and the re-send budget of :class:`~kis_safe_token.KisAuth`: at most
    ``RETRY_ATTEMPTS`` re-sends within ``RETRY_BUDGET_S`` of the first refusal."""

    def __init__(self, shared: SharedToken) -> None:
        self._shared = shared
        self._resends = 0
        self._first_refusal: float | None = None

    def take(self) -> None:
        """Wait for a slot right before one HTTP send (no-op without a limiter). After a
        refusal the wait is bounded by what is left of the budget.
        :class:`~kis_safe_token.ratelimit.RateLimitTimeout` if no slot comes in time."""
        if self._first_refusal is None:
            self._shared.throttle(ACQUIRE_TIMEOUT_S)
        else:
            self._shared.throttle(RETRY_BUDGET_S - (time.monotonic() - self._first_refusal))

    def refused(self) -> bool:
        """KIS answered the last send ``EGW00201``: tell the limiter (it halves the fleet's rate
        for a while, logged once) and, if the budget allows another re-send, sleep the jittered
        back-off and return ``True``; ``False``: give the caller KIS's answer."""
        limiter: RateLimiter | None = self._shared.rate_limiter
        if limiter is not None:
            limiter.penalize()
        now = time.monotonic()
        if self._first_refusal is None:
            self._first_refusal = now
        if self._resends >= RETRY_ATTEMPTS:
            return False
        pause = backoff_s(self._resends)
        if RETRY_BUDGET_S - (now - self._first_refusal) - pause <= 0:
            return False
        time.sleep(pause)
        self._resends += 1
        return True


def send_metered(slots: CallSlots, send: Callable[[], R], code_of: Callable[[R], object]) -> R:
    """``send()`` in a slot of the fleet's limiter; while its answer is ``EGW00201``
    (``code_of(answer)``) and the budget allows, back off and send again in a new slot. The
    last answer is returned (KIS's ``EGW00201`` when the budget is spent or no slot comes)."""
    slots.take()
    answer = send()
    while code_of(answer) == TOO_MANY_CALLS and slots.refused():
        try:
            slots.take()
        except RateLimitTimeout:
            break
        answer = send()
    return answer


class CallMeter:
    """The :class:`CallSlots` of the call each thread is making through an upstream client
    (nested calls of the same thread share the outermost one's), for hooks that see the start of
    a call and each HTTP send at different places."""

    def __init__(self, shared: SharedToken) -> None:
        self.shared = shared
        self._local = threading.local()

    @contextmanager
    def call(self) -> Iterator[CallSlots]:
        """The slots of this thread's call: new for an outermost call, else the enclosing one's."""
        current: CallSlots | None = getattr(self._local, "slots", None)
        if current is not None:
            yield current
            return
        self._local.slots = current = CallSlots(self.shared)
        try:
            yield current
        finally:
            self._local.slots = None

    def before_send(self) -> None:
        """A slot for the HTTP send this thread is about to make, if it is inside :meth:`call`
        (a read of the token outside a call, say by the user, takes none). Call it once the
        send's token is in hand, as ``KisAuth`` does: a slot taken before a refresh would pass
        unused while the token is issued."""
        current: CallSlots | None = getattr(self._local, "slots", None)
        if current is not None:
            current.take()


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

    def refresh_rejected(self) -> str:
        """KIS rejected the token this thread served last: drop it from the store if the store
        still holds it (compare-and-delete) and serve the fleet's next one (one issuance for all
        the processes that saw it rejected)."""
        rejected: str | None = getattr(self._served, "bearer", None)
        if rejected is None and self._token is not None:
            rejected = self._token.access_token
        if rejected:
            self.invalidate(rejected)
        return self.serve()


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


def token_rejected(answer: object) -> bool:
    """Whether a KIS answer (a client's parsed JSON) says the token sent was rejected:
    ``EGW00123`` (expired) or ``EGW00121`` (invalid), or, for gateways that answer without the
    code, a failure whose message says the token expired (``기간이 만료된 token 입니다.``), the
    test korea-investment-stock makes."""
    if not isinstance(answer, dict) or answer.get("rt_cd") == "0":
        return False
    if answer.get("msg_cd") in TOKEN_REJECTED:
        return True
    message = str(answer.get("msg1") or "")
    return "만료" in message and "token" in message.lower()


def too_many_calls(answer: object) -> bool:
    """Whether a KIS answer (a client's parsed JSON) is ``EGW00201`` (too many calls per second
    for the app key)."""
    return isinstance(answer, dict) and answer.get("msg_cd") == TOO_MANY_CALLS


def answer_code(answer: object) -> object:
    """``msg_cd`` of a KIS answer (a client's parsed JSON), else ``None``."""
    return answer.get("msg_cd") if isinstance(answer, dict) else None
