"""A TEST DOUBLE of a keyring backend, for the CLI tests that run ``kis-token`` as subprocesses.

Each subprocess is a fresh interpreter, so an in-memory keyring would forget the secret between
``kis-token secret set`` and ``kis-token status``; this one keeps it in a JSON file in the test's
temporary folder (``$KIS_TEST_KEYRING_FILE``). It protects nothing and must never be used
outside the tests: it claims ``priority = 1`` ("recommended") only so that kis_safe_token accepts
it the way it accepts a real OS keyring. Select it with
``PYTHON_KEYRING_BACKEND=keyring_double.JsonFileKeyring`` and ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError

FILE_ENV = "KIS_TEST_KEYRING_FILE"


class JsonFileKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.path = Path(os.environ[FILE_ENV])

    def _load(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return {}

    def _key(self, service: str, username: str) -> str:
        return f"{service}\x00{username}"

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(self._key(service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        store = self._load()
        store[self._key(service, username)] = password
        self.path.write_text(json.dumps(store))

    def delete_password(self, service: str, username: str) -> None:
        store = self._load()
        if store.pop(self._key(service, username), None) is None:
            raise PasswordDeleteError(username)
        self.path.write_text(json.dumps(store))
