"""A small offline KIS over real HTTP on 127.0.0.1, for tests, demos and users' own code.

It answers ``POST /oauth2/tokenP`` (one issue per app key per window, else ``EGW00133``),
``/oauth2/revokeP``, ``/oauth2/Approval`` and the domestic price quote (HTTP 500 ``EGW00121`` /
``EGW00123`` for an invalid / expired token), optionally meters calls (``EGW00201``) and serves
what it counted at ``GET /_simulator/stats`` (docs/simulator.md).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from ..kis import (
    APPROVAL_PATH,
    BAD_APP_KEY,
    BAD_APP_SECRET,
    PRICE_PATH,
    PRICE_TR_ID,
    RATE_LIMIT_MESSAGE,
    RATE_LIMITED,
    REVOKE_PATH,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    TOKEN_PATH,
    TOO_MANY_CALLS,
    TOO_MANY_CALLS_MESSAGE,
    UNKNOWN_SERVICE,
)
from ..token import format_kst

__all__ = [
    "KIS_LIMITS",
    "REAL_CALLS_PER_SECOND",
    "STATS_PATH",
    "VIRTUAL_CALLS_PER_SECOND",
    "KisSimulator",
    "mask_app_key",
]

#: ``GET`` this path of a simulator for what it counted (JSON, see :meth:`KisSimulator.stats`).
STATS_PATH = "/_simulator/stats"
#: What :meth:`KisSimulator.stats` reports, in all and per app key: its name -> the counter's.
_STATS = {
    "issued": "issued",
    RATE_LIMITED: RATE_LIMITED,
    "calls": "uapi_calls",
    TOO_MANY_CALLS: TOO_MANY_CALLS,
}

#: KIS's limits per app key, for ``KisSimulator(calls_per_second=...)``.
REAL_CALLS_PER_SECOND = 20
VIRTUAL_CALLS_PER_SECOND = 2

KIS_LIMITS: Literal["kis"] = "kis"
"""``KisSimulator(calls_per_second="kis")``: each app key's KIS limit for its account type,
:data:`REAL_CALLS_PER_SECOND`, or :data:`VIRTUAL_CALLS_PER_SECOND` for the virtual ones."""

CallsPerSecond = int | bool | Literal["kis"] | None
_Answer = tuple[int, dict[str, Any]]


@dataclass
class _Issued:
    app_key: str
    expires_at: float
    revoked: bool = False


def _refusal(code: str, message: str) -> dict[str, str]:
    """A KIS API error body (``rt_cd`` 1)."""
    return {"rt_cd": "1", "msg_cd": code, "msg1": message}


def _oauth_error(code: str, message: str) -> dict[str, str]:
    """A KIS ``/oauth2/`` error body."""
    return {"error_description": message, "error_code": code}


class KisSimulator:
    """Offline KIS: ``with KisSimulator() as sim: KoreaInvestment(..., base_url=sim.base_url)``.

    ``apps``: app key -> secret to accept (``None`` accepts any pair). ``issue_window_s``: the
    one-issue-per-app-key window (KIS: 60 s). ``token_lifetime_s``: validity of issued tokens.
    ``issue_latency_s``: artificial delay of ``tokenP`` (widens races the way a slow KIS does).
    ``refusals_per_window``: end an app key's window after that many ``EGW00133`` answers
    instead of after ``issue_window_s`` (a sit-out test then races no wall clock).
    ``clock``: the simulator's time, for expiries and for the HTTP ``Date`` of every answer.
    ``calls_per_second``: calls allowed per app key in any one second of ``clock`` on every
    ``/uapi/`` path and ``/oauth2/Approval`` (beyond it HTTP 500 ``EGW00201``): ``None``/``False``
    (the default) meters nothing; ``"kis"`` (:data:`KIS_LIMITS`) or ``True`` KIS's own limits,
    :data:`REAL_CALLS_PER_SECOND` or :data:`VIRTUAL_CALLS_PER_SECOND` (모의투자); a number that
    limit for every app key. ``mock=True`` makes every app key a virtual account's;
    ``virtual_apps`` names the virtual ones otherwise.

    Counters (:attr:`counts`): ``issue_requests``, ``uapi_calls`` (answered within the limit),
    ``EGW00201``, ``approval_requests``, ``approvals_issued``, ...; :attr:`peak_calls_per_second`:
    the most calls of each app key in any one second (Approval included).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        apps: dict[str, str] | None = None,
        issue_window_s: float = 60.0,
        token_lifetime_s: float = 86_400.0,
        issue_latency_s: float = 0.05,
        refusals_per_window: int | None = None,
        clock: Callable[[], float] = time.time,
        calls_per_second: CallsPerSecond = None,
        mock: bool = False,
        virtual_apps: Iterable[str] = (),
    ) -> None:
        if refusals_per_window is not None and refusals_per_window < 1:
            raise ValueError("refusals_per_window must be None or at least 1")
        if isinstance(virtual_apps, str):
            raise TypeError("virtual_apps must be a collection of app keys, not one string")
        self.apps = dict(apps) if apps is not None else None
        self.calls_per_second = _checked_rate(calls_per_second)
        self.mock = mock
        self.virtual_apps = frozenset(virtual_apps)
        self.issue_window_s = issue_window_s
        self.refusals_per_window = refusals_per_window
        self.token_lifetime_s = token_lifetime_s
        self.issue_latency_s = issue_latency_s
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.peak_calls_per_second: Counter[str] = Counter()
        self.approval_owner: dict[str, str] = {}  # approval key -> app key, in issue order
        self._window: dict[str, deque[float]] = {}
        self._refuse_next = 0
        self._refusals: Counter[str] = Counter()
        self._per_app_key: dict[str, Counter[str]] = {}
        self._tokens: dict[str, _Issued] = {}
        self._last_issue: dict[str, float] = {}
        self._cond = threading.Condition()  # an RLock: _count may be called with it held
        self.issue_gate = threading.Event()
        """Cleared, ``tokenP`` requests wait (up to 60 s) until it is set: a KIS that hangs."""
        self.issue_gate.set()
        self.outage = threading.Event()
        """Set, ``tokenP`` answers HTTP 502 with an HTML page, as a KIS gateway does when down."""
        self._server = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def approval_keys(self) -> list[str]:
        """The approval keys issued, oldest first."""
        with self._cond:
            return list(self.approval_owner)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> KisSimulator:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                name="kis-simulator",
                daemon=True,
                kwargs={"poll_interval": 0.05},
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self.issue_gate.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> KisSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests look at and do -----------------------------------------------------------
    @property
    def issued(self) -> int:
        """Tokens issued so far (successful ``tokenP`` answers)."""
        return self.counts["issued"]

    @property
    def rate_limited(self) -> int:
        """``EGW00133`` answers so far."""
        return self.counts[RATE_LIMITED]

    @property
    def too_many_calls(self) -> int:
        """``EGW00201`` answers so far."""
        return self.counts[TOO_MANY_CALLS]

    def stats(self) -> dict[str, Any]:
        """What it counted (also served at :data:`STATS_PATH`): ``issued`` (tokens),
        ``EGW00133`` (refused issues), ``calls`` (``/uapi/`` calls answered within the limit),
        ``EGW00201`` (calls refused over it); ``app_keys``: the same four per app key, keyed by
        :func:`mask_app_key`; ``counts``: every counter of :attr:`counts`."""
        with self._cond:
            per_key = {
                mask_app_key(key): {stat: counter[name] for stat, name in _STATS.items()}
                for key, counter in sorted(self._per_app_key.items())
            }
            totals = {stat: self.counts[name] for stat, name in _STATS.items()}
            return {**totals, "app_keys": per_key, "counts": dict(self.counts)}

    def summary(self) -> str:
        """:meth:`stats` as a few lines of text: the totals, then one line per app key."""
        stats = self.stats()

        def line(c: dict[str, int]) -> str:
            return (
                f"{c['issued']} token(s) issued, {c[RATE_LIMITED]} {RATE_LIMITED} refusal(s), "
                f"{c['calls']} call(s), {c[TOO_MANY_CALLS]} {TOO_MANY_CALLS}"
            )

        lines = [f"KIS simulator counted: {line(stats)}"]
        lines += [f"  app key {key}: {line(c)}" for key, c in stats["app_keys"].items()]
        return "\n".join(lines)

    def limit_for(self, app_key: str) -> int | None:
        """The calls per second ``app_key`` is allowed (``None``: not metered)."""
        rate = self.calls_per_second
        if rate != KIS_LIMITS:
            return rate if isinstance(rate, int) else None
        if self.mock or app_key in self.virtual_apps:
            return VIRTUAL_CALLS_PER_SECOND
        return REAL_CALLS_PER_SECOND

    def outside_calls(self, app_key: str, calls: int) -> None:
        """Count ``calls`` ``/uapi/`` calls of ``app_key`` in the current second, as a program
        outside the fleet using the same app key would (needs ``calls_per_second``)."""
        now = self.clock()
        with self._cond:
            self._last_second(app_key, now).extend([now] * calls)

    def refuse_calls(self, calls: int) -> None:
        """Answer the next ``calls`` ``/uapi/`` calls with ``EGW00201`` whatever the rate: an
        outside program that keeps the app key's quota used up, deterministically."""
        with self._cond:
            self._refuse_next = calls

    def issued_tokens(self) -> list[str]:
        with self._cond:
            return list(self._tokens)

    def wait_for(self, predicate: Callable[[KisSimulator], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every request) or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def expire_tokens(self, *, reset_window: bool = True) -> None:
        """Make every issued token expired server-side (KIS then answers ``EGW00123``).
        ``reset_window`` also forgets the last issue times, so the next issue is not refused
        with ``EGW00133`` (a test round need not wait a minute)."""
        now = self.clock()
        with self._cond:
            for issued in self._tokens.values():
                issued.expires_at = min(issued.expires_at, now - 1)
            if reset_window:
                self._last_issue.clear()
            self._cond.notify_all()

    def _count(self, name: str, app_key: str | None = None) -> None:
        """One more ``name``, in all and for ``app_key``; wakes :meth:`wait_for`."""
        with self._cond:
            self.counts[name] += 1
            if app_key is not None:
                self._per_app_key.setdefault(app_key, Counter())[name] += 1
            self._cond.notify_all()

    def _metered(self, app_key: str, *, uapi: bool = True) -> _Answer | None:
        """``EGW00201`` if this call of ``app_key`` (a ``/uapi/`` one, else ``Approval``) is over
        the app key's limit, else ``None``."""
        now = self.clock()
        limit = self.limit_for(app_key)
        with self._cond:
            refused = self._refuse_next > 0 and uapi
            if refused:
                self._refuse_next -= 1
            elif limit is not None:
                window = self._last_second(app_key, now)
                refused = len(window) >= limit
                if not refused:  # a refused call is not counted against the next ones
                    window.append(now)
            if refused:
                self._count(TOO_MANY_CALLS, app_key)
                return 500, _refusal(TOO_MANY_CALLS, TOO_MANY_CALLS_MESSAGE)
            if limit is not None:
                peak = self.peak_calls_per_second
                peak[app_key] = max(peak[app_key], len(self._window[app_key]))
            if uapi:
                self._count("uapi_calls", app_key)
        return None

    def _last_second(self, app_key: str, now: float) -> deque[float]:
        """The metered calls of ``app_key`` in the second up to ``now`` (call with the lock
        held). KIS counts any one-second window, not calendar seconds."""
        window = self._window.setdefault(app_key, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        return window

    # -- endpoints ---------------------------------------------------------------------------
    def _issue(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | bytes]:
        self._count("issue_requests")
        if self.outage.is_set():
            self._count("outage_answers")
            return 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        if not self.issue_gate.wait(60):
            return 504, _oauth_error("EGW00000", "gateway timeout")
        key, secret = str(body.get("appkey") or ""), str(body.get("appsecret") or "")
        if body.get("grant_type") != "client_credentials" or not key or not secret:
            return 403, _oauth_error("EGW00002", "잘못된 요청입니다.")
        refused = self._check_app(key, secret)
        if refused:
            return 403, refused
        time.sleep(self.issue_latency_s)
        now = self.clock()
        with self._cond:
            if self._in_window(key, now):
                self._refusals[key] += 1
                self._count(RATE_LIMITED, key)
                return 403, _oauth_error(RATE_LIMITED, RATE_LIMIT_MESSAGE)
            self._last_issue[key] = now
            self._refusals[key] = 0
            token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + secrets.token_urlsafe(96)
            expires_at = now + self.token_lifetime_s
            self._tokens[token] = _Issued(key, expires_at)
            self._count("issued", key)
        return 200, {
            "access_token": token,
            "access_token_token_expired": format_kst(expires_at),
            "token_type": "Bearer",
            "expires_in": int(self.token_lifetime_s),
        }

    def _in_window(self, key: str, now: float) -> bool:
        """Whether ``key`` had a token issued within its window (call with the lock held)."""
        last = self._last_issue.get(key)
        if last is None:
            return False
        if self.refusals_per_window is not None:
            return self._refusals[key] < self.refusals_per_window
        return now - last < self.issue_window_s

    def _check_app(self, key: str, secret: str) -> dict[str, Any] | None:
        if self.apps is None:
            return None
        if key not in self.apps:
            return _oauth_error(BAD_APP_KEY, "유효하지 않은 AppKey입니다.")
        if not secrets.compare_digest(self.apps[key].encode(), secret.encode()):
            return _oauth_error(BAD_APP_SECRET, "유효하지 않은 AppSecret입니다.")
        return None

    def _revoke(self, body: dict[str, Any]) -> _Answer:
        self._count("revoke_requests")
        with self._cond:
            issued = self._tokens.get(str(body.get("token")))
            if issued is None or issued.app_key != body.get("appkey"):
                return 403, _oauth_error(TOKEN_INVALID, "유효하지 않은 token 입니다.")
            issued.revoked = True
        return 200, {"code": 200, "message": "접근토큰 폐기에 성공하였습니다"}

    def _approval(self, body: dict[str, Any]) -> _Answer:
        self._count("approval_requests")
        too_many = self._metered(str(body.get("appkey") or ""), uapi=False)
        if too_many is not None:
            return too_many
        refused = self._check_app(str(body.get("appkey")), str(body.get("secretkey")))
        if refused:
            return 403, refused
        if body.get("grant_type") != "client_credentials" or not body.get("secretkey"):
            return 403, _oauth_error("EGW00002", "잘못된 요청입니다.")
        time.sleep(self.issue_latency_s)
        key = str(uuid.uuid4())
        with self._cond:
            self.approval_owner[key] = str(body.get("appkey"))
            self._count("approvals_issued")
        return 200, {"approval_key": key}

    def _price(self, headers: Any, query: dict[str, list[str]]) -> _Answer:
        self._count("price_requests")
        auth = headers.get("authorization") or ""
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        now = self.clock()
        with self._cond:
            issued = self._tokens.get(token)
            if issued is None or issued.app_key != headers.get("appkey") or issued.revoked:
                self._count(TOKEN_INVALID)
                return 500, _refusal(TOKEN_INVALID, "유효하지 않은 token 입니다.")
            if now >= issued.expires_at:
                self._count(TOKEN_EXPIRED)
                return 500, _refusal(TOKEN_EXPIRED, "기간이 만료된 token 입니다.")
        if headers.get("tr_id") != PRICE_TR_ID:
            return 500, _refusal(UNKNOWN_SERVICE, "없는 서비스 코드 입니다.")
        # KIS reads query keys whatever their case (mojito2 sends them in lower case).
        query = {key.upper(): values for key, values in query.items()}
        symbol = (query.get("FID_INPUT_ISCD") or [""])[0]
        if len(symbol) != 6 or not symbol.isalnum():
            return 200, _refusal("MCA00124", "종목코드가 올바르지 않습니다.")
        price = 1_000 + int(hashlib.sha256(symbol.encode()).hexdigest()[:6], 16) % 99_000
        ok = {"rt_cd": "0", "msg_cd": "MCA00000", "msg1": "정상처리 되었습니다."}
        return 200, {"output": _quote(symbol, price), **ok}


def mask_app_key(app_key: str) -> str:
    """``app_key`` as :meth:`KisSimulator.stats` shows it: its first 4 characters (none of a
    short one) and 8 hex digits of its SHA-256, which tell two app keys apart."""
    digest = hashlib.sha256(app_key.encode()).hexdigest()[:8]
    return f"{app_key[:4] if len(app_key) > 8 else ''}…{digest}"


def _checked_rate(calls_per_second: object) -> int | Literal["kis"] | None:
    """``calls_per_second`` as the simulator keeps it; ``ValueError`` naming the allowed
    values otherwise."""
    if calls_per_second is None or calls_per_second is False:
        return None
    if calls_per_second is True or calls_per_second == KIS_LIMITS:
        return KIS_LIMITS
    if isinstance(calls_per_second, int) and calls_per_second > 0:
        return calls_per_second
    raise ValueError(
        "calls_per_second must be None/False (not metered), 'kis'/True (KIS's limits: "
        f"{REAL_CALLS_PER_SECOND} real, {VIRTUAL_CALLS_PER_SECOND} virtual) or a positive "
        f"int, not {str(calls_per_second)[:20]!r}"
    )


#: The fields of a flat day's quote that read as the price, and those that read as zero.
_AT_PRICE = "stck_prpr stck_oprc stck_hgpr stck_lwpr stck_sdpr w52_hgpr w52_lwpr".split()
_ZERO = "prdy_vrss acml_vol acml_tr_pbmn hts_avls".split()


def _quote(symbol: str, price: int) -> dict[str, str]:
    """A flat day's quote with every field the KIS clients people run parse (python-kis reads
    the day's range, limits and warnings strictly; kis-trader the open/high/low/base)."""
    return {
        "stck_shrn_iscd": symbol,
        **dict.fromkeys(_AT_PRICE, str(price)),
        **dict.fromkeys(_ZERO, "0"),
        "prdy_vrss_sign": "3",
        "prdy_ctrt": "0.00",
        "prdy_vrss_vol_rate": "0.00",
        "stck_mxpr": str(price * 13 // 10),
        "stck_llam": str(price * 7 // 10),
        "aspr_unit": "1",
        "temp_stop_yn": "N",
        "short_over_yn": "N",
        "mrkt_warn_cls_code": "00",
    }


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connection attempts when a herd of 64 processes calls at
    # once; their SYN retries then look like a KIS outage (ConnectTimeout).
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (a killed process, a timed-out call) is normal in the tests
        # that kill clients; anything else is printed as socketserver does.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def _handler_for(sim: KisSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Keep-alive answers go out at once, not after the client's delayed ACK (~40 ms a call).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by design
            pass

        def date_time_string(self, timestamp: float | None = None) -> str:
            # send_response() dates every answer with this: KIS's clock, so a test can play a
            # host (or a KIS) whose clock is off.
            return super().date_time_string(sim.clock() if timestamp is None else timestamp)

        def _reply(self, status: int, payload: dict[str, Any] | bytes) -> None:
            if isinstance(payload, bytes):
                data, kind = payload, "text/html"
            else:
                data = json.dumps(payload, ensure_ascii=False).encode()
                kind = "application/json; charset=utf-8"
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) if length else b"{}")
            except ValueError:
                return {}
            return body if isinstance(body, dict) else {}

        def _answer(self, post: bool) -> tuple[int, dict[str, Any] | bytes]:
            parts = urlsplit(self.path)
            if not post and parts.path == STATS_PATH:
                return 200, sim.stats()
            body = self._body() if post else {}
            if parts.path.startswith("/uapi/"):
                refused = sim._metered(str(self.headers.get("appkey") or ""))
                if refused is not None:
                    return refused
            # Looked up on each request: a test may patch sim._issue or sim._price.
            routes = {
                TOKEN_PATH: sim._issue,
                REVOKE_PATH: sim._revoke,
                APPROVAL_PATH: sim._approval,
            }
            if post and parts.path in routes:
                return routes[parts.path](body)
            if not post and parts.path == PRICE_PATH:
                return sim._price(self.headers, parse_qs(parts.query))
            return 404, _refusal("EGW00404", "not found")

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self._reply(*self._answer(post=True))

        def do_GET(self) -> None:  # noqa: N802
            self._reply(*self._answer(post=False))

    return Handler
