"""The seed guide's section 6.1 examples, unchanged, against RedisTokenStorage."""

from datetime import datetime, timedelta

import fakeredis
import pytest

from kis_safe_token import RedisTokenStorage


@pytest.fixture
def fake_redis():
    """In-memory Redis 인스턴스 (fakeredis)"""
    return fakeredis.FakeStrictRedis(decode_responses=True)


@pytest.fixture
def redis_storage(fake_redis, monkeypatch):
    """fakeredis를 사용하는 RedisTokenStorage"""

    def mock_from_url(*args, **kwargs):
        return fake_redis

    monkeypatch.setattr("redis.from_url", mock_from_url)
    return RedisTokenStorage("redis://localhost:6379/0")


def test_save_and_load(redis_storage):
    """토큰 저장 및 로드 테스트"""
    token_data = {
        "access_token": "Bearer test",
        "access_token_token_expired": "2025-12-31 23:59:59",
        "timestamp": int((datetime.now() + timedelta(days=1)).timestamp()),
        "api_key": "test_key",
        "api_secret": "test_secret",
    }

    assert redis_storage.save_token(token_data)
    loaded = redis_storage.load_token("test_key", "test_secret")
    assert loaded["access_token"] == "Bearer test"


def test_ttl_auto_expire(redis_storage, fake_redis):
    """TTL 자동 만료 테스트"""
    token_data = {
        "access_token": "Bearer ttl_test",
        "timestamp": int((datetime.now() + timedelta(seconds=10)).timestamp()),
        "api_key": "ttl_key",
        "api_secret": "ttl_secret",
    }

    redis_storage.save_token(token_data)

    # TTL 확인
    redis_key = redis_storage._get_redis_key("ttl_key")
    ttl = fake_redis.ttl(redis_key)
    assert 5 < ttl <= 10  # TTL이 설정되어 있음
