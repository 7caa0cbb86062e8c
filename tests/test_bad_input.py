"""Hostile and broken input, fuzzed with hypothesis: a miss, a clear KisTokenError subclass or a
clear ValueError naming the input; never a raw traceback from a dependency, never code execution."""

from __future__ import annotations

import json
import re
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import requests
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kis_safe_token import (
    FileTokenStorage,
    KisApiError,
    KisTokenError,
    KoreaInvestment,
    LockedRedisTokenStorage,
    RedisTokenStorage,
    TokenIssueError,
    create_token_storage,
)
from kis_safe_token.crypto import derive_key
from kis_safe_token.storage.factory import base_url_from_environment, check_base_url
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token, format_kst

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY, SECRET = "fuzz-key", "fuzz-secret"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def good_token(token: str = "tok-" + "g" * 60) -> Token:
    return Token(token, time.time() + 86_400)


# -- what is stored ------------------------------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.text(max_size=12), st.text(max_size=200), max_size=3).map(
            lambda e: json.dumps({"format": "kis_safe_token", "version": 1, "entries": e}).encode()
        ),
    )
)
def test_any_file_content_is_a_miss_then_replaced(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.json"
        path.write_bytes(content)
        storage = FileTokenStorage(path)
        assert storage.load_token(KEY, SECRET) is None
        issued = good_token()
        assert storage.get_or_issue(KEY, SECRET, lambda: issued) == issued


@FUZZ
@given(json_values)
def test_valid_fernet_of_any_json_is_a_miss(payload: Any) -> None:
    sealed = Fernet(derive_key(KEY, SECRET)).encrypt(json.dumps(payload).encode())
    fake = fakeredis.FakeRedis()
    storage = RedisTokenStorage(client=fake)
    fake.set(storage._get_redis_key(KEY), sealed)
    assert storage.load_token(KEY, SECRET) is None


@FUZZ
@given(st.binary(max_size=300))
def test_any_redis_value_is_a_miss(value: bytes) -> None:
    fake = fakeredis.FakeRedis()
    storage = LockedRedisTokenStorage(client=fake)
    fake.set(storage._get_redis_key(KEY), value)
    assert storage.load_token(KEY, SECRET) is None
    issued = good_token()
    assert storage.get_or_issue(KEY, SECRET, lambda: issued) == issued


@FUZZ
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_odd_app_keys_and_secrets_round_trip_or_are_named_value_errors(
    key: str, secret: str
) -> None:
    data = Token("tok-" + "x" * 40, time.time() + 3600).to_token_data(key, secret)
    storage = RedisTokenStorage(client=fakeredis.FakeRedis(decode_responses=True))
    try:
        saved = storage.save_token(data)
        loaded = storage.load_token(key, secret)
    except ValueError as exc:
        assert "api_key" in str(exc) or "api_secret" in str(exc)
        assert secret not in str(exc) or len(secret) < 3
        return
    assert saved
    assert loaded is not None and loaded["access_token"] == data["access_token"]


# -- what KIS answers ---------------------------------------------------------------------


class CannedKis(requests.adapters.BaseAdapter):
    """Answers tokenP with ``token_answer`` and everything else with ``other_answer``."""

    def __init__(self, token_answer: tuple[int, bytes], other_answer: tuple[int, bytes]) -> None:
        super().__init__()
        self.token_answer, self.other_answer = token_answer, other_answer

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        status, body = self.token_answer if "tokenP" in (request.url or "") else self.other_answer
        resp = requests.Response()
        resp.status_code, resp._content, resp.url, resp.request = status, body, request.url, request
        resp.headers["content-type"] = "application/json; charset=utf-8"
        return resp

    def close(self) -> None:
        pass


def canned_session(
    token_answer: tuple[int, bytes], other: tuple[int, bytes] = (200, b"{}")
) -> requests.Session:
    session = requests.Session()
    session.mount("http://", CannedKis(token_answer, other))
    return session


def build(tmp: str, session: requests.Session, **kwargs: Any) -> KoreaInvestment:
    return KoreaInvestment(
        KEY,
        SECRET,
        # canned answers never wait
        token_storage=FileTokenStorage(Path(tmp) / "t.json", wait_timeout=30),
        base_url="http://127.0.0.1:9",
        session=session,
        rate_limit_wait_s=0.05,
        **kwargs,
    )


def token_answer(expires_at: float) -> tuple[int, bytes]:
    body = {
        "access_token": "tok-" + "v" * 40,
        "token_type": "Bearer",
        "access_token_token_expired": format_kst(expires_at),
        "expires_in": 86_400,
    }
    return 200, json.dumps(body).encode()


kis_bodies = st.one_of(
    st.binary(max_size=200),
    st.just(b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "access_token": st.text(max_size=50) | st.integers(),
            "access_token_token_expired": st.text(max_size=25) | st.just("2031-01-01 00:00:00"),
            "expires_in": st.integers() | st.text(max_size=5),
            "token_type": st.text(max_size=8),
            "error_code": st.sampled_from(["EGW00133", "EGW00103", "EGW00002"]),
            "error_description": st.text(max_size=30),
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@FUZZ
@given(st.sampled_from([200, 403, 500, 502]), kis_bodies)
def test_any_token_answer_is_a_token_or_a_token_issue_error(status: int, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            broker = build(tmp, canned_session((status, body)))
        except TokenIssueError:
            return
        assert broker.access_token.startswith("Bearer ")


@FUZZ
@given(st.sampled_from([200, 500, 502]), kis_bodies)
def test_any_api_answer_is_json_or_a_kis_api_error(status: int, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = build(tmp, canned_session(token_answer(time.time() + 86_400), (status, body)))
        try:
            answer = broker.fetch_price("005930")
        except KisApiError:
            return
        assert isinstance(answer, dict)


# -- what the environment says ----------------------------------------------------------


@FUZZ
@given(st.text(max_size=12))
def test_any_storage_type_is_a_storage_or_a_named_value_error(kind: str) -> None:
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": kind,
        "KOREA_INVESTMENT_TOKEN_FILE": "/nonexistent-kis-test/tokens.json",
    }
    try:
        storage = create_token_storage(env)
    except ValueError as exc:
        assert "KOREA_INVESTMENT_TOKEN_STORAGE" in str(exc) and "file, redis" in str(exc)
        return
    assert kind.strip().lower() in ("", "file", "redis")
    assert storage is not None


url_parts = st.text(alphabet=string.ascii_letters + string.digits + ":/@?=&.%-_[]", max_size=30)


@FUZZ
@given(st.sampled_from(["redis://", "rediss://", "unix://", "http://", "", "redis:"]), url_parts)
def test_any_redis_url_is_a_storage_or_a_named_value_error(scheme: str, rest: str) -> None:
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
        "KOREA_INVESTMENT_REDIS_URL": scheme + rest,
        "KOREA_INVESTMENT_REDIS_PASSWORD": "pw-secret-123",
    }
    try:
        storage = create_token_storage(env)
    except ValueError as exc:
        assert "KOREA_INVESTMENT_REDIS_URL" in str(exc)
        assert "pw-secret-123" not in str(exc)
        return
    assert isinstance(storage, LockedRedisTokenStorage)
    assert "pw-secret-123" not in repr(storage)


def test_empty_values_take_the_defaults() -> None:
    storage = create_token_storage(
        {"KOREA_INVESTMENT_TOKEN_STORAGE": "", "KOREA_INVESTMENT_TOKEN_FILE": ""}
    )
    assert isinstance(storage, FileTokenStorage)
    redis_storage = create_token_storage(
        {
            "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
            "KOREA_INVESTMENT_REDIS_URL": "",
            "KOREA_INVESTMENT_REDIS_PASSWORD": "",
        }
    )
    assert isinstance(redis_storage, LockedRedisTokenStorage)


@pytest.mark.parametrize("bad", ["", "   "])
def test_blank_app_key_is_a_named_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        KoreaInvestment(bad, SECRET, base_url="http://127.0.0.1:9")


def test_expired_token_without_a_date_header_is_not_blamed_on_the_clock(tmp_path: Path) -> None:
    ahead = time.time() + 2 * 86_400
    with pytest.raises(TokenIssueError, match="already-expired") as info:
        build(
            str(tmp_path), canned_session(token_answer(time.time() + 86_400)), clock=lambda: ahead
        )
    assert not info.value.local and "clock" not in str(info.value)


# -- what the caller passes ------------------------------------------------------------------


BAD_HEADER_VALUES = {
    "hangul": "앱키" * 10,
    "latin-1": "q7\u00e9Zk-" + "x" * 30,
    "nul": "q7Zk\x00" + "x" * 30,
    "space": "q7Zk " + "x" * 30,
    "newline": "q7Zk\n" + "x" * 30,
}


@pytest.mark.parametrize("value", BAD_HEADER_VALUES.values(), ids=BAD_HEADER_VALUES.keys())
@pytest.mark.parametrize("name", ["api_key", "api_secret"])
def test_credential_that_cannot_go_in_an_http_header_is_a_named_value_error(
    name: str, value: str, tmp_path: Path
) -> None:
    credentials = {"api_key": KEY, "api_secret": SECRET, name: value}
    with pytest.raises(ValueError, match=name) as info:
        KoreaInvestment(
            credentials["api_key"],
            credentials["api_secret"],
            token_storage=FileTokenStorage(tmp_path / "t.json"),
            base_url="http://127.0.0.1:9",
        )
    assert value not in str(info.value) and value[:6] not in str(info.value)


def test_secret_from_the_environment_is_checked_too(
    tmp_path: Path, memory_keyring: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOREA_INVESTMENT_API_SECRET", BAD_HEADER_VALUES["hangul"])
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_API_SECRET must be") as info:
        KoreaInvestment(
            KEY, token_storage=FileTokenStorage(tmp_path / "t.json"), base_url="http://127.0.0.1:9"
        )
    assert "api_secret" not in str(info.value)  # the variable, not an argument nobody passed
    assert BAD_HEADER_VALUES["hangul"][:6] not in str(info.value)


@pytest.mark.parametrize(
    "timeout",
    [0, -1, float("nan"), float("inf"), 1e300, (3.0, 0), (3.0,), (1, 2, 3), "3", None, True, []],
    ids=repr,
)
def test_bad_timeout_is_a_named_value_error(timeout: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        KoreaInvestment(
            KEY,
            SECRET,
            token_storage=FileTokenStorage(tmp_path / "t.json"),
            base_url="http://127.0.0.1:9",
            timeout=timeout,
        )


@pytest.mark.parametrize("timeout", [5, 2.5, (1, 2.5), [1, 2]], ids=repr)
def test_timeout_may_be_one_number_or_a_connect_read_pair(timeout: Any, tmp_path: Path) -> None:
    broker = build(
        str(tmp_path), canned_session(token_answer(time.time() + 86_400)), timeout=timeout
    )
    expected = (timeout, timeout) if isinstance(timeout, (int, float)) else tuple(timeout)
    assert broker.timeout == expected


@pytest.mark.parametrize(
    ("argument", "value"),
    [("tr_id", "거래"), ("tr_id", "FHKST\x0001"), ("method", "GÉT"), ("path", "@evil.example/x")],
)
def test_request_argument_that_cannot_be_sent_is_a_named_value_error(
    argument: str, value: str, tmp_path: Path
) -> None:
    broker = build(str(tmp_path), canned_session(token_answer(time.time() + 86_400)))
    call = {"method": "GET", "path": "/uapi/x", "tr_id": "FHKST01010100", argument: value}
    with pytest.raises(ValueError, match=argument):
        broker.request(call["method"], call["path"], tr_id=call["tr_id"])


def test_custtype_that_cannot_be_sent_is_a_named_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="custtype"):
        build(str(tmp_path), canned_session(token_answer(time.time() + 86_400)), custtype="개인")


def test_any_request_arguments_are_an_answer_or_a_library_error(tmp_path: Path) -> None:
    """Over real HTTP (the simulator): what http.client would choke on is caught before."""
    with KisSimulator(issue_latency_s=0) as sim:
        broker = KoreaInvestment(
            KEY, SECRET, token_storage=FileTokenStorage(tmp_path / "t.json"), base_url=sim.base_url
        )

        @FUZZ
        @given(
            st.sampled_from(["GET", "POST"]) | st.text(max_size=8),
            st.text(max_size=20).map(lambda p: "/" + p),
            st.sampled_from(["FHKST01010100"]) | st.text(max_size=12),
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        )
        def call(method: str, path: str, tr_id: str, params: dict[str, str]) -> None:
            try:
                answer = broker.request(method, path, tr_id=tr_id, params=params)
            except UnicodeError as exc:  # a ValueError, but a raw one that names no argument
                pytest.fail(f"raw {type(exc).__name__} escaped")
            except (KisTokenError, ValueError, TypeError):
                return
            assert isinstance(answer, dict)

        call()


def test_a_token_answer_nested_past_the_stack_is_a_token_issue_error(tmp_path: Path) -> None:
    with pytest.raises(TokenIssueError):
        build(str(tmp_path), canned_session((200, b"[" * 200_000)))


# -- Redis URLs: nothing of their user info in any message ------------------------------------

#: (URL, its user info as the user meant it): passwords with a raw '@', '/', '?', '#' or ':'
#: move part of themselves into what urlsplit reads as host, port, path, query or fragment.
LEAKY_REDIS_URLS = [
    ("redis://default:urlpw@LEAK/CANARYTAIL42@127.0.0.1/0", "default:urlpw@LEAK/CANARYTAIL42"),
    ("redis://default:urlpw@LEAK:99999/TAIL77@127.0.0.1/0", "default:urlpw@LEAK:99999/TAIL77"),
    ("redis://default:urlpw@LEAK:6379/TAIL77@127.0.0.1/0", "default:urlpw@LEAK:6379/TAIL77"),
    ("redis://default:pwq9?QUERYLEAK@127.0.0.1/0", "default:pwq9?QUERYLEAK"),
    ("redis://default:pwf9#FRAGLEAK@127.0.0.1/0", "default:pwf9#FRAGLEAK"),
    ("redis://SECRETUSER:SECRETPW@127.0.0.1:6379/notadb", "SECRETUSER:SECRETPW"),
    ("SECRETUSER:SECRETPW@127.0.0.1:6379/0", "SECRETUSER:SECRETPW"),
    ("unix://:SOCKPW/SOCKTAIL@/tmp/redis.sock", ":SOCKPW/SOCKTAIL"),
    ("redis://SECRETUSER:SECRETPW@" + "h" * 300 + "/0", "SECRETUSER:SECRETPW"),
    ("redis://SECRETUSER:SECRETPW@127.0.0.1:6379/0", "SECRETUSER:SECRETPW"),  # a good one
]


def userinfo_parts(userinfo: str) -> list[str]:
    return [part for part in re.split(r"[^A-Za-z0-9]+", userinfo) if len(part) >= 4]


@pytest.mark.parametrize(("url", "userinfo"), LEAKY_REDIS_URLS, ids=range(len(LEAKY_REDIS_URLS)))
def test_no_part_of_a_redis_urls_user_info_is_in_any_message(url: str, userinfo: str) -> None:
    texts: list[str] = []
    env = {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_URL": url}
    for build in (
        lambda: create_token_storage(env),
        lambda: LockedRedisTokenStorage(url),
        lambda: RedisTokenStorage(url),
    ):
        try:
            texts.append(repr(build()))
        except ValueError as exc:
            texts.append(str(exc))
    assert texts, url
    for text in texts:
        for part in userinfo_parts(userinfo):
            assert part not in text, (part, text)
    if "CANARYTAIL42" in url:  # the brief's example: refused, and told how to fix it
        assert "KOREA_INVESTMENT_REDIS_URL" in texts[0] and "percent-encode" in texts[0]


# -- hostile environment values: a ValueError naming the variable, when it is read ------------


@pytest.mark.parametrize(
    "value",
    ["~nosuchuser-kis-test/x.json", "relative/tokens.json", "tokens.json", "./t.json", "a\0b"],
)
def test_a_token_file_the_fleet_cannot_share_is_a_named_value_error(value: str) -> None:
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_TOKEN_FILE") as info:
        create_token_storage({"KOREA_INVESTMENT_TOKEN_FILE": value})
    assert "absolute path" in str(info.value)


def test_a_token_file_under_home_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    storage = create_token_storage({"KOREA_INVESTMENT_TOKEN_FILE": "~/kis/tokens.json"})
    assert isinstance(storage, FileTokenStorage)
    assert str(tmp_path / "kis" / "tokens.json") in repr(storage)


@pytest.mark.parametrize(
    "value",
    ["a" * 5_000, "h1:26379," * 600, "a" * 64 + ":26379", "bad host:26379", "x..y", "h_-!:1"],
    ids=["5000-chars", "600-nodes", "label-64", "space", "empty-label", "punctuation"],
)
def test_a_sentinel_list_the_resolver_would_refuse_is_a_named_value_error(value: str) -> None:
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
        "KOREA_INVESTMENT_REDIS_MODE": "sentinel",
        "KOREA_INVESTMENT_REDIS_SENTINELS": value,
    }
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_REDIS_SENTINELS") as info:
        create_token_storage(env)
    assert value[:30] not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "file:///etc/passwd",
        "ftp://example.com",
        "garbage",
        "http:/example.com",
        "http://",
        "https://user:PROXYPW@proxy.example.com",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "https://example.com/some/path",
        "https://example.com?x=1",
        "http://" + "a" * 300,
        "javascript:alert(1)",
    ],
)
def test_a_base_url_that_is_not_http_host_port_is_a_named_value_error(value: str) -> None:
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_BASE_URL") as info:
        base_url_from_environment({"KOREA_INVESTMENT_BASE_URL": value})
    assert "PROXYPW" not in str(info.value) and "etc/passwd" not in str(info.value)
    with pytest.raises(ValueError, match="base_url"):
        check_base_url(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("   ", None),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://openapi.koreainvestment.com:9443/", "https://openapi.koreainvestment.com:9443"),
        (
            "https://openapivts.koreainvestment.com:29443",
            "https://openapivts.koreainvestment.com:29443",
        ),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_a_base_url_of_host_and_port_is_taken(value: str, expected: str | None) -> None:
    assert base_url_from_environment({"KOREA_INVESTMENT_BASE_URL": value}) == expected
    assert base_url_from_environment({}) is None
