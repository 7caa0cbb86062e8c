"""The leader: the fleet's one KIS realtime session, registered for the union of every
process's wants, and the fan-out of its events to the processes that want them.

A *holder* is one party that wants pairs: this process (:class:`~.client.KisRealtime` itself) or
a follower connected over the hub. A pair is registered with KIS while one holder wants it, and
deregistered when the last lets go; beyond :data:`~.frames.SESSION_LIMIT` pairs a new want is
answered ``OPSP0008`` without asking KIS. Frames go to each holder of one of their pairs; a
follower's outgoing lines wait in a bounded queue, dropped (and counted, then a ``G`` line) when
it falls behind, so a slow process never stalls the leader or grows its memory.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from ..errors import KisTokenError
from .frames import (
    SESSION_LIMIT,
    FrameError,
    RealtimeEvent,
    decode_frame,
    encode_records,
    is_pingpong,
    parse_reply,
    register_message,
)
from .local import LocalHub, same_user

__all__ = [
    "GAP_LINE",
    "LIMIT",
    "OK",
    "Holder",
    "Leader",
    "Pair",
    "answer_line",
    "follow",
    "frame_line",
    "heard",
]

logger = logging.getLogger("kis_safe_token.realtime")

Pair = tuple[str, str]
OK = "OPSP0000"
LIMIT = "OPSP0008"  # KIS's MAX SUBSCRIBE OVER, also the leader's answer past the 41st pair
_ALREADY = "OPSP0002"
_DEREGISTERED = "OPSP0001"
_IN_USE = "OPSP8996"
_BAD_APPROVAL = "OPSP0011"
#: Seconds between attempts to (re)open the KIS session: doubling up to the last.
_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Lines queued for one follower before new ones are dropped.
FOLLOWER_BUFFER = 50_000


class Holder(Protocol):
    """One party the leader serves."""

    def answer(self, pair: Pair, code: str, message: str) -> None: ...
    def frame(self, received_at: float, text: str, events: list[RealtimeEvent]) -> None: ...
    def gap(self) -> None: ...


@dataclass(eq=False)
class _Want:
    holders: set[Holder] = field(default_factory=set)
    waiting: set[Holder] = field(default_factory=set)  # to be answered when KIS answers
    registered: bool = False


class Leader:
    """The KIS session of a process that holds the lease: :meth:`run_session` (and, on one
    host, :meth:`serve` for the followers) until :meth:`stop`."""

    def __init__(self, ws_url: str, approval: Approval) -> None:
        self.ws_url = ws_url
        self.approval = approval
        self.counts = {"sessions_opened": 0, "sessions_refused": 0, "lines_dropped": 0}
        self._lock = threading.Condition()
        self._sending = threading.Lock()  # taken before _lock, never while holding it
        self._wants: dict[Pair, _Want] = {}
        self._ws: ClientConnection | None = None
        self._key = ""  # the approval key of the open session
        self._aes: dict[str, tuple[bytes, bytes]] = {}
        self._stopped = threading.Event()
        self._server: socket.socket | None = None
        self._followers: set[_Follower] = set()

    # -- what holders ask ----------------------------------------------------------------------
    def want(self, holder: Holder, pair: Pair, on: bool) -> None:
        """``holder`` wants ``pair`` (``on``) or no longer does. Decided and sent in one order
        (``_sending``): a deregistration and a registration of one pair never cross."""
        with self._sending:
            self._want(holder, pair, on)

    def _want(self, holder: Holder, pair: Pair, on: bool) -> None:
        register = answer = None
        with self._lock:
            want = self._wants.get(pair)
            if not on:
                if want is not None:
                    want.holders.discard(holder)
                    want.waiting.discard(holder)
                    if not want.holders:
                        del self._wants[pair]
                        register = False
            elif want is not None:
                want.holders.add(holder)
                if want.registered:
                    answer = OK, "SUBSCRIBE SUCCESS"
                else:
                    want.waiting.add(holder)
            elif len(self._wants) >= SESSION_LIMIT:
                answer = LIMIT, f"the session holds KIS's {SESSION_LIMIT} registrations"
            else:
                self._wants[pair] = _Want({holder}, {holder})
                register = True
                self._lock.notify_all()
            ws, key = self._ws, self._key
        if answer is not None:
            holder.answer(pair, *answer)
        if register is not None and ws is not None:
            with contextlib.suppress(ConnectionClosed):
                ws.send(register_message(key, *pair, register=register))

    def registered(self) -> list[Pair]:
        """The pairs registered on the open session."""
        with self._lock:
            return [pair for pair, want in self._wants.items() if want.registered]

    def encrypted(self, tr_id: str) -> bool:
        """Whether KIS sends ``tr_id`` encrypted on the open session (it gave a key for it)."""
        return tr_id in self._aes

    def drop(self, holder: Holder) -> None:
        """``holder`` is gone: every want of its ends."""
        with self._lock:
            pairs = [pair for pair, want in self._wants.items() if holder in want.holders]
        for pair in pairs:
            self.want(holder, pair, False)

    # -- running ---------------------------------------------------------------------------
    def serve(self, hub: LocalHub) -> None:
        """Serve the host's followers on ``hub`` and keep the KIS session open while anyone
        wants a pair."""
        self._server = hub.listen()
        session = threading.Thread(target=self.run_session, name="kis-realtime-session")
        session.daemon = True
        session.start()
        try:
            while not self._stopped.is_set():
                try:
                    conn, _ = self._server.accept()
                except OSError:
                    break  # stop() shut the socket down
                if not same_user(conn):
                    conn.close()
                    continue
                follower = _Follower(self, conn)
                with self._lock:
                    self._followers.add(follower)
                follower.start()
        finally:
            self.stop()
            session.join(5)
            hub.unlink()
            self._server.close()
            with self._lock:
                followers = list(self._followers)
            for follower in followers:
                follower.close()

    def stop(self) -> None:
        with self._lock:  # with _open_and_read's check: a session opening now is closed at once
            self._stopped.set()
            self._lock.notify_all()
            ws = self._ws
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
        if ws is not None:
            ws.close()

    def forget(self, follower: _Follower) -> None:
        with self._lock:
            self._followers.discard(follower)
        self.drop(follower)

    # -- the KIS session ---------------------------------------------------------------------
    def run_session(self) -> None:
        """Keep KIS's session open while a pair is wanted, reopening it when it closes."""
        attempt = 0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._wants or self._stopped.is_set())
            if self._stopped.is_set():
                return
            try:
                refused = self._open_and_read()
            except Exception:  # a bug must not leave the fleet with a leader and no session
                logger.exception("KIS realtime session failed; opening it again")
                refused = True
            if self._stopped.is_set():
                return
            attempt = attempt + 1 if refused else 0
            if self._stopped.wait(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]):
                return

    def _open_and_read(self) -> bool:
        """One KIS session, until it closes; whether it failed to open or KIS refused it."""
        try:
            key = self.approval.key()
            ws = connect(self.ws_url, open_timeout=10, close_timeout=2, compression=None)
        except (KisTokenError, OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            logger.warning("KIS realtime session: cannot open (%s)", type(exc).__name__)
            return True
        with self._lock:
            stopped = self._stopped.is_set()  # while connecting: it never registers anything
            if not stopped:
                self._ws, self._key, self._aes = ws, key, {}
                for want in self._wants.values():
                    want.registered = False
            pairs = list(self._wants)
        if stopped:
            with ws:  # closed on the way out (websockets wants connect() used this way)
                return False
        self.counts["sessions_opened"] += 1
        try:
            with ws:
                for pair in pairs:
                    ws.send(register_message(key, *pair))
                return self._read(ws)
        except ConnectionClosed:
            return False
        finally:
            with self._lock:
                self._ws = None
            if not self._stopped.is_set():
                self._gap_all()

    def _read(self, ws: ClientConnection) -> bool:
        for text in ws:
            if not isinstance(text, str):
                continue
            received_at = time.time()
            if text[:1] in ("0", "1"):
                try:
                    self._fan_out(received_at, text, decode_frame(text, received_at, self._aes))
                except FrameError as exc:
                    logger.warning("KIS realtime session: %s", exc)
            elif is_pingpong(text):
                ws.send(text)
            elif self._on_reply(text, ws):
                return True
        return False

    def _on_reply(self, text: str, ws: ClientConnection) -> bool:
        """Act on a control message; whether it ends the session as refused."""
        try:
            reply = parse_reply(text)
        except FrameError as exc:
            logger.warning("KIS realtime session: %s", exc)
            return False
        if reply.code == _IN_USE:
            self.counts["sessions_refused"] += 1
            logger.warning("KIS realtime session refused: OPSP8996 (the app key is in use)")
            return True
        if reply.code == _BAD_APPROVAL:
            self.approval.reject(self._key)
            return True
        pair = (reply.tr_id, reply.tr_key)
        with self._lock:
            want = self._wants.get(pair)
            if want is None or reply.code == _DEREGISTERED:
                return False
            waiting, want.waiting = want.waiting, set()
            if reply.ok or reply.code == _ALREADY:
                want.registered = True
                if reply.aes is not None:
                    self._aes[reply.tr_id] = reply.aes
                code = OK
            else:  # refused (after a reconnect too): every holder is told
                del self._wants[pair]
                waiting |= want.holders
                code = reply.code
        for holder in waiting:
            holder.answer(pair, code, reply.message)
        return False

    def _fan_out(self, received_at: float, text: str, events: list[RealtimeEvent]) -> None:
        pairs = {(event.tr_id, event.tr_key) for event in events}
        with self._lock:
            wants = [self._wants[pair] for pair in pairs if pair in self._wants]
            holders = {holder for want in wants for holder in want.holders}
        if text[0] == "1":  # followers get it plain: the leader holds the key
            text = encode_records(events[0].tr_id, [event.fields for event in events])
        for holder in _by_route(holders):
            holder.frame(received_at, text, events)

    def _gap_all(self) -> None:
        with self._lock:
            holders = {h for want in self._wants.values() for h in want.holders}
        for holder in _by_route(holders):
            holder.gap()


class Approval:
    """The fleet's approval key: ``key()`` (shared like the token), ``reject(key)``."""

    def __init__(self, key: Callable[[], str], reject: Callable[[str], object]) -> None:
        self.key = key
        self.reject = reject


class _Follower:
    """The leader's side of one follower: its wants in, its frames out through a bounded queue."""

    def __init__(self, leader: Leader, conn: socket.socket) -> None:
        self.leader = leader
        self.conn = conn
        self._out: queue.Queue[str | None] = queue.Queue(FOLLOWER_BUFFER)
        self._dropped = 0

    def start(self) -> None:
        for target in (self._read, self._write):
            threading.Thread(target=target, name="kis-realtime-follower", daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def answer(self, pair: Pair, code: str, message: str) -> None:
        self._put(answer_line(pair, code, message) + "\n")

    def frame(self, received_at: float, text: str, events: list[RealtimeEvent]) -> None:
        self._put(frame_line(received_at, text) + "\n")

    def gap(self) -> None:
        self._put(GAP_LINE + "\n")

    def _put(self, line: str) -> None:
        try:
            self._out.put_nowait(line)
        except queue.Full:
            self._dropped += 1
            self.leader.counts["lines_dropped"] += 1

    def _read(self) -> None:
        try:
            with self.conn.makefile("r", encoding="utf-8", newline="\n") as lines:
                for line in lines:
                    kind, _, rest = line.rstrip("\n").partition("\t")
                    tr_id, _, tr_key = rest.partition("\t")
                    if kind in ("S", "U") and tr_id and tr_key:
                        self.leader.want(self, (tr_id, tr_key), kind == "S")
        except (OSError, ValueError):
            pass
        finally:
            self.leader.forget(self)
            while True:  # the writer ends, past what is queued (or the oldest, if full)
                try:
                    self._out.put_nowait(None)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._out.get_nowait()

    def _write(self) -> None:
        try:
            while (line := self._out.get()) is not None:
                lines = [line]
                while len(lines) < 512:  # what queued meanwhile goes in the same write
                    try:
                        more = self._out.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._out.put(None)
                        break
                    lines.append(more)
                if self._dropped:
                    self._dropped = 0
                    lines.append(GAP_LINE + "\n")
                self.conn.sendall("".join(lines).encode())
        except OSError:
            pass
        finally:
            self.conn.close()


def _by_route(holders: set[Holder]) -> list[Holder]:
    """One holder per way out: the processes behind one Redis channel hear a line once."""
    return list({getattr(holder, "route", holder): holder for holder in holders}.values())


#: The leader's lines to the processes it serves (over the host's socket or the Redis channel),
#: read back by :func:`heard`.
GAP_LINE = "G"


def answer_line(pair: Pair, code: str, message: str) -> str:
    message = message.replace("\n", " ").replace("\t", " ")
    return f"A\t{pair[0]}\t{pair[1]}\t{code}\t{message}"


def frame_line(received_at: float, text: str) -> str:
    return f"D\t{received_at!r}\t{text}"


class Link:
    """A follower's connection to the leader: :meth:`want` sends, :func:`follow` reads."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._sending = threading.Lock()

    def want(self, pair: Pair, on: bool) -> None:
        line = f"{'S' if on else 'U'}\t{pair[0]}\t{pair[1]}\n".encode()
        with self._sending, contextlib.suppress(OSError):
            self.conn.sendall(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)


def follow(link: Link, local: Holder) -> None:
    """Pass what the leader sends to ``local`` until the leader goes away."""
    try:
        with link.conn.makefile("r", encoding="utf-8", newline="\n") as lines:
            for line in lines:
                heard(local, line.rstrip("\n"))
    except OSError:
        pass
    finally:
        link.conn.close()


def heard(local: Holder, line: str) -> str:
    """Pass one line from the leader (``A``, ``D`` or ``G``, see :mod:`.local`) to ``local``;
    its kind (a line that does not parse is logged and left: a leader of another version)."""
    kind, _, rest = line.partition("\t")
    try:
        if kind == "D":
            stamp, _, text = rest.partition("\t")
            received_at = float(stamp)
            local.frame(received_at, text, decode_frame(text, received_at))
        elif kind == "A":
            tr_id, tr_key, code, message = (rest.split("\t", 3) + ["", "", ""])[:4]
            local.answer((tr_id, tr_key), code, message)
        elif kind == GAP_LINE:
            local.gap()
    except ValueError as exc:  # FrameError too
        logger.warning("KisRealtime: a line from the leader that does not parse (%s)", exc)
    return kind
