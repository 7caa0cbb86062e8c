"""A faithful re-implementation of the seed guide's design, to measure against in one run.

As the guide has it: a pickle file written in place (no lock, no temp file), a Redis hash with
the api_secret in clear and no lock, ``check_token_valid`` + ``load_token`` on start-up (five
Redis round trips), and the KST expiry string read as local time. Only for benchmarks.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests


class SeedFileTokenStorage:
    def __init__(self, file_path: str) -> None:
        self.token_file = Path(file_path)

    def save_token(self, token_data: dict[str, Any]) -> bool:
        try:
            self.token_file.parent.mkdir(parents=True, exist_ok=True)
            with self.token_file.open("wb") as f:
                pickle.dump(token_data, f)
            return True
        except Exception:
            return False

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        if not self.check_token_valid(api_key, api_secret):
            return None
        try:
            with self.token_file.open("rb") as f:
                return pickle.load(f)  # noqa: S301 - the seed's design, measured, never shipped
        except Exception:
            return None

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        if not self.token_file.exists():
            return False
        try:
            with self.token_file.open("rb") as f:
                data = pickle.load(f)  # noqa: S301
        except Exception:
            return False
        if data.get("api_key") != api_key or data.get("api_secret") != api_secret:
            return False
        return int(datetime.now().timestamp()) < data.get("timestamp", 0)


class SeedRedisTokenStorage:
    def __init__(self, redis_url: str, key_prefix: str = "korea_investment:token") -> None:
        import hashlib

        import redis

        self._hash = hashlib
        self.redis_client = redis.from_url(redis_url, decode_responses=True)
        self.key_prefix = key_prefix

    def _get_redis_key(self, api_key: str) -> str:
        return f"{self.key_prefix}:{self._hash.sha256(api_key.encode()).hexdigest()[:12]}"

    def save_token(self, token_data: dict[str, Any]) -> bool:
        try:
            key = self._get_redis_key(token_data["api_key"])
            self.redis_client.hset(
                key,
                mapping={
                    "access_token": token_data["access_token"],
                    "access_token_token_expired": token_data["access_token_token_expired"],
                    "timestamp": str(token_data["timestamp"]),
                    "api_key": token_data["api_key"],
                    "api_secret": token_data["api_secret"],
                },
            )
            ttl = token_data["timestamp"] - int(datetime.now().timestamp())
            if ttl > 0:
                self.redis_client.expire(key, ttl)
            return True
        except Exception:
            return False

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        if not self.check_token_valid(api_key, api_secret):
            return None
        data = self.redis_client.hgetall(self._get_redis_key(api_key))
        if not data:
            return None
        return {**data, "timestamp": int(data["timestamp"])}

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        try:
            key = self._get_redis_key(api_key)
            if not self.redis_client.exists(key):
                return False
            data = self.redis_client.hgetall(key)
            if data.get("api_secret") != api_secret:
                return False
            return int(datetime.now().timestamp()) < int(data.get("timestamp", 0))
        except Exception:
            return False


class SeedKoreaInvestment:
    """The seed client's start-up: check, then load, else issue and save."""

    def __init__(self, api_key: str, api_secret: str, storage: Any, base_url: str) -> None:
        self.api_key, self.api_secret, self.token_storage, self.base_url = (
            api_key,
            api_secret,
            storage,
            base_url,
        )
        self.access_token = None
        if self.token_storage.check_token_valid(api_key, api_secret):
            data = self.token_storage.load_token(api_key, api_secret)
            self.access_token = f"Bearer {data['access_token']}"
        else:
            self.issue_access_token()

    def issue_access_token(self) -> None:
        resp = requests.post(
            f"{self.base_url}/oauth2/tokenP",
            timeout=10,
            json={
                "grant_type": "client_credentials",
                "appkey": self.api_key,
                "appsecret": self.api_secret,
            },
        )
        data = resp.json()
        self.access_token = f"Bearer {data['access_token']}"  # KeyError on EGW00133, as in the seed
        expired = datetime.strptime(data["access_token_token_expired"], "%Y-%m-%d %H:%M:%S")
        data["timestamp"] = int(expired.timestamp())  # local time: the seed's bug
        data["api_key"], data["api_secret"] = self.api_key, self.api_secret
        self.token_storage.save_token(data)


def build_seed_storage(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "file":
        return SeedFileTokenStorage(spec["path"])
    return SeedRedisTokenStorage(spec["url"], spec["key_prefix"])


def _seed_worker(
    spec: dict[str, Any], base_url: str, api_key: str, secret: str, barrier: Any, out: Any
) -> None:
    storage = build_seed_storage(spec)
    barrier.wait(120)
    try:
        client = SeedKoreaInvestment(api_key, secret, storage, base_url)
        out.put(("ok", client.access_token, time.time()))
    except Exception as exc:  # noqa: BLE001
        out.put(("error", type(exc).__name__, time.time()))


def run_seed_herd(
    n: int, spec: dict[str, Any], base_url: str, api_key: str, secret: str
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_seed_worker, args=(spec, base_url, api_key, secret, barrier, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    barrier.wait(120)
    released = time.time()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    ok = [r for r in results if r[0] == "ok"]
    return {
        "errors": len(results) - len(ok),
        "distinct_tokens": len({r[1] for r in ok}),
        "herd_wall_s": max(r[2] for r in results) - released,
    }
