"""``KisRealtime``: this process's share of the fleet's one KIS realtime session.

Every ``KisRealtime`` of one app key and token file runs a thread that either leads (holds the
hub's lock, opens the KIS session, serves the others: :class:`~.leader.Leader`) or follows (sends
its wants to the leader and reads its events). When the leader goes, SIGKILL included, the
followers race for the lock; the winner opens a new session, the others connect to it and send
their wants again, and every subscription sees one ``gap`` event in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from cryptography.fernet import Fernet

from ..crypto import channel_key
from ..errors import RealtimeError, RealtimeLimitError, TokenStorageError
from ..kis import REAL_WS_URL, VIRTUAL_WS_URL, WS_URL_ENV
from ..shared import Closing, SharedToken, check_header_value
from ..storage.base import TokenStorage
from ..storage.redis import RedisTokenStorage
from .frames import RealtimeEvent
from .leader import LIMIT, OK, Approval, Leader, Link, Pair, follow
from .local import LocalHub
from .redis_hub import RedisHub, Wants
from .redis_hub import serve as serve_redis

#: Where this process sends its wants: the leader (this process), or the way to it.
Upstream = Leader | Link | Wants

__all__ = ["KisRealtime", "Subscription", "resolve_ws_url"]

logger = logging.getLogger("kis_safe_token.realtime")

#: Events one subscription keeps for a reader that falls behind; older ones are dropped.
BUFFER = 10_000
#: How long :meth:`KisRealtime.subscribe` waits for KIS's answer by default.
ANSWER_TIMEOUT_S = 10.0
#: A follower's wait before it looks for the leader's socket again (the new leader binds it).
_RETRY_S = 0.01


def resolve_ws_url(ws_url: str | None, mock: bool) -> str:
    """``ws_url``, else ``KOREA_INVESTMENT_WS_URL``, else KIS's real or virtual host."""
    url = ws_url or os.environ.get(WS_URL_ENV) or (VIRTUAL_WS_URL if mock else REAL_WS_URL)
    if not url.startswith(("ws://", "wss://")):
        source = "ws_url" if ws_url else WS_URL_ENV
        raise ValueError(f"{source} must be a ws:// or wss:// URL")
    return url


class Subscription:
    """The events of one pair for one subscriber: iterate it (it ends when closed), or
    :meth:`get` with a timeout. ``dropped`` counts events lost to a full buffer."""

    def __init__(self, owner: KisRealtime, pair: Pair, buffer: int) -> None:
        self.tr_id, self.tr_key = pair
        self.dropped = 0
        self._owner = owner
        self._events: deque[RealtimeEvent] = deque()
        self._buffer = buffer
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self._lost = False  # events were dropped: a gap event comes before the next
        self.wake: Callable[[], object] | None = None  # the asyncio side's one-shot wake-up

    def __repr__(self) -> str:
        return f"Subscription({self.tr_id!r}, {self.tr_key!r})"

    def put(self, event: RealtimeEvent) -> None:
        with self._ready:
            if self._closed:
                return
            if len(self._events) >= self._buffer:
                self._events.popleft()
                self.dropped += 1
                self._lost = True
            self._events.append(event)
            self._ready.notify()
            wake, self.wake = self.wake, None
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                wake()

    def pop(self) -> RealtimeEvent | None:
        """The next event if one is here (``None`` otherwise; see :attr:`closed`)."""
        with self._ready:
            return self._next()

    def _next(self) -> RealtimeEvent | None:
        if not self._events:
            return None
        if self._lost:  # what this reader missed came before what is still here
            self._lost = False
            return RealtimeEvent(self.tr_id, self.tr_key, (), time.time(), gap=True)
        return self._events.popleft()

    def ready(self) -> bool:
        """Whether :meth:`get` would return now."""
        with self._ready:
            return bool(self._events) or self._closed

    @property
    def closed(self) -> bool:
        with self._ready:
            return self._closed and not self._events

    def get(self, timeout: float | None = None) -> RealtimeEvent | None:
        """The next event, waiting up to ``timeout`` (``None``: closed, or nothing in time)."""
        with self._ready:
            self._ready.wait_for(lambda: self._events or self._closed, timeout)
            return self._next()

    def __iter__(self) -> Iterator[RealtimeEvent]:
        while (event := self.get()) is not None:
            yield event

    def close(self) -> None:
        """Stop this subscription (the pair is deregistered when nobody in the fleet wants it)."""
        self.end()
        self._owner.unsubscribe(self)

    def end(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
            wake, self.wake = self.wake, None
        if wake is not None:
            with contextlib.suppress(RuntimeError):
                wake()


class KisRealtime(Closing):
    """One app key's realtime events, through the one KIS session of the processes that share
    its token storage (a :class:`~kis_safe_token.FileTokenStorage`: the processes of one host; a
    :class:`~kis_safe_token.RedisTokenStorage`: the fleet).

    ``ws_url``: else ``KOREA_INVESTMENT_WS_URL``, else KIS's real (``mock``: virtual) host;
    ``buffer``: events one subscription keeps for a slow reader.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        token_storage: TokenStorage | None = None,
        *,
        mock: bool = False,
        base_url: str | None = None,
        ws_url: str | None = None,
        buffer: int = BUFFER,
    ) -> None:
        if not isinstance(buffer, int) or buffer < 1:
            raise ValueError("buffer must be a whole number of events, 1 or more")
        self.ws_url = resolve_ws_url(ws_url, mock)
        self._shared = SharedToken(api_key, api_secret, token_storage, mock=mock, base_url=base_url)
        self._hub = _hub_for(self._shared.token_storage, api_key, self.channel_fernet())
        self._buffer = buffer
        self._lock = threading.Condition()
        self._subs: dict[Pair, list[Subscription]] = {}
        self._answers: dict[Pair, tuple[str, str]] = {}
        self._upstream: Upstream | None = None
        self._sending = threading.Lock()  # wants go out in the order decided (before _lock)
        self.leading: Leader | None = None  # this process's session, while it leads
        self._wants_changed = threading.Event()  # a process's wants changed (Redis)
        self.counts = {"events": 0, "gaps": 0, "elections_won": 0}
        self._problem = ""  # why this process can neither lead nor follow, while it cannot
        self._fresh = False  # something came from the session since the last gap
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kis-realtime", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"KisRealtime({self._hub!r}, role={self.role!r})"

    @property
    def role(self) -> str | None:
        """``"leader"`` (this process holds the session), ``"follower"``, or ``None`` while
        it is between leaders."""
        if self.leading is not None:
            return "leader"
        return "follower" if self._upstream is not None else None

    # -- subscribing -------------------------------------------------------------------------
    def subscribe(
        self, tr_id: str, tr_key: str, *, timeout: float = ANSWER_TIMEOUT_S
    ) -> Subscription:
        """The events of ``tr_id`` for ``tr_key`` (e.g. ``"H0STCNT0"``, ``"005930"``), once
        the fleet's session has them registered. :class:`RealtimeLimitError`: the session
        holds KIS's 41 registrations; :class:`RealtimeError`: KIS refused, or no answer
        within ``timeout`` seconds."""
        for name, value in (("tr_id", tr_id), ("tr_key", tr_key)):
            check_header_value(name, value)
            if not value or "\t" in value:
                raise ValueError(f"{name} must be a non-empty code without tabs")
        if self._closed.is_set():
            raise RealtimeError("this KisRealtime is closed")
        pair = (tr_id, tr_key)
        sub = Subscription(self, pair, self._buffer)
        with self._sending:
            with self._lock:
                first = pair not in self._subs
                self._subs.setdefault(pair, []).append(sub)
                upstream = self._upstream if first else None
            if upstream is not None:
                self._want(upstream, pair, True)
        with self._lock:
            self._lock.wait_for(lambda: pair in self._answers or self._closed.is_set(), timeout)
            code, message = self._answers.get(pair, ("", ""))
        if code == OK:
            return sub
        sub.close()
        if code == LIMIT:
            raise RealtimeLimitError(f"{tr_id} {tr_key}: {message}", code=code)
        if code:
            raise RealtimeError(f"KIS refused {tr_id} {tr_key}: {code} {message}", code=code)
        if self._closed.is_set():
            raise RealtimeError(f"{tr_id} {tr_key}: this KisRealtime was closed meanwhile")
        problem = f" ({self._problem})" if self._problem else ""
        raise RealtimeError(f"{tr_id} {tr_key}: no answer within {timeout} s{problem}")

    def unsubscribe(self, sub: Subscription) -> None:
        """What :meth:`Subscription.close` calls."""
        pair = (sub.tr_id, sub.tr_key)
        with self._sending:
            with self._lock:
                subs = self._subs.get(pair, [])
                if sub in subs:
                    subs.remove(sub)
                last = not subs and self._subs.pop(pair, None) is not None
                if last:
                    self._answers.pop(pair, None)
                upstream = self._upstream if last else None
            if upstream is not None:
                self._want(upstream, pair, False)

    def stats(self) -> dict[str, int | str | None]:
        """``role``, ``events`` and ``gaps`` delivered here, ``dropped`` by slow subscribers;
        as leader, also the KIS ``sessions_opened`` and ``sessions_refused``."""
        with self._lock:
            dropped = sum(sub.dropped for subs in self._subs.values() for sub in subs)
            leader = self.leading.counts if self.leading is not None else {}
        return {"role": self.role, **self.counts, "dropped": dropped, **leader}

    def close(self) -> None:
        """Leave the fleet's session (as leader: hand it over) and end every subscription."""
        self._closed.set()
        with self._lock:
            self._lock.notify_all()
            upstream = self._upstream
            subs = [sub for subs in self._subs.values() for sub in subs]
        if self.leading is not None:
            self.leading.stop()
        if upstream is not None and not isinstance(upstream, Leader):
            upstream.close()
        self._thread.join(10)
        for sub in subs:
            sub.end()

    # -- what the leader (or this process's link to it) delivers -----------------------------
    def answer(self, pair: Pair, code: str, message: str) -> None:
        """The session's answer for ``pair``; a refusal (also of a pair registered again after
        a reconnect) ends its subscriptions, and a :meth:`subscribe` waiting for it raises."""
        with self._lock:
            self._fresh = True
            if pair not in self._subs:
                return
            self._answers[pair] = (code, message)
            self._lock.notify_all()
            ended = self._subs.pop(pair) if code != OK else []
            upstream = self._upstream
        for sub in ended:
            sub.end()
        if ended and isinstance(upstream, Wants):  # not wanted any more (on one host the
            upstream.want(pair, False)  # leader kept nothing of a refused pair)
        if ended:
            logger.warning("realtime %s %s refused (%s): its subscriptions end", *pair, code)

    def frame(self, received_at: float, text: str, events: list[RealtimeEvent]) -> None:
        with self._lock:
            self._fresh = True
            for event in events:
                for sub in self._subs.get((event.tr_id, event.tr_key), ()):
                    sub.put(event)
                    self.counts["events"] += 1

    def gap(self) -> None:
        """Events may have been missed: a gap event to each subscription, unless nothing came
        since the last (as when a follower connected to a leader that was dying)."""
        now = time.time()
        with self._lock:
            if not self._fresh:
                return
            self._fresh = False
            for (tr_id, tr_key), subs in self._subs.items():
                for sub in subs:
                    sub.put(RealtimeEvent(tr_id, tr_key, (), now, gap=True))
                    self.counts["gaps"] += 1

    # -- leading or following ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                if isinstance(self._hub, LocalHub):
                    self._serve_local(self._hub)
                else:
                    serve_redis(self, self._hub)
            except TokenStorageError as exc:
                if str(exc) != self._problem:
                    logger.error("KisRealtime: %s", exc)
                self._problem = str(exc)
                self._closed.wait(1.0)
            except Exception:  # a bug must not end the fleet's feed silently
                logger.exception("KisRealtime: the session thread failed; starting again")
                self._closed.wait(1.0)

    def _serve_local(self, hub: LocalHub) -> None:
        """Lead (holding the host's lock) or follow the leader, once."""
        fd = hub.try_lead()
        if fd is not None:
            try:
                self.leading = leader = Leader(self.ws_url, self._approval())
                self.counts["elections_won"] += 1
                self.attach(leader)
                if not self._closed.is_set():
                    leader.serve(hub)
            finally:
                self.leading = None
                self.detach()
                os.close(fd)
            return
        conn = hub.connect()
        if conn is None:  # the new leader is not listening yet
            self._closed.wait(_RETRY_S)
            return
        link = Link(conn)
        try:
            self.attach(link)
            if not self._closed.is_set():
                follow(link, self)  # closes the connection when it ends
        finally:
            conn.close()
            self.detach()

    def channel_fernet(self) -> Fernet:
        """What seals the frames KIS encrypts on a Redis channel (a key from the api_secret)."""
        return Fernet(channel_key(self._shared.api_key, self._shared.api_secret))

    def _approval(self) -> Approval:
        shared = self._shared
        return Approval(lambda: shared.approval_key, shared.invalidate_approval_key)

    def attach(self, upstream: Upstream) -> None:
        """Send every want to ``upstream`` (the leader, or the way to it) from now on."""
        self._problem = ""
        role = "leading" if self.leading is not None else "following"
        logger.info("KisRealtime: %s for %r", role, self._hub)
        with self._sending:
            with self._lock:
                self._upstream = upstream
                pairs = list(self._subs)
            if isinstance(upstream, Wants):  # what was let go while the channel was lost too
                upstream.replace(set(pairs))
                return
            for pair in pairs:
                self._want(upstream, pair, True)

    def detach(self) -> None:
        """The way to the session is lost: a gap (see :meth:`gap`). The answers stay: the
        pairs are registered again by whoever holds the session next (and answered anew)."""
        with self._lock:
            self._upstream = None
        if not self._closed.is_set():
            self.gap()

    def _want(self, upstream: Upstream, pair: Pair, on: bool) -> None:
        if isinstance(upstream, Leader):
            upstream.want(self, pair, on)
        else:
            upstream.want(pair, on)


def _hub_for(storage: TokenStorage, api_key: str, fernet: Fernet) -> LocalHub | RedisHub:
    if isinstance(storage, RedisTokenStorage):
        return RedisHub(storage, storage._get_redis_key(api_key), fernet)
    token_file = getattr(storage, "token_file", None)
    if token_file is None:
        raise ValueError(
            f"KisRealtime shares one session through a FileTokenStorage (one host) or a "
            f"RedisTokenStorage (the fleet); {type(storage).__name__} is neither"
        )
    return LocalHub(token_file, api_key)
