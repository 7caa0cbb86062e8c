"""``PyKis``: python-kis's client, its access token shared by the fleet through our storage.

``pykis.PyKis``'s arguments plus ``token_storage=``, ``calls_per_second=`` and ``rate_limiter=``;
what changes and the upstream lines it depends on: ``docs/integrations.md``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

from ..errors import TokenIssueError
from ..kis import Verdict, verdict_of
from ..oauth import token_from, token_from_answer, token_request_failed
from ..policy import Action, CallPolicy
from ..ratelimit import RateLimiter
from ..shared import SharedToken
from ..storage.base import TokenStorage
from ..storage.factory import create_token_storage
from ..token import Token
from . import require
from ._client_token import CallMeter

UPSTREAM_VERSION = "2.1.6"
"""The python-kis release this module was written against (the ``[python-kis]`` extra pins it)."""

require("pykis", "python-kis", version=UPSTREAM_VERSION)
import pykis.kis  # noqa: E402
from pykis import PyKis as _UpstreamPyKis  # noqa: E402
from pykis.api.auth.token import KisAccessToken, token_issue, token_revoke  # noqa: E402
from pykis.client.exceptions import KisHTTPError  # noqa: E402
from pykis.responses.dynamic import KisObject  # noqa: E402

__all__ = ["UPSTREAM_VERSION", "PyKis"]


Domain = Literal["real", "virtual"]
DOMAINS: tuple[Domain, ...] = ("real", "virtual")

METERED_PREFIX = "/uapi/"
"""The paths KIS meters per app key and second (the ``/oauth2/`` token calls are not)."""

_token_call = threading.local()
"""``timeout`` set while this thread makes a token call through pykis's request loop."""


class _Session(requests.Session):
    """pykis's session of one domain: every ``/uapi/`` send in a slot of ``meter``, and our
    timeout on the token calls (pykis sets none, ``kis.py:561``: a hung issuance would hold the
    fleet's issuance lock)."""

    meter: CallMeter | None = None

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        timeout = getattr(_token_call, "timeout", None)
        if timeout is not None and kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        meter = self.meter
        if meter is None or not urlsplit(str(url)).path.startswith(METERED_PREFIX):
            return super().request(method, url, *args, **kwargs)
        with meter.call() as policy:
            meter.before_send()
            resp = super().request(method, url, *args, **kwargs)
            if verdict_of(resp) is not Verdict.TOO_MANY_CALLS:
                return resp
            # pykis re-sends EGW00201 after 0.1 s, for ever (kis.py:580-584): back off and let
            # it, within the policy's budget; then raise, as pykis does for any other code.
            step = policy.after(Verdict.TOO_MANY_CALLS)
            limiter = meter.shared.rate_limiter
            if step.penalize_s is not None and limiter is not None:
                limiter.penalize(timeout_s=step.penalize_s)
            if step.action is not Action.RESEND:
                raise KisHTTPError(response=resp)
            time.sleep(min(step.pause_s, policy.left_s()))
            return resp


class _DomainToken(SharedToken):
    """The shared token of one pykis domain's app key, issued through pykis's ``token_issue``."""

    def __init__(
        self,
        kis: PyKis,
        domain: Domain,
        storage: TokenStorage,
        calls_per_second: float | None,
        rate_limiter: RateLimiter | None,
    ) -> None:
        key = kis.appkey if domain == "real" else kis.virtual_appkey
        self._kis = kis
        self._domain: Domain = domain
        session = kis._sessions[domain]
        super().__init__(
            key.appkey,
            key.secretkey,
            storage,
            base_url=pykis.kis.REAL_DOMAIN if domain == "real" else pykis.kis.VIRTUAL_DOMAIN,
            session=session,
            mock=domain == "virtual",
            calls_per_second=calls_per_second,
            rate_limiter=rate_limiter,
        )
        session.meter = CallMeter(self)

    def wrap(self, token: Token) -> Any:
        """``token`` as pykis's ``KisAccessToken``."""
        return KisObject.transform_(
            {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "access_token_token_expired": token.expired_kst,
                "expires_in": max(0, int(token.expires_at - self._clock())),
            },
            KisAccessToken,
        )

    def _issue(self) -> Token:
        """``tokenP`` through pykis's request path, its answer read as every token answer is."""
        clock, wait_s = self._clock, self.rate_limit_wait_s
        _token_call.timeout = self.timeout
        try:
            answer = token_issue(self._kis, domain=self._domain)
        except KisHTTPError as exc:  # KIS refused: read as any refusal (and raised)
            return token_from_answer(exc.response, clock=clock, rate_limit_wait_s=wait_s)
        except requests.RequestException as exc:
            raise token_request_failed(exc) from None
        except Exception as exc:  # noqa: BLE001 - pykis's parser on a garbled answer
            raise TokenIssueError(f"KIS token response unusable: {type(exc).__name__}") from None
        finally:
            _token_call.timeout = None
        resp = (answer.__data__ or {}).get("__response__")  # kis.py:640
        if isinstance(resp, requests.Response):
            return token_from_answer(resp, clock=clock, rate_limit_wait_s=wait_s)
        return token_from(200, answer.raw(), None, clock=clock, rate_limit_wait_s=wait_s)


def _refuse(kis: PyKis, token: Any) -> None:
    raise ValueError("the token comes from token_storage and cannot be set")


def _held(domain: Domain) -> property:
    """pykis's ``_token`` (or ``_virtual_token``): the token in memory; pykis assigns ``None``
    at construction, and again after ``EGW00123``."""
    return property(
        lambda kis: kis._kst_current(domain), lambda kis, value: kis._kst_dropped(domain, value)
    )


class PyKis(_UpstreamPyKis):  # type: ignore[misc] # pykis ships no type information
    """``pykis.PyKis`` whose tokens come from ``token_storage`` (``None``: ours from the
    environment). ``ValueError`` for ``keep_token``, ``token`` or ``virtual_token``."""

    def __init__(
        self,
        auth: Any = None,
        virtual_auth: Any = None,
        /,
        *,
        token_storage: TokenStorage | None = None,
        keep_token: Any = None,
        token: Any = None,
        virtual_token: Any = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
        **kwargs: Any,
    ) -> None:
        self._sessions: dict[Domain, _Session] = {}  # pykis's __del__ closes them
        if keep_token:
            raise ValueError(
                "keep_token is not supported: pykis would write the token in plain JSON under "
                "~/.pykis; the token_storage keeps it (encrypted) and shares it with the fleet"
            )
        if token is not None or virtual_token is not None:
            raise ValueError(
                "token / virtual_token are not supported: the token comes from token_storage "
                "(one issuance per app key for the whole fleet)"
            )
        storage = token_storage if token_storage is not None else create_token_storage()
        super().__init__(auth, virtual_auth, **kwargs)
        for domain in DOMAINS:  # same headers (User-Agent), timed token calls
            session = _Session()
            session.headers.update(self._sessions[domain].headers)
            self._sessions[domain].close()
            self._sessions[domain] = session
        self._kst_served = threading.local()
        self._kst_wrapped: dict[Domain, tuple[Token, Any]] = {}
        # The rate arguments are the traded domain's; the other one (quotes go to the real
        # domain in virtual mode) keeps its default, unless the limit is turned off.
        traded: Domain = "virtual" if self.virtual else "real"
        self._kst_tokens: dict[Domain, _DomainToken] = {}
        for domain in DOMAINS if self.virtual else ("real",):
            mine = domain == traded
            self._kst_tokens[domain] = _DomainToken(
                self,
                domain,
                storage,
                calls_per_second if mine or calls_per_second == 0 else None,
                rate_limiter if mine else None,
            )

    @property
    def token_storage(self) -> TokenStorage:
        """The storage the tokens come from."""
        return self._kst_tokens["real"].token_storage

    token = property(
        lambda kis: kis._kst_serve("real"),
        _refuse,
        doc="The real domain's access token (``KisAccessToken``), from the fleet's single flight.",
    )
    primary_token = property(
        lambda kis: kis._kst_serve("virtual" if kis.virtual else "real"),
        _refuse,
        doc="The virtual domain's access token in virtual mode, else :attr:`token`.",
    )
    _token = _held("real")
    _virtual_token = _held("virtual")

    def request(self, path: str, **kwargs: Any) -> Any:
        """pykis's ``request`` under the call policy: ``EGW00201`` re-sends bounded (then
        ``KisHTTPError``); ``EGW00121`` (say a token another process revoked) drops the token this
        thread sent, as pykis does for ``EGW00123``, and the call is made once more."""
        domain = kwargs.get("domain") or ("virtual" if self.virtual else "real")
        meter = self._sessions["virtual" if domain == "virtual" else "real"].meter
        with meter.call() if meter is not None else contextlib.nullcontext(CallPolicy()) as policy:
            try:
                return super().request(path, **kwargs)
            except KisHTTPError as exc:
                if (
                    not kwargs.get("auth", True)
                    or verdict_of(exc.response) is not Verdict.TOKEN_REJECTED
                    or policy.after(Verdict.TOKEN_REJECTED).action is not Action.REFRESH
                ):
                    raise
                # the token pykis sent (kis.py:559): the real one for "real", else primary's
                self._kst_dropped("virtual" if domain != "real" and self.virtual else "real", None)
            return super().request(path, **kwargs)

    def discard(self, domain: Domain | None = None) -> None:
        """Revoke the tokens in memory at KIS (pykis's ``token_revoke``) and drop them
        (compare-and-delete)."""
        for name, shared in self._kst_tokens.items():
            current = shared.in_memory() if domain in (None, name) else None
            if current is not None:
                token_revoke(self, current.access_token)
                shared.invalidate(current.access_token)

    def _kst_serve(self, domain: Domain) -> Any:
        token = self._kst_tokens[domain].token
        setattr(self._kst_served, domain, token.access_token)
        return self._kst_wrap(domain, token)

    def _kst_wrap(self, domain: Domain, token: Token) -> Any:
        """``token`` as pykis's ``KisAccessToken``, built once per token."""
        cached = self._kst_wrapped.get(domain)
        if cached is None or cached[0] is not token:
            cached = self._kst_wrapped[domain] = (token, self._kst_tokens[domain].wrap(token))
        return cached[1]

    def _kst_current(self, domain: Domain) -> Any:
        shared = self.__dict__.get("_kst_tokens", {}).get(domain)
        token = shared.in_memory() if shared is not None else None
        return self._kst_wrap(domain, token) if token is not None else None

    def _kst_dropped(self, domain: Domain, value: Any) -> None:
        if value is not None:
            _refuse(self, value)
        shared = self.__dict__.get("_kst_tokens", {}).get(domain)
        if shared is None:
            return  # pykis.__init__ initialising the attribute
        # Only the token this thread sent: the current one may be the fresh token another thread
        # got after the same rejection. A thread that sent none has none to drop.
        rejected = getattr(self._kst_served, domain, None)
        if rejected is not None:
            setattr(self._kst_served, domain, None)
            shared.invalidate(rejected)
