"""``import kis_safe_token`` loads no redis, keyring, httpx or asyncio; each comes when first
needed, and a missing extra is an ``ImportError`` naming it. Every check runs in a fresh
interpreter: this test process has imported all of them long ago."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import APP_KEY, SECRET

from kis_safe_token.testing import KisSimulator

HEAVY = ("redis", "keyring", "httpx", "asyncio")

#: Makes ``import redis`` / ``import httpx`` fail as they do without the extra installed.
WITHOUT_EXTRAS = """
import sys

class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("redis", "httpx", "websockets"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KOREA_INVESTMENT_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def loaded_after(code: str, **env: str) -> list[str]:
    """The heavy modules loaded once ``code`` has run in a fresh interpreter."""
    report = f"\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = run_python(textwrap.dedent(code) + report, **env)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_import_loads_no_redis_keyring_httpx_or_asyncio() -> None:
    assert loaded_after("import kis_safe_token") == []
    assert loaded_after("from kis_safe_token import *") == []


def test_public_names_stay_importable_without_loading_redis() -> None:
    code = """
        from kis_safe_token import FileTokenStorage, LockedRedisTokenStorage, RedisTokenStorage
        from kis_safe_token.storage import SealedTokenStorage, create_token_storage
        from kis_safe_token.storage.redis_retry import is_transient
        assert not isinstance(object(), (FileTokenStorage, RedisTokenStorage))
        assert issubclass(LockedRedisTokenStorage, SealedTokenStorage)
        assert not is_transient(ValueError("x"))
    """
    assert loaded_after(code) == []


def test_file_storage_client_with_a_secret_loads_none_of_them(
    sim: KisSimulator, tmp_path: Path
) -> None:
    code = f"""
        from kis_safe_token import FileTokenStorage, KoreaInvestment
        storage = FileTokenStorage({str(tmp_path / "t.json")!r})
        client = KoreaInvestment({APP_KEY!r}, {SECRET!r}, "50000000-01", token_storage=storage,
                                 base_url={sim.base_url!r})
        assert client.fetch_price("005930")["rt_cd"] == "0"
        client.close()
    """
    assert loaded_after(code) == []
    assert sim.issued == 1
    # The same store named by the environment (create_token_storage's default file backend).
    env = {"KOREA_INVESTMENT_TOKEN_FILE": str(tmp_path / "t.json")}
    code = f"""
        from kis_safe_token import KoreaInvestment
        KoreaInvestment({APP_KEY!r}, {SECRET!r}, base_url={sim.base_url!r}).close()
    """
    assert loaded_after(code, **env) == []
    assert sim.issued == 1


def test_each_is_imported_where_first_needed() -> None:
    redis_storage = """
        from kis_safe_token import LockedRedisTokenStorage
        LockedRedisTokenStorage("redis://127.0.0.1:9/0")  # builds a client, connects lazily
    """
    assert "redis" in loaded_after(redis_storage)  # (redis-py itself imports asyncio)
    keyring_lookup = """
        from kis_safe_token.keyring_secrets import resolve_api_secret
        try:
            resolve_api_secret("PSsomeAppKey")
        except Exception:
            pass
    """
    fail = "keyring.backends.fail.Keyring"
    assert "keyring" in loaded_after(keyring_lookup, PYTHON_KEYRING_BACKEND=fail)
    asyncio_side = "from kis_safe_token import AsyncKoreaInvestment"
    assert {"httpx", "asyncio"} <= set(loaded_after(asyncio_side))


def test_failed_stays_redis_errors_on_first_use() -> None:
    code = """
        import redis
        from kis_safe_token.storage.redis_retry import FAILED
        assert redis.exceptions.RedisError in FAILED and OSError in FAILED
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_a_missing_extra_is_an_import_error_naming_it() -> None:
    code = WITHOUT_EXTRAS + textwrap.dedent(
        """
        import kis_safe_token
        from kis_safe_token import LockedRedisTokenStorage, RedisTokenStorage
        from kis_safe_token.storage.redis_ha import sentinel_client
        for build in (
            lambda: RedisTokenStorage(),
            lambda: LockedRedisTokenStorage("redis://127.0.0.1:9/0"),
            lambda: sentinel_client([("127.0.0.1", 26379)], "mymaster"),
        ):
            try:
                build()
            except ImportError as exc:
                print("redis:", exc)
        try:
            kis_safe_token.AsyncKoreaInvestment
        except ImportError as exc:
            print("async:", exc)
        for name in ("KisRealtime", "AsyncKisRealtime"):
            try:
                getattr(kis_safe_token, name)
            except ImportError as exc:
                print("realtime:", exc)
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6, result.stdout
    assert all("pip install 'kis-safe-token[redis]'" in line for line in lines[:3])
    assert "pip install 'kis-safe-token[async]'" in lines[3]
    assert all("pip install 'kis-safe-token[realtime]'" in line for line in lines[4:])


def test_a_warm_read_loads_no_lock_library(sim: KisSimulator, tmp_path: Path) -> None:
    """A cold start with a warm token file (a cron job's one call) needs no lock: filelock,
    platformdirs (the default path) and uuid come only when a miss or a default path needs them."""
    path = str(tmp_path / "t.json")
    warm = f"""
        from kis_safe_token import FileTokenStorage, KoreaInvestment
        KoreaInvestment({APP_KEY!r}, {SECRET!r}, base_url={sim.base_url!r},
                        token_storage=FileTokenStorage({path!r})).fetch_price("005930")
        import sys
        print([m for m in ("filelock", "platformdirs", "uuid") if m in sys.modules])
    """
    first = run_python(warm)  # the miss: the lock is needed, and loaded
    assert first.returncode == 0, first.stderr
    assert "filelock" in first.stdout
    again = run_python(warm)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == "[]"
    assert sim.issued == 1
