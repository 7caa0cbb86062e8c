"""Every Python example in the README and the manual runs as written, against the simulator.

Each ```python block is run in a fresh interpreter, in a temporary folder that is also its home
(nothing is written to the real cache), with the placeholders of docs/index.md filled in:
``api_key``/``api_secret``/``acc_no`` defined, ``KOREA_INVESTMENT_BASE_URL`` set to a simulator
started for it, ``redis://localhost:6379/0`` replaced by a redis-server of the suite, a test
keyring, and for a realtime example ``KOREA_INVESTMENT_WS_URL`` set to the simulator's
websocket. A block that includes a file (``--8<-- "path"``) runs with that file's text; a block
that defines a contract test class is run by pytest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kis_safe_token.testing import KisSimulator

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)
PLACEHOLDER_REDIS = "redis://localhost:6379/0"
TIMEOUT_S = 120


def examples() -> Iterator[pytest.param]:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for n, match in enumerate(BLOCK.finditer(text), 1):
            line = text.count("\n", 0, match.start()) + 1
            code = SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), match.group(1))
            yield pytest.param(code, id=f"{page.relative_to(ROOT)}:{line}#{n}")


def test_every_page_has_its_examples_found() -> None:
    found = {p.id.split(":")[0] for p in examples()}  # type: ignore[attr-defined]
    for page in ("README.md", "docs/getting-started.md", "docs/integrations.md"):
        assert page in found


@pytest.fixture
def doc_sim() -> Iterator[KisSimulator]:
    with KisSimulator(issue_latency_s=0.0) as sim:  # any app key, as KIS's real host
        yield sim


@pytest.fixture
def doc_ws_url(doc_sim: KisSimulator) -> Iterator[str]:
    """KIS's realtime websocket for the examples, 20 frames a second to each registered pair."""
    from kis_safe_token.testing.realtime_sim import RealtimeSimulator

    with RealtimeSimulator(doc_sim, rate=20) as rts:
        yield rts.ws_url


@pytest.mark.parametrize("code", list(examples()))
def test_example_runs(
    code: str, doc_sim: KisSimulator, tmp_path: Path, redis_url: str, request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # Its own app key (its own Redis keys), as long as KIS's: python-kis checks the lengths.
    api_key, api_secret = "PSdo" + uuid.uuid4().hex, "doc-secret-" + "x" * 169
    prelude = f"api_key, api_secret, acc_no = {api_key!r}, {api_secret!r}, '12345678-01'\n"
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "KOREA_INVESTMENT_BASE_URL": doc_sim.base_url,
        "PYTHON_KEYRING_BACKEND": "keyring_double.JsonFileKeyring",
        "KIS_TEST_KEYRING_FILE": str(tmp_path / "keyring.json"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    for name in [
        n for n in env if n.startswith("KOREA_INVESTMENT_") and n != "KOREA_INVESTMENT_BASE_URL"
    ]:
        del env[name]
    if "KisRealtime" in code:
        env["KOREA_INVESTMENT_WS_URL"] = request.getfixturevalue("doc_ws_url")
    code = code.replace(PLACEHOLDER_REDIS, redis_url)
    if "Contract):" in code and "class Test" in code:
        test_file = home / "test_example.py"
        test_file.write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)]
    else:
        future = "from __future__ import annotations\n"
        if future in code:  # it must stay the first statement
            code = future + prelude + code.replace(future, "", 1)
        else:
            code = prelude + code
        command = [sys.executable, "-c", code]
    done = subprocess.run(
        command, cwd=home, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
