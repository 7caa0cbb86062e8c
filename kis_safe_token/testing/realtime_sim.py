"""The simulator's websocket half: KIS's realtime protocol on 127.0.0.1 (needs ``[realtime]``).

``with KisSimulator() as sim, RealtimeSimulator(sim) as rt:`` serves ``rt.ws_url``. A session
registers pairs with an approval key from ``sim``'s ``/oauth2/Approval``; KIS's rules hold: one
session per app key (a second is answered ``OPSP8996 ALREADY IN USE appkey`` and closed, unless
``one_session=False``), at most :data:`~kis_safe_token.realtime.frames.SESSION_LIMIT`
registrations a session (``OPSP0008``), a ``PINGPONG`` every ``ping_interval_s``. :meth:`push`
sends frames to every session registered for a pair, each record numbered per pair
(:func:`sequence_of`); ``rate`` pushes that many frames a second (of ``records`` records) to
every registered pair, from the start or from :meth:`start_pushing` to :meth:`stop_pushing`.
The tr_ids in ``encrypted`` (``H0STCNI0``, execution notices, by default) are sent as KIS does:
AES-256-CBC with a key and iv given in the registration's reply.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
from collections import Counter
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from ..realtime.frames import SESSION_LIMIT, encode_records
from .simulator import KisSimulator

__all__ = ["PARSE_ERROR", "RealtimeSimulator", "sent_at", "sequence_of"]

#: Fields of a simulated record: KIS's first three (code, HHMMSS, price), then the simulator's
#: sequence number and send time (``time.time()``), so tests can tell order, gaps and latency.
_SEQ, _SENT = 3, 4
_COUNTED = (
    "sessions_opened",
    "sessions_refused",
    "sessions_peak",
    "registered_total",
    "frames_sent",
    "pongs",
)
#: The simulator's own answer to a message that is not JSON (KIS's code for it is not known).
PARSE_ERROR = "OPSP9999"


def sequence_of(fields: tuple[str, ...]) -> int:
    """The per-pair sequence number of a simulated record (1, 2, ...)."""
    return int(fields[_SEQ])


def sent_at(fields: tuple[str, ...]) -> float:
    """When the simulator sent a record (its ``time.time()``)."""
    return float(fields[_SENT])


class _Session:
    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.app_key: str | None = None
        self.pairs: set[tuple[str, str]] = set()
        self.aes: dict[str, tuple[bytes, bytes]] = {}  # an encrypted tr_id's key and iv
        self.closed = threading.Event()
        self.sending = threading.Lock()  # a registration's reply goes out before its first frame


class RealtimeSimulator:
    """KIS's realtime websocket for the app keys of one :class:`KisSimulator`."""

    def __init__(
        self,
        sim: KisSimulator,
        *,
        one_session: bool = True,
        rate: float = 0.0,
        records: int = 1,
        ping_interval_s: float = 10.0,
        encrypted: frozenset[str] = frozenset({"H0STCNI0"}),
    ) -> None:
        self.sim = sim
        self.encrypted = encrypted
        self.one_session = one_session
        self.rate = rate
        self.records = records
        self.ping_interval_s = ping_interval_s
        self.counts: Counter[str] = Counter()
        self._sessions: list[_Session] = []
        self._sequence: Counter[tuple[str, str]] = Counter()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: Server = serve(self._serve, "127.0.0.1", 0, compression=None)
        self._threads: list[threading.Thread] = []
        self._pushing: tuple[threading.Thread, threading.Event] | None = None

    @property
    def ws_url(self) -> str:
        host, port = self._server.socket.getsockname()[:2]
        return f"ws://{host}:{port}"

    def __enter__(self) -> RealtimeSimulator:
        for target in (self._server.serve_forever, self._pinger):
            thread = threading.Thread(target=target, name="kis-realtime-sim", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.rate:
            self.start_pushing()
        return self

    def start_pushing(self) -> None:
        """Push ``rate`` frames a second of ``records`` records to every registered pair."""
        self.stop_pushing()
        stop = threading.Event()
        thread = threading.Thread(target=self._pusher, args=(stop,), daemon=True)
        self._pushing = (thread, stop)
        thread.start()

    def stop_pushing(self) -> None:
        if self._pushing is not None:
            thread, stop = self._pushing
            stop.set()
            thread.join(5)
            self._pushing = None

    def __exit__(self, *exc_info: object) -> None:
        self.stop_pushing()
        self._stopping.set()
        self._server.shutdown()
        with self._cond:
            sessions = list(self._sessions)
        for session in sessions:  # a client still connected sees the server go away
            session.conn.close()
            session.closed.wait(5)
        for thread in self._threads:
            thread.join(5)

    # -- what tests look at and do -----------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """``sessions_opened``, ``sessions_refused`` (``OPSP8996``), ``sessions_peak``
        (concurrent), ``registrations`` (now, all sessions), ``registered_total``,
        ``frames_sent``, ``pongs``."""
        with self._cond:
            stats = {name: self.counts[name] for name in _COUNTED}
            stats["registrations"] = sum(len(s.pairs) for s in self._sessions)
            return stats

    def registered(self) -> set[tuple[str, str]]:
        """The pairs registered now, over all sessions."""
        with self._cond:
            return {pair for s in self._sessions for pair in s.pairs}

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self)`` is true (woken by every change); its last value."""
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self), timeout))

    def push(self, tr_id: str, tr_key: str, frames: int = 1, records: int = 1) -> int:
        """Send ``frames`` frames of ``records`` records of one pair to every session registered
        for it; the number of frames sent."""
        sent = 0
        for _ in range(frames):
            with self._cond:
                rows = []
                for _ in range(records):
                    self._sequence[tr_id, tr_key] += 1
                    seq = self._sequence[tr_id, tr_key]
                    clock = time.strftime("%H%M%S")
                    rows.append(
                        (tr_key, clock, str(70_000 + seq % 100), str(seq), repr(time.time()))
                    )
                to = [s for s in self._sessions if (tr_id, tr_key) in s.pairs]
            plain = encode_records(tr_id, rows)
            for session in to:
                aes = session.aes.get(tr_id)
                frame = plain if aes is None else encode_records(tr_id, rows, aes)
                try:
                    with session.sending:
                        session.conn.send(frame)
                    sent += 1
                except ConnectionClosed:
                    pass
        with self._cond:
            self.counts["frames_sent"] += sent
            self._cond.notify_all()
        return sent

    # -- the server ----------------------------------------------------------------------------
    def _serve(self, conn: ServerConnection) -> None:
        session = _Session(conn)
        with self._cond:
            self._sessions.append(session)
        try:
            for message in conn:
                if not self._answer(session, message if isinstance(message, str) else ""):
                    break
        except ConnectionClosed:
            pass
        finally:
            session.closed.set()
            with self._cond:
                self._sessions.remove(session)
                self._cond.notify_all()

    def _answer(self, session: _Session, text: str) -> bool:
        """Answer one client message; ``False`` ends the session."""
        try:
            message = json.loads(text)
            header, body = message["header"], message.get("body") or {}
        except (ValueError, KeyError, TypeError):
            session.conn.send(_reply("", "", PARSE_ERROR, "JSON PARSING ERROR", ok=False))
            return True
        if header.get("tr_id") == "PINGPONG":
            with self._cond:
                self.counts["pongs"] += 1
                self._cond.notify_all()
            return True
        pair = body.get("input") or {}
        tr_id, tr_key = str(pair.get("tr_id", "")), str(pair.get("tr_key", ""))
        app_key = self.sim.approval_owner.get(str(header.get("approval_key")))
        if app_key is None:
            session.conn.send(_reply(tr_id, tr_key, "OPSP0011", "invalid approval", ok=False))
            return True
        with session.sending:
            with self._cond:
                refused = self._open(session, app_key)
                if not refused:
                    answer = self._register(session, tr_id, tr_key, str(header.get("tr_type")))
                self._cond.notify_all()
            if refused:
                session.conn.send(
                    _reply(tr_id, tr_key, "OPSP8996", "ALREADY IN USE appkey", ok=False)
                )
                session.conn.close()
                return False
            session.conn.send(answer)
        return True

    def _open(self, session: _Session, app_key: str) -> bool:
        """Bind ``session`` to ``app_key`` on its first registration; whether KIS refuses it."""
        if session.app_key is not None:
            return False
        if self.one_session and any(s.app_key == app_key for s in self._sessions):
            self.counts["sessions_refused"] += 1
            return True
        session.app_key = app_key
        self.counts["sessions_opened"] += 1
        live = sum(s.app_key is not None for s in self._sessions)
        self.counts["sessions_peak"] = max(self.counts["sessions_peak"], live)
        return False

    def _register(self, session: _Session, tr_id: str, tr_key: str, tr_type: str) -> str:
        pair = (tr_id, tr_key)
        if tr_type == "2":
            session.pairs.discard(pair)
            return _reply(tr_id, tr_key, "OPSP0001", "UNSUBSCRIBE SUCCESS", ok=True)
        if pair in session.pairs:
            return _reply(tr_id, tr_key, "OPSP0002", "ALREADY IN SUBSCRIBE", ok=False)
        if len(session.pairs) >= SESSION_LIMIT:
            return _reply(tr_id, tr_key, "OPSP0008", "MAX SUBSCRIBE OVER", ok=False)
        session.pairs.add(pair)
        self.counts["registered_total"] += 1
        aes = None
        if tr_id in self.encrypted:  # KIS: a key and iv of the session, for this tr_id
            aes = session.aes.setdefault(
                tr_id, (secrets.token_hex(16).encode(), secrets.token_hex(8).encode())
            )
        return _reply(tr_id, tr_key, "OPSP0000", "SUBSCRIBE SUCCESS", ok=True, aes=aes)

    def _pinger(self) -> None:
        while not self._stopping.wait(self.ping_interval_s):
            ping = json.dumps(
                {"header": {"tr_id": "PINGPONG", "datetime": time.strftime("%Y%m%d%H%M%S")}}
            )
            with self._cond:
                sessions = list(self._sessions)
            for session in sessions:
                try:
                    session.conn.send(ping)
                except ConnectionClosed:
                    pass

    def _pusher(self, stop: threading.Event) -> None:
        started = time.monotonic()
        for tick in itertools.count(1):
            if stop.wait(max(0.0, started + tick / self.rate - time.monotonic())):
                return
            for tr_id, tr_key in sorted(self.registered()):
                self.push(tr_id, tr_key, records=self.records)


def _reply(
    tr_id: str,
    tr_key: str,
    code: str,
    message: str,
    *,
    ok: bool,
    aes: tuple[bytes, bytes] | None = None,
) -> str:
    body: dict[str, Any] = {"rt_cd": "0" if ok else "1", "msg_cd": code, "msg1": message}
    if aes is not None:
        body["output"] = {"key": aes[0].decode(), "iv": aes[1].decode()}
    header = {"tr_id": tr_id, "tr_key": tr_key, "encrypt": "N" if aes is None else "Y"}
    return json.dumps({"header": header, "body": body})
