from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keyring
import pytest
import requests
from conftest import APP_KEY, SECRET, MemoryKeyring
from keyring.backend import KeyringBackend
from keyring.backends import chainer, fail, null
from keyrings.alt.file import EncryptedKeyring, PlaintextKeyring

from kis_safe_token import (
    InsecureKeyringError,
    KoreaInvestment,
    SecretNotFoundError,
    delete_api_secret,
    get_api_secret,
    set_api_secret,
)
from kis_safe_token.keyring_secrets import resolve_api_secret
from kis_safe_token.testing import KisSimulator

ALLOW_ENV = "KIS_SAFE_TOKEN_ALLOW_INSECURE_KEYRING"


class LowPriorityKeyring(MemoryKeyring):
    """Keyring's convention: a priority below 1 is "not recommended"."""

    priority = 0.5  # type: ignore[assignment]


class EncryptedFileStandIn(MemoryKeyring, EncryptedKeyring):
    """Stands in for keyrings.alt's password-protected file keyring (priority 0.6) without
    pycryptodome: below 1, yet it protects the secret."""

    priority = 0.6  # type: ignore[assignment]

    def __init__(self) -> None:
        KeyringBackend.__init__(self)
        self.store = {}


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
        assert resolve_api_secret(APP_KEY) == SECRET
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def use_keyring() -> Iterator[Callable[[KeyringBackend], None]]:
    """``use_keyring(backend)`` makes ``backend`` the active keyring until the test ends."""
    previous = keyring.get_keyring()
    yield keyring.set_keyring
    keyring.set_keyring(previous)


@pytest.fixture
def plaintext(tmp_path: Path) -> PlaintextKeyring:
    """keyrings.alt's plaintext file keyring, on a file in the test's folder."""
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring_pass.cfg")
    return backend


def test_set_and_get_name_the_backend_in_the_log(memory_keyring, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="kis_safe_token")
    assert set_api_secret(APP_KEY, SECRET) == "conftest.MemoryKeyring"
    assert get_api_secret(APP_KEY) == SECRET
    messages = [r.getMessage() for r in caplog.records]
    assert sum("conftest.MemoryKeyring" in m for m in messages) == 2, messages
    assert not any(SECRET in m or APP_KEY in m for m in messages)


def test_plaintext_keyring_is_refused_for_set_and_get(
    plaintext: PlaintextKeyring, use_keyring, monkeypatch
) -> None:
    plaintext.set_password("kis_safe_token", APP_KEY, SECRET)  # stored earlier, in clear
    use_keyring(plaintext)
    for call in (lambda: set_api_secret(APP_KEY, "new-" + SECRET), lambda: get_api_secret(APP_KEY)):
        with pytest.raises(SecretNotFoundError) as info:
            call()
        message = str(info.value)
        assert "keyrings.alt.file.PlaintextKeyring" in message
        for way_out in ("Secret Service", "EncryptedKeyring", "KOREA_INVESTMENT_API_SECRET"):
            assert way_out in message
        assert ALLOW_ENV in message and SECRET not in message
    assert plaintext.get_password("kis_safe_token", APP_KEY) == SECRET  # set wrote nothing
    assert isinstance(info.value, InsecureKeyringError)
    assert info.value.backend == "keyrings.alt.file.PlaintextKeyring"

    with pytest.raises(SecretNotFoundError, match="PlaintextKeyring"):
        resolve_api_secret(APP_KEY)
    monkeypatch.setenv("KOREA_INVESTMENT_API_SECRET", "from-env-" + SECRET)
    assert resolve_api_secret(APP_KEY) == "from-env-" + SECRET  # not the plaintext one

    monkeypatch.setenv(ALLOW_ENV, "maybe")
    with pytest.raises(ValueError, match=ALLOW_ENV):
        get_api_secret(APP_KEY)
    monkeypatch.setenv(ALLOW_ENV, "1")  # the explicit opt-in
    assert get_api_secret(APP_KEY) == SECRET
    assert set_api_secret(APP_KEY, SECRET) == "keyrings.alt.file.PlaintextKeyring"


@pytest.mark.parametrize(
    ("backend", "accepted"),
    [
        (null.Keyring(), False),
        (fail.Keyring(), False),
        (PlaintextKeyring(), False),
        (LowPriorityKeyring(), False),
        (MemoryKeyring(), True),
        (EncryptedFileStandIn(), True),
    ],
    ids=["null", "fail", "plaintext", "priority-0.5", "priority-1", "encrypted-file"],
)
def test_backends_that_do_not_protect_the_secret_are_refused(
    backend: KeyringBackend, accepted: bool, use_keyring, tmp_path: Path
) -> None:
    if isinstance(backend, PlaintextKeyring):
        backend.file_path = str(tmp_path / "keyring_pass.cfg")
    use_keyring(backend)
    if accepted:
        assert set_api_secret(APP_KEY, SECRET).endswith(type(backend).__name__)
        assert get_api_secret(APP_KEY) == SECRET
        return
    with pytest.raises(SecretNotFoundError, match="PYTHON_KEYRING_BACKEND") as info:
        set_api_secret(APP_KEY, SECRET)
    assert type(backend).__name__ in str(info.value)
    with pytest.raises(SecretNotFoundError, match=type(backend).__name__):
        get_api_secret(APP_KEY)


def test_chainer_uses_only_the_members_that_protect_the_secret(
    plaintext: PlaintextKeyring, use_keyring, monkeypatch
) -> None:
    plaintext.set_password("kis_safe_token", APP_KEY, SECRET)  # stored earlier, in clear
    memory = MemoryKeyring()
    monkeypatch.setattr(chainer.ChainerBackend, "backends", [memory, plaintext])
    use_keyring(chainer.ChainerBackend())
    with pytest.raises(SecretNotFoundError, match="kis-token secret set"):
        get_api_secret(APP_KEY)  # the plaintext copy is not used
    assert set_api_secret(APP_KEY, "new-" + SECRET) == "conftest.MemoryKeyring"
    assert memory.store[("kis_safe_token", APP_KEY)] == "new-" + SECRET
    assert get_api_secret(APP_KEY) == "new-" + SECRET

    monkeypatch.setattr(chainer.ChainerBackend, "backends", [plaintext])
    with pytest.raises(SecretNotFoundError, match="keyrings.alt.file.PlaintextKeyring"):
        set_api_secret(APP_KEY, SECRET)
    with pytest.raises(SecretNotFoundError, match="keyrings.alt.file.PlaintextKeyring"):
        get_api_secret(APP_KEY)


# -- the command line, as subprocesses -----------------------------------------------------------


TESTS_DIR = Path(__file__).resolve().parent
DOUBLE = "keyring_double.JsonFileKeyring"  # a test double: see tests/keyring_double.py


@pytest.fixture
def cli_env(tmp_path: Path, sim: KisSimulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOREA_INVESTMENT_")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_DATA_HOME=str(tmp_path / "home" / "data"),
        PYTHON_KEYRING_BACKEND=DOUBLE,
        KIS_TEST_KEYRING_FILE=str(tmp_path / "test-keyring.json"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
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

    stored = run("secret", "set", APP_KEY, stdin=SECRET + "\n").stdout
    assert "stored" in stored and f"(backend: {DOUBLE})" in stored
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


def test_issue_sits_out_the_window_the_user_sets(cli_env: dict[str, str]) -> None:
    """``kis-token issue --force`` against a KIS whose window ends with its first refusal: the
    CLI sits out ``--issue-window`` (or ``$KOREA_INVESTMENT_ISSUE_WINDOW_S``), not 61 s."""
    assert kis_token(cli_env, "secret", "set", APP_KEY, stdin=SECRET + "\n").returncode == 0
    with KisSimulator(apps={APP_KEY: SECRET}, refusals_per_window=1, issue_latency_s=0) as sim:
        env = {**cli_env, "KOREA_INVESTMENT_BASE_URL": sim.base_url}
        assert kis_token(env, "issue").returncode == 0
        for args, extra in (
            (["--issue-window", "1"], {}),
            ([], {"KOREA_INVESTMENT_ISSUE_WINDOW_S": "1"}),
        ):
            started = time.monotonic()
            result = kis_token({**env, **extra}, "issue", "--force", *args, timeout=40)
            assert result.returncode == 0, result.stderr
            assert time.monotonic() - started < 30  # 61 s without the setting
            assert "sitting out its window" in result.stderr
            assert "asking again in 1.0 s" in result.stderr
        assert sim.issued == 3 and sim.rate_limited == 2
        bad = kis_token(env, "issue", "--issue-window", "0")
        assert bad.returncode == 1 and "--issue-window must be" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


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


def test_cli_refuses_a_plaintext_keyring(cli_env: dict[str, str], tmp_path: Path) -> None:
    cli_env["PYTHON_KEYRING_BACKEND"] = "keyrings.alt.file.PlaintextKeyring"
    result = kis_token(cli_env, "secret", "set", APP_KEY, stdin=SECRET + "\n")
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for needed in (
        "keyrings.alt.file.PlaintextKeyring",
        "Secret Service",
        "PYTHON_KEYRING_BACKEND",
        "KOREA_INVESTMENT_API_SECRET",
        "--allow-insecure-keyring",
    ):
        assert needed in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert list((tmp_path / "home").rglob("keyring_pass.cfg")) == []


def test_cli_opt_in_uses_a_plaintext_keyring_and_names_it(
    cli_env: dict[str, str], tmp_path: Path, sim: KisSimulator
) -> None:
    cli_env["PYTHON_KEYRING_BACKEND"] = "keyrings.alt.file.PlaintextKeyring"
    result = kis_token(
        cli_env, "secret", "set", "--allow-insecure-keyring", APP_KEY, stdin=SECRET + "\n"
    )
    assert result.returncode == 0, result.stderr
    assert "(backend: keyrings.alt.file.PlaintextKeyring)" in result.stdout
    assert len(list((tmp_path / "home").rglob("keyring_pass.cfg"))) == 1
    refused = kis_token(cli_env, "status")
    assert refused.returncode == 1 and "PlaintextKeyring" in refused.stderr
    assert kis_token(cli_env, "status", "--allow-insecure-keyring").returncode == 0
    assert kis_token(cli_env, "issue", "--allow-insecure-keyring").returncode == 0
    cli_env[ALLOW_ENV] = "1"
    status = kis_token(cli_env, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["valid"] is True
    assert sim.issued == 1


def test_bad_storage_env_is_a_clear_cli_error(cli_env: dict[str, str]) -> None:
    cli_env["KOREA_INVESTMENT_API_SECRET"] = SECRET
    cli_env["KOREA_INVESTMENT_TOKEN_STORAGE"] = "sqlite"
    result = kis_token(cli_env, "status")
    assert result.returncode == 1
    assert "KOREA_INVESTMENT_TOKEN_STORAGE" in result.stderr and "file, redis" in result.stderr


def test_simulator_command_serves_kis_until_interrupted(cli_env: dict[str, str]) -> None:
    # Started with SIGINT ignored, as a script's background job is: Ctrl-C still stops it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kis_safe_token", "simulator", "--port", "0"],
        env=cli_env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
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
        proc.wait(30)
    assert proc.returncode == 0


@pytest.mark.parametrize("storage", ["file", "redis"])
def test_demo_command_reports_one_issuance(
    cli_env: dict[str, str], storage: str, redis_server
) -> None:
    result = kis_token(cli_env, "demo", "--workers", "3", "--storage", storage, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens issued by KIS: 1" in result.stdout
    assert "OK: one issuance shared by every worker" in result.stdout


# -- a keyring that prompts for its own password, in a process with no terminal ----------------

PROMPTING = "keyrings.alt.file.EncryptedKeyring"


def no_terminal(
    env: dict[str, str], args: list[str], stdin: str | None = "", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``args`` run as a service runs: a new session (no controlling terminal), piped stdin."""
    return subprocess.run(
        args,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def assert_says_how_out(stderr: str) -> None:
    assert "Traceback" not in stderr and "EOFError" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for needed in (PROMPTING, "PYTHON_KEYRING_BACKEND", "KOREA_INVESTMENT_API_SECRET"):
        assert needed in stderr, stderr
    assert SECRET not in stderr


def test_piped_secret_set_on_a_prompting_keyring_is_one_clear_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    cli_env["PYTHON_KEYRING_BACKEND"] = PROMPTING
    result = no_terminal(
        cli_env, [sys.executable, "-m", "kis_safe_token", "secret", "set", APP_KEY], SECRET + "\n"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert_says_how_out(result.stderr)
    assert SECRET not in result.stdout
    assert list(tmp_path.rglob("crypted_pass.cfg")) == []


def test_a_prompting_keyring_never_waits_on_a_stdin_left_open(cli_env: dict[str, str]) -> None:
    cli_env["PYTHON_KEYRING_BACKEND"] = PROMPTING
    code = (
        "import sys\n"
        "from kis_safe_token import KisTokenError, set_api_secret\n"
        "try:\n"
        f"    set_api_secret({APP_KEY!r}, {SECRET!r})\n"
        "except KisTokenError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
    )
    proc = subprocess.Popen(  # stdin: a pipe nobody writes to or closes, as a supervisor's
        [sys.executable, "-c", code],
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert_says_how_out(stderr)


def test_a_worker_on_a_prompting_keyring_uses_the_environment_secret(
    cli_env: dict[str, str], sim: KisSimulator
) -> None:
    backend = EncryptedKeyring()  # a keyring file holding this app key's secret, locked
    backend.file_path = str(Path(cli_env["XDG_DATA_HOME"]) / "python_keyring" / "crypted_pass.cfg")
    backend.keyring_key = "keyring-password"
    backend.set_password("kis_safe_token", APP_KEY, SECRET)
    cli_env["PYTHON_KEYRING_BACKEND"] = PROMPTING
    code = (
        "from kis_safe_token import KoreaInvestment\n"
        f"c = KoreaInvestment({APP_KEY!r}, None, '50000000-01')\n"
        "print(c.fetch_price('005930')['rt_cd'])\n"
    )
    failed = no_terminal(cli_env, [sys.executable, "-c", code], stdin=None)
    assert failed.returncode == 1
    assert_says_how_out(failed.stderr.strip().splitlines()[-1])
    cli_env["KOREA_INVESTMENT_API_SECRET"] = SECRET
    worked = no_terminal(cli_env, [sys.executable, "-c", code], stdin=None)
    assert worked.returncode == 0, worked.stderr
    assert worked.stdout.strip() == "0" and sim.issued == 1
    status = no_terminal(cli_env, [sys.executable, "-m", "kis_safe_token", "status"], stdin=None)
    assert status.returncode == 0, status.stderr


# -- commands that never issue, help, bad arguments, a store that is down -----------------------


def test_status_revoke_and_clear_never_issue_and_say_nothing_is_stored(
    cli_env: dict[str, str], sim: KisSimulator
) -> None:
    cli_env["KOREA_INVESTMENT_API_SECRET"] = SECRET
    for command, says in (
        ("status", "none stored"),
        ("revoke", "nothing to revoke"),
        ("clear", "nothing to clear"),
    ):
        result = kis_token(cli_env, command)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert says in result.stdout, (command, result.stdout)
    assert sim.counts["issue_requests"] == 0 and sim.counts["revoke_requests"] == 0
    assert kis_token(cli_env, "issue").returncode == 0
    assert "revoked" in kis_token(cli_env, "revoke").stdout
    assert sim.issued == 1 and sim.counts["revoke_requests"] == 1
    assert "nothing to revoke" in kis_token(cli_env, "revoke").stdout
    assert sim.issued == 1 and sim.counts["revoke_requests"] == 1


HELP_PATHS = [[], ["secret"], ["secret", "set"], ["secret", "delete"], ["status"], ["issue"]]
HELP_PATHS += [["revoke"], ["clear"], ["simulator"], ["demo"]]


def help_text(path: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from kis_safe_token.cli import main

    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """Each option of a help text (``  --name ...``) with its help, continuation lines joined."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if match:
            name = match.group(2)
            blocks[name] = line
        elif name and line.startswith("    "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


@pytest.mark.parametrize("path", HELP_PATHS, ids=[" ".join(p) or "kis-token" for p in HELP_PATHS])
def test_help_names_every_default_and_has_no_markup(
    path: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(path, capsys)
    for markup in ("``", ":class:", ":func:", ":mod:", ":data:", ":meth:"):
        assert markup not in text, (markup, text)
    options = {k: v for k, v in option_blocks(text).items() if k not in ("--help", "--version")}
    for name, block in options.items():
        assert "(default: " in block, (name, block)
    if path == ["simulator"]:
        assert "GET /_simulator/stats" in " ".join(text.split())
    if path in (["status"], ["revoke"], ["clear"]):
        assert os.environ.get("KOREA_INVESTMENT_API_KEY", "\0") not in text


def test_version_is_printed(cli_env: dict[str, str]) -> None:
    from kis_safe_token import __version__

    result = kis_token(cli_env, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kis-token {__version__}"


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_a_one_line_error(cli_env: dict[str, str], port: str) -> None:
    result = kis_token(cli_env, "simulator", "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--port" in result.stderr


def test_status_with_redis_down_names_the_token_store_in_one_line(
    cli_env: dict[str, str],
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli_env.update(
        KOREA_INVESTMENT_API_SECRET=SECRET,
        KOREA_INVESTMENT_TOKEN_STORAGE="redis",
        KOREA_INVESTMENT_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT="0.5",
    )
    for command in ("status", "revoke", "clear"):
        result = kis_token(cli_env, command)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "token store" in result.stderr and "GET" in result.stderr
        assert "PTTL" not in result.stderr and f"127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_simulator_prints_what_it_counted_when_stopped(
    cli_env: dict[str, str], stop: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kis_safe_token", "simulator", "--port", "0"],
        env=cli_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split("listening on ")[1].split()[0]
        body = {"grant_type": "client_credentials", "appkey": APP_KEY, "appsecret": SECRET}
        for _ in range(2):
            requests.post(f"{url}/oauth2/tokenP", timeout=5, json=body)
        stats = requests.get(f"{url}/_simulator/stats", timeout=5).json()
        assert (stats["issued"], stats["EGW00133"]) == (1, 1)
        assert list(stats["app_keys"]) == [APP_KEY[:4] + "…" + stats_digest(APP_KEY)]
    finally:
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "KIS simulator counted: 1 token(s) issued, 1 EGW00133 refusal(s)" in out
    assert APP_KEY not in out


def stats_digest(app_key: str) -> str:
    return hashlib.sha256(app_key.encode()).hexdigest()[:8]
