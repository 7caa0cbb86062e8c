"""KisAuth: a user's own requests code with the fleet's one token, against the simulator, a
transport-level fake KIS for what the simulator cannot do (redirects), and a herd of processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import APP_KEY, SECRET

from kis_safe_token import (
    FileTokenStorage,
    KisAuth,
    KoreaInvestment,
    LockedRedisTokenStorage,
    SharedToken,
)
from kis_safe_token.testing import KisSimulator

PRICE_PATH = "/uapi/domestic-stock/v1/quotations/inquire-price"
PRICE_PARAMS = {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}


def get_price(session: requests.Session, base_url: str, **headers: str) -> requests.Response:
    return session.get(
        f"{base_url}{PRICE_PATH}",
        params=PRICE_PARAMS,
        headers={"tr_id": "FHKST01010100", **headers},
        timeout=10,
    )


def token_id(bearer: str) -> str:
    """A short, safe name for a token in a message."""
    return hashlib.sha256(bearer.encode()).hexdigest()[:8]


def user_session(sim: KisSimulator, token_path: Path) -> requests.Session:
    session = requests.Session()
    session.auth = KisAuth(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    return session


# -- against the simulator -------------------------------------------------------------------


def test_a_users_own_session_calls_kis_with_the_shared_token(
    sim: KisSimulator, token_path: Path
) -> None:
    with user_session(sim, token_path) as session:
        answer = get_price(session, sim.base_url, custtype="B")
    assert answer.status_code == 200 and answer.json()["rt_cd"] == "0"
    sent = answer.request.headers
    assert sent["authorization"].startswith("Bearer ")
    assert sent["appkey"] == APP_KEY and sent["appsecret"] == SECRET
    assert sent["tr_id"] == "FHKST01010100" and sent["custtype"] == "B"  # the caller's own
    assert sim.issued == 1 and not answer.history


def test_an_expired_token_is_replaced_once_and_the_request_resent(
    sim: KisSimulator, token_path: Path
) -> None:
    with user_session(sim, token_path) as session:
        first = get_price(session, sim.base_url)
        sim.expire_tokens()
        second = get_price(session, sim.base_url)
    assert first.status_code == 200 and second.status_code == 200
    assert sim.issued == 2 and sim.counts["EGW00123"] == 1 and sim.rate_limited == 0
    assert [r.status_code for r in second.history] == [500]
    assert second.request.headers["authorization"] != first.request.headers["authorization"]


def test_a_token_rejected_again_is_resent_only_once(
    sim: KisSimulator, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    price = sim._price

    def always_expired(headers: Any, query: Any) -> tuple[int, dict[str, Any]]:
        sim.expire_tokens()  # every token dies before KIS looks at it (window reset too)
        return price(headers, query)

    with user_session(sim, token_path) as session:
        monkeypatch.setattr(sim, "_price", always_expired)
        answer = get_price(session, sim.base_url)
    assert answer.status_code == 500 and answer.json()["msg_cd"] == "EGW00123"
    assert len(answer.history) == 1
    assert sim.counts["price_requests"] == 2 and sim.issued == 2


def test_one_session_for_the_oauth_calls_and_the_auth_does_not_deadlock(
    sim: KisSimulator, token_path: Path
) -> None:
    """The session's own auth must not apply to tokenP: it would wait for the token it issues."""
    session = requests.Session()
    shared = SharedToken(
        APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url, session=session
    )
    session.auth = KisAuth.from_shared(shared)
    done: list[int] = []
    worker = threading.Thread(
        target=lambda: done.append(get_price(session, sim.base_url).status_code)
    )
    worker.daemon = True  # if it deadlocks, the test fails instead of hanging the run
    worker.start()
    worker.join(20)
    assert done == [200]
    assert sim.issued == 1


def test_kis_auth_and_a_client_in_one_process_share_one_token(
    sim: KisSimulator, token_path: Path
) -> None:
    broker = KoreaInvestment(
        APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
    )
    with requests.Session() as session:
        session.auth = KisAuth.from_shared(broker.shared_token)
        assert get_price(session, sim.base_url).status_code == 200
        sim.expire_tokens()
        assert get_price(session, sim.base_url).status_code == 200
    assert broker.fetch_price("005930")["rt_cd"] == "0"  # already holds the fresh token
    assert sim.issued == 2 and sim.counts["EGW00123"] == 1


def test_a_request_to_another_host_is_refused_without_sending_credentials(
    sim: KisSimulator, token_path: Path
) -> None:
    with user_session(sim, token_path) as session, pytest.raises(ValueError) as info:
        session.get("http://127.0.0.1:9/elsewhere", timeout=5)
    assert "base_url" in str(info.value) and SECRET not in str(info.value)
    assert sim.counts["issue_requests"] == 0


# -- a fake KIS inside requests' transport, for what the simulator does not do -----------------


class FakeKis(requests.adapters.BaseAdapter):
    """``tokenP`` issues ``tok-1…``, ``tok-2…``; other calls get ``answer(request)``."""

    def __init__(
        self, answer: Callable[[requests.PreparedRequest], tuple[int, dict, dict[str, str]]]
    ) -> None:
        super().__init__()
        self.answer = answer
        self.sent: list[requests.PreparedRequest] = []
        self.issued = 0

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if (request.url or "").endswith("/oauth2/tokenP"):
            self.issued += 1
            status, body, headers = (
                200,
                {"access_token": f"tok-{self.issued}-" + "x" * 40, "expires_in": 86_400},
                {},
            )
        else:
            self.sent.append(request)
            status, body, headers = self.answer(request)
        resp = requests.Response()
        resp.status_code, resp._content = status, json.dumps(body).encode()
        resp.url, resp.request, resp.connection = request.url, request, self
        resp.headers.update({"content-type": "application/json", **headers})
        return resp

    def close(self) -> None:
        pass


def fake_auth(fake: FakeKis, token_path: Path) -> KisAuth:
    kis_session = requests.Session()
    kis_session.mount("http://", fake)
    holder = SharedToken(
        APP_KEY,
        SECRET,
        FileTokenStorage(token_path),
        base_url="http://kis.test",
        session=kis_session,
    )
    return KisAuth.from_shared(holder)


def test_a_redirect_never_carries_the_credentials(token_path: Path) -> None:
    def answer(request: requests.PreparedRequest) -> tuple[int, dict, dict[str, str]]:
        if request.url == "http://kis.test/start":
            return 302, {}, {"location": "http://elsewhere.test/landing"}
        return 200, {"rt_cd": "0"}, {}

    fake = FakeKis(answer)
    with requests.Session() as session:
        session.mount("http://", fake)
        answer_ = session.get("http://kis.test/start", auth=fake_auth(fake, token_path))
    assert answer_.status_code == 200
    first, landing = fake.sent
    assert landing.url == "http://elsewhere.test/landing"
    for header in ("authorization", "appkey", "appsecret"):
        assert header not in landing.headers
    assert SECRET not in json.dumps(dict(landing.headers))


def test_a_post_body_is_resent_unchanged_with_the_fresh_token(token_path: Path) -> None:
    def answer(request: requests.PreparedRequest) -> tuple[int, dict, dict[str, str]]:
        if request.headers["authorization"].startswith("Bearer tok-1-"):
            return 500, {"rt_cd": "1", "msg_cd": "EGW00123", "msg1": "expired"}, {}
        return 200, {"rt_cd": "0"}, {}

    fake = FakeKis(answer)
    with requests.Session() as session:
        session.mount("http://", fake)
        order = {"PDNO": "005930", "ORD_QTY": "1"}
        answer_ = session.post(
            "http://kis.test/uapi/order", json=order, auth=fake_auth(fake, token_path)
        )
    assert answer_.status_code == 200 and fake.issued == 2
    rejected, resent = fake.sent
    assert json.loads(resent.body) == order and resent.body == rejected.body
    assert resent.headers["authorization"].startswith("Bearer tok-2-")


# -- a herd of processes using only requests + KisAuth ---------------------------------------


def auth_worker(spec: dict[str, Any], base_url: str, rounds: list[Any], out: Any) -> None:
    """One process of the herd: its own requests.Session with KisAuth; one call per round."""
    try:
        if spec["kind"] == "file":
            storage: Any = FileTokenStorage(spec["path"])
        else:
            storage = LockedRedisTokenStorage(spec["url"], key_prefix=spec["key_prefix"])
        session = requests.Session()
        session.auth = KisAuth(APP_KEY, SECRET, storage, base_url=base_url)
        out.put(("ready", ""))
        for go in rounds:
            if not go.wait(120):
                out.put(("no go", ""))
                return
            answer = get_price(session, base_url)
            out.put((answer.status_code, token_id(answer.request.headers["authorization"])))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put((f"{type(exc).__name__}: {exc}", ""))


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_a_herd_using_only_requests_makes_one_issuance_and_one_more_after_expiry(
    backend: str, sim: KisSimulator, tmp_path: Path, key_prefix: str, request: pytest.FixtureRequest
) -> None:
    if backend == "file":
        spec = {"kind": "file", "path": str(tmp_path / "cache" / "tokens.json")}
    else:
        spec = {
            "kind": "redis",
            "url": request.getfixturevalue("redis_url"),
            "key_prefix": key_prefix,
        }
    ctx = mp.get_context("spawn")
    out, rounds = ctx.Queue(), [ctx.Event(), ctx.Event()]
    herd = [
        ctx.Process(target=auth_worker, args=(spec, sim.base_url, rounds, out)) for _ in range(8)
    ]
    for p in herd:
        p.start()
    try:
        assert [out.get(timeout=120)[0] for _ in herd] == ["ready"] * 8
        assert sim.counts["issue_requests"] == 0  # KisAuth fetches nothing before a request
        rounds[0].set()
        first = [out.get(timeout=120) for _ in herd]
        assert [status for status, _ in first] == [200] * 8, first
        assert len({token for _, token in first}) == 1
        assert sim.issued == 1 and sim.rate_limited == 0

        sim.expire_tokens()  # mid-run: every process still holds the old token in memory
        rounds[1].set()
        second = [out.get(timeout=120) for _ in herd]
        assert [status for status, _ in second] == [200] * 8, second
        assert len({token for _, token in second}) == 1 and second[0][1] != first[0][1]
        assert sim.issued == 2 and sim.rate_limited == 0
        assert sim.counts["EGW00123"] == 8  # each process met the expiry once and re-sent once
    finally:
        for go in rounds:
            go.set()
        for p in herd:
            p.join(30)
            if p.is_alive():
                p.kill()
