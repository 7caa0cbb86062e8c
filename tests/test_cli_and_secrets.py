from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keyring
import pytest
import requests
from conftest import APP_KEY, SECRET
from keyring.backends import fail

from kis_safe_token import (
    KoreaInvestment,
    SecretNotFoundError,
    delete_api_secret,
    get_api_secret,
    set_api_secret,
)
from kis_safe_token.testing import KisSimulator

# -- secrets, in process, on an in-memory keyring ----------------------------------------------


def test_secret_round_trip_in_the_keyring(memory_keyring) -> None:
    set_api_secret(APP_KEY, SECRET)
    assert memory_keyring.store[("kis_safe_token", APP_KEY)] == SECRET
    assert get_api_secret(APP_KEY) == SECRET
    assert delete_api_secret(APP_KEY) is True
    assert delete_api_secret(APP_KEY) is False
    with pytest.raises(SecretNotFoundError, match="kis-token secret set"):
        get_api_secret(APP_KEY)


def test_client_resolves_the_secret_keyring_then_environment(
    memory_keyring, sim: KisSimulator, token_path: Path, monkeypatch
) -> None:
    from kis_safe_token import FileTokenStorage

    def build() -> KoreaInvestment:
        return KoreaInvestment(
            APP_KEY, None, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
        )

    with pytest.raises(SecretNotFoundError, match=f"kis-token secret set {APP_KEY}"):
        build()
    monkeypatch.setenv("KOREA_INVESTMENT_API_SECRET", SECRET)
    assert build().api_secret == SECRET
    monkeypatch.delenv("KOREA_INVESTMENT_API_SECRET")
    set_api_secret(APP_KEY, SECRET)
    assert build().api_secret == SECRET
    assert sim.issued == 1


def test_no_keyring_backend_says_how_to_pick_one(monkeypatch) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        with pytest.raises(SecretNotFoundError, match="PYTHON_KEYRING_BACKEND") as info:
            KoreaInvestment(APP_KEY, None, base_url="http://127.0.0.1:9")
        assert "keyrings.alt" in str(info.value)
        with pytest.raises(SecretNotFoundError, match="PYTHON_KEYRING_BACKEND"):
            set_api_secret(APP_KEY, SECRET)
        monkeypatch.setenv("KOREA_INVESTMENT_API_SECRET", SECRET)
        from kis_safe_token.secrets import resolve_api_secret

        assert resolve_api_secret(APP_KEY) == SECRET
    finally:
        keyring.set_keyring(previous)


# -- the command line, as subprocesses -----------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, sim: KisSimulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOREA_INVESTMENT_")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_DATA_HOME=str(tmp_path / "home" / "data"),
        PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring",
        KOREA_INVESTMENT_TOKEN_FILE=str(tmp_path / "cache" / "tokens.json"),
        KOREA_INVESTMENT_BASE_URL=sim.base_url,
        KOREA_INVESTMENT_API_KEY=APP_KEY,
    )
    return env


def kis_token(
    env: dict[str, str], *args: str, stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kis_safe_token", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_nothing_leaked(sim: KisSimulator, *outputs: str) -> None:
    for out in outputs:
        assert SECRET not in out
        for token in sim.issued_tokens():
            assert token not in out
            assert token[-40:] not in out


def test_every_cli_command_works_and_leaks_nothing(
    cli_env: dict[str, str], sim: KisSimulator
) -> None:
    outputs: list[str] = []

    def run(*args: str, stdin: str = "", code: int = 0) -> subprocess.CompletedProcess[str]:
        result = kis_token(cli_env, *args, stdin=stdin)
        outputs.extend([result.stdout, result.stderr])
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return result

    missing = run("status", code=1)
    assert "kis-token secret set" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    assert "stored" in run("secret", "set", APP_KEY, stdin=SECRET + "\n").stdout
    assert "none stored" in run("status").stdout
    issued = run("issue").stdout
    assert "KST" in issued and sim.issued == 1
    status = json.loads(run("status", "--json").stdout)
    assert status["valid"] is True and status["seconds_left"] > 86_000
    assert status["token"].endswith("chars)")
    run("issue")  # served from the store
    assert sim.issued == 1
    sim.expire_tokens()  # opens KIS's one-minute window for the forced issue
    run("issue", "--force")
    assert sim.issued == 2
    assert "revoked" in run("revoke").stdout
    assert sim.counts["revoke_requests"] == 1
    assert "none stored" in run("status").stdout
    sim.expire_tokens()
    run("issue")
    assert "cleared" in run("clear").stdout
    assert "none stored" in run("status").stdout
    assert "deleted" in run("secret", "delete", APP_KEY).stdout
    assert "no secret" in run("secret", "delete", APP_KEY).stdout
    usage = run("issue", "--storage", "sqlite", code=2)
    assert "invalid choice" in usage.stderr
    assert_nothing_leaked(sim, *outputs)


def test_four_processes_with_secret_from_the_keyring_share_one_issuance(
    cli_env: dict[str, str], sim: KisSimulator
) -> None:
    assert kis_token(cli_env, "secret", "set", APP_KEY, stdin=SECRET + "\n").returncode == 0
    code = (
        "from kis_safe_token import KoreaInvestment\n"
        f"c = KoreaInvestment({APP_KEY!r}, None, '50000000-01')\n"
        "print(c.fetch_price('005930')['rt_cd'], c.access_token[-12:])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({out.split()[1] for out, _ in outs}) == 1
    assert {out.split()[0] for out, _ in outs} == {"0"}
    assert sim.issued == 1 and sim.rate_limited == 0


def test_missing_keyring_backend_is_a_clear_cli_error(cli_env: dict[str, str]) -> None:
    cli_env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
    result = kis_token(cli_env, "secret", "set", APP_KEY, stdin=SECRET + "\n")
    assert result.returncode == 1
    assert "PYTHON_KEYRING_BACKEND" in result.stderr and "Traceback" not in result.stderr


def test_bad_storage_env_is_a_clear_cli_error(cli_env: dict[str, str]) -> None:
    cli_env["KOREA_INVESTMENT_API_SECRET"] = SECRET
    cli_env["KOREA_INVESTMENT_TOKEN_STORAGE"] = "sqlite"
    result = kis_token(cli_env, "status")
    assert result.returncode == 1
    assert "KOREA_INVESTMENT_TOKEN_STORAGE" in result.stderr and "file, redis" in result.stderr


def test_simulator_command_serves_kis_until_interrupted(cli_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kis_safe_token", "simulator", "--port", "0"],
        env=cli_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = line.split("listening on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        answer = requests.post(
            f"{url}/oauth2/tokenP",
            timeout=5,
            json={"grant_type": "client_credentials", "appkey": "k", "appsecret": "s"},
        )
        assert answer.status_code == 200 and "access_token" in answer.json()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0


@pytest.mark.parametrize("storage", ["file", "redis"])
def test_demo_command_reports_one_issuance(
    cli_env: dict[str, str], storage: str, redis_server
) -> None:
    result = kis_token(cli_env, "demo", "--workers", "3", "--storage", storage, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens issued by KIS: 1" in result.stdout
    assert "OK: one issuance shared by every worker" in result.stdout
