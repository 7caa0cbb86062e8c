"""A full run at DEBUG logging: no log record, repr, str or exception message carries the secret
or a whole token."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import APP_KEY, SECRET

from kis_safe_token import (
    FileTokenStorage,
    KisTokenError,
    KoreaInvestment,
    LockedRedisTokenStorage,
    RedisTokenStorage,
)
from kis_safe_token.crypto import Sealer
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import free_port
from kis_safe_token.token import Token

REDIS_PASSWORD = "redis-pass-" + "q" * 20


def must_not_issue() -> Token:
    raise AssertionError("an unreachable store must fail before asking KIS")


def test_nothing_secret_reaches_logs_reprs_or_errors(
    sim: KisSimulator,
    token_path: Path,
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # root, urllib3 and kis_safe_token alike
    texts: list[str] = []
    file_storage = FileTokenStorage(token_path)
    redis_storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    for storage in (file_storage, redis_storage):
        broker = KoreaInvestment(
            APP_KEY, SECRET, "50000000-01", token_storage=storage, base_url=sim.base_url
        )
        broker.fetch_price("005930")
        broker.load_access_token()
        sim.expire_tokens()
        broker.fetch_price("005930")  # EGW00123 -> compare-and-delete -> re-issue -> retry
        texts += [
            repr(broker),
            str(broker),
            repr(storage),
            repr(broker.token),
            str(broker.token),
            repr(Sealer(APP_KEY, SECRET)),
        ]
        broker.revoke_access_token()
        sim.expire_tokens()
    assert sim.issued == 4

    errors: list[BaseException] = []
    for attempt in (
        lambda: KoreaInvestment(
            APP_KEY,
            "wrong-" + SECRET,
            token_storage=FileTokenStorage(token_path.with_name("other.json")),
            base_url=sim.base_url,
        ),
        lambda: KoreaInvestment(
            APP_KEY,
            SECRET,
            base_url=sim.base_url,
            token_storage=(
                LockedRedisTokenStorage(
                    f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0", key_prefix="dead"
                )
            ),
        ),
        lambda: RedisTokenStorage(
            f"redis://127.0.0.1:{free_port()}/0", password=REDIS_PASSWORD
        ).get_or_issue(APP_KEY, SECRET, must_not_issue),
    ):
        with pytest.raises(KisTokenError) as info:
            attempt()
        errors.append(info.value)
    token_path.write_bytes(b"\x80garbage")  # a corrupt file is logged
    assert FileTokenStorage(token_path).load_token(APP_KEY, SECRET) is None
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [str(e.__cause__) for e in errors if e.__cause__ is not None]
    texts += [r.getMessage() for r in caplog.records]
    texts += [caplog.text]

    issued = sim.issued_tokens()
    assert len(issued) == 4
    assert any("kis_safe_token" == r.name for r in caplog.records)
    for text in texts:
        assert SECRET not in text
        assert REDIS_PASSWORD not in text
        for token in issued:
            assert token not in text and token[-24:] not in text
