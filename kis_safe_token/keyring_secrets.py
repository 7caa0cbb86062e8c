"""The api_secret in the OS keyring (service ``kis_safe_token``, user = the app key).

Only a backend that protects the secret is used, for setting and for getting, unless
``KIS_SAFE_TOKEN_ALLOW_INSECURE_KEYRING=1``; one that would prompt without a terminal is not
asked. The rules and why: ``docs/security.md``. keyring itself is imported on the first lookup.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .errors import InsecureKeyringError, SecretNotFoundError
from .token import header_safe, mask

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

__all__ = [
    "ALLOW_INSECURE_KEYRING_ENV",
    "ENCRYPTED_FILE_KEYRINGS",
    "KEYRING_SERVICE",
    "PROMPTING_KEYRINGS",
    "SECRET_ENV",
    "delete_api_secret",
    "get_api_secret",
    "resolve_api_secret",
    "set_api_secret",
]

KEYRING_SERVICE: Final = "kis_safe_token"
SECRET_ENV: Final = "KOREA_INVESTMENT_API_SECRET"
#: ``1`` (or ``true``/``yes``): accept a keyring backend that does not protect the secret.
ALLOW_INSECURE_KEYRING_ENV: Final = "KIS_SAFE_TOKEN_ALLOW_INSECURE_KEYRING"
#: Encrypted, password-protected file keyrings whose ``priority`` is below 1 yet which we accept.
ENCRYPTED_FILE_KEYRINGS: Final = frozenset(
    {
        "keyrings.alt.file.EncryptedKeyring",
        "keyrings.alt.Windows.EncryptedKeyring",
        "keyrings.cryptfile.file.EncryptedKeyring",
    }
)
#: File keyrings that prompt (``getpass``) for their password in each process, unless given it
#: (``backend.keyring_key = ...``; for keyrings.cryptfile also ``$KEYRING_CRYPTFILE_PASSWORD``).
PROMPTING_KEYRINGS: Final = frozenset(
    {
        "keyrings.alt.file.EncryptedKeyring",
        "keyrings.cryptfile.cryptfile.CryptFileKeyring",
        "keyrings.cryptfile.file.EncryptedKeyring",
    }
)
_CRYPTFILE_PASSWORD_ENV: Final = "KEYRING_CRYPTFILE_PASSWORD"
_STORE_NOTHING: Final = frozenset(
    {"keyring.backends.null.Keyring", "keyring.backends.fail.Keyring"}
)

_log = logging.getLogger(__name__)

_CHOOSE_BACKEND = (
    "pick a backend that protects the secret (PYTHON_KEYRING_BACKEND or keyring's config file): "
    "Secret Service (GNOME Keyring, KWallet; needs a D-Bus session) on Linux, "
    "the macOS Keychain, the Windows Credential Locker, or an encrypted file keyring with a "
    "password (`pip install keyrings.cryptfile`, "
    "PYTHON_KEYRING_BACKEND=keyrings.cryptfile.cryptfile.CryptFileKeyring; or keyrings.alt with "
    "pycryptodome, PYTHON_KEYRING_BACKEND=keyrings.alt.file.EncryptedKeyring); "
    f"in a container, set {SECRET_ENV} instead"
)
_OPT_IN = (
    f"; to use it anyway, set {ALLOW_INSECURE_KEYRING_ENV}=1 (kis-token: --allow-insecure-keyring)"
)


def _not_stored(api_key: str, what: str) -> SecretNotFoundError:
    return SecretNotFoundError(
        f"{what} for this app key: store it once with `kis-token secret set {api_key}` (it "
        "prompts for the secret), call kis_safe_token.set_api_secret(app_key, secret), pass "
        f"api_secret=..., or set the environment variable {SECRET_ENV}"
    )


def _check_app_key(api_key: str) -> None:
    if not isinstance(api_key, str) or not api_key.strip():
        raise ValueError("api_key must be a non-empty string")


def _name(backend: KeyringBackend) -> str:
    """``module.Class``: what ``PYTHON_KEYRING_BACKEND`` takes (never a path or a secret)."""
    return f"{type(backend).__module__}.{type(backend).__qualname__}"


def _class_names(backend: KeyringBackend) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(backend).__mro__}


def _why_unprotected(backend: KeyringBackend) -> str | None:
    """Why ``backend`` does not protect the secret, or ``None`` if it does."""
    names = _class_names(backend)
    if names & _STORE_NOTHING:
        return "it stores nothing"
    if any("plaintext" in name.lower() for name in names):
        return "it keeps it in a plaintext file"
    if names & ENCRYPTED_FILE_KEYRINGS:
        return None
    try:
        priority = float(backend.priority)
    except Exception:  # noqa: BLE001 - a priority that raises: not viable here
        return "it is not viable on this machine"
    if priority < 1:
        return f'its priority {priority:g} is below 1, keyring\'s "not recommended"'
    return None


def _allowed(allow_insecure_keyring: bool | None) -> bool:
    if allow_insecure_keyring is not None:
        return allow_insecure_keyring
    value = os.environ.get(ALLOW_INSECURE_KEYRING_ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    raise ValueError(f"{ALLOW_INSECURE_KEYRING_ENV} must be 1, true, yes, 0, false or no")


def _usable_backends(allow_insecure_keyring: bool | None) -> list[KeyringBackend]:
    """The backends to read and write, in keyring's order; :class:`InsecureKeyringError` naming
    the active backend (for the chainer, its members) if none protects the secret."""
    import keyring
    from keyring.backends.chainer import ChainerBackend

    active = keyring.get_keyring()
    members = list(active.backends) if isinstance(active, ChainerBackend) else [active]
    allow = _allowed(allow_insecure_keyring)
    usable, refused = [], []
    for backend in members:
        why = _why_unprotected(backend)
        if why is None or (allow and _name(backend) not in _STORE_NOTHING):
            usable.append(backend)
        else:
            refused.append((backend, why))
    if usable:
        return usable
    if all(_name(b) in _STORE_NOTHING for b, _ in refused):
        stores_nothing = ", ".join(_name(b) for b, _ in refused) or f"{_name(active)}, empty,"
        raise InsecureKeyringError(
            f"no usable keyring backend on this machine ({stores_nothing} stores nothing); "
            + _CHOOSE_BACKEND,
            backend=_name(active),
        )
    head = f"the keyring backend {_name(active)} does not protect the api_secret ({refused[0][1]})"
    if isinstance(active, ChainerBackend):
        details = "; ".join(f"{_name(b)}: {why}" for b, why in refused)
        head = f"keyring's chainer {_name(active)} holds no backend that protects the api_secret"
        head += f" ({details})"
    raise InsecureKeyringError(
        head + ", so kis_safe_token does not use it; " + _CHOOSE_BACKEND + _OPT_IN,
        backend=_name(active),
    )


def _no_backend(exc: BaseException) -> SecretNotFoundError:
    return SecretNotFoundError(
        f"no usable keyring backend on this machine ({type(exc).__name__}); " + _CHOOSE_BACKEND
    )


def _keyring_errors() -> tuple[type[BaseException], ...]:
    import keyring.errors

    return keyring.errors.NoKeyringError, keyring.errors.KeyringError, RuntimeError


def _would_prompt(backend: KeyringBackend, method: str) -> bool:
    """Whether ``backend.<method>`` may prompt: one of :data:`PROMPTING_KEYRINGS`, not given its
    password, running its own file code (not a subclass that stores elsewhere)."""
    names = _class_names(backend)
    if not names & PROMPTING_KEYRINGS or "keyring_key" in getattr(backend, "__dict__", {}):
        return False
    cryptfile = any(n.startswith("keyrings.cryptfile.") for n in names)
    if cryptfile and os.environ.get(_CRYPTFILE_PASSWORD_ENV):
        return False
    owner = next((c for c in type(backend).__mro__ if method in vars(c)), object)
    return owner.__module__.startswith(("keyrings.alt.", "keyrings.cryptfile."))


def _has_terminal() -> bool:
    """Whether ``getpass`` could ask someone (``/dev/tty``; on Windows a console on stdin), rather
    than read stdin: ``EOFError`` on a closed pipe, a wait without end on one left open."""
    if os.name != "posix":
        return sys.stdin is not None and sys.stdin.isatty()
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _prompt_refused(backend: KeyringBackend) -> SecretNotFoundError:
    return SecretNotFoundError(
        f"the keyring backend {_name(backend)} asks for its own password on a terminal, and "
        "this process has none to ask on (a pipe, a service, a worker); pick a backend that "
        "does not prompt (PYTHON_KEYRING_BACKEND, e.g. keyring.backends.SecretService.Keyring, or "
        f"keyrings.cryptfile with {_CRYPTFILE_PASSWORD_ENV}), or set {SECRET_ENV} for this "
        "process instead"
    )


def _each_backend(
    allow_insecure_keyring: bool | None, method: str, call: Callable[[KeyringBackend], str | None]
) -> tuple[str, KeyringBackend] | None:
    """The first answer of ``call(backend)`` over the usable backends, with its backend, or
    ``None``. Skipped: a backend lacking ``method`` (as keyring's chainer does) and one that would
    prompt where nobody can answer (its error raised if no other answers)."""
    refused: SecretNotFoundError | None = None
    try:
        for backend in _usable_backends(allow_insecure_keyring):
            if _would_prompt(backend, method) and not _has_terminal():
                refused = refused or _prompt_refused(backend)
                continue
            try:
                answer = call(backend)
            except NotImplementedError:
                continue
            except EOFError:  # a prompt that read an empty stdin all the same
                refused = refused or _prompt_refused(backend)
                continue
            if answer:
                return answer, backend
    except _keyring_errors() as exc:
        raise _no_backend(exc) from None
    if refused is not None:
        raise refused
    return None


def set_api_secret(api_key: str, secret: str, *, allow_insecure_keyring: bool | None = None) -> str:
    """Store ``secret`` for ``api_key`` in the OS keyring; returns the backend's ``module.Class``.

    ``allow_insecure_keyring``: accept a backend that does not protect the secret (``None``:
    ``$KIS_SAFE_TOKEN_ALLOW_INSECURE_KEYRING``). Raises :class:`InsecureKeyringError` for such a
    backend, :class:`SecretNotFoundError` (how to pick a backend) when there is none.
    """
    _check_app_key(api_key)
    if not isinstance(secret, str) or not secret.strip():
        raise ValueError("secret must be a non-empty string")

    def store(backend: KeyringBackend) -> str:
        backend.set_password(KEYRING_SERVICE, api_key, secret)
        return _name(backend)

    stored = _each_backend(allow_insecure_keyring, "set_password", store)
    if stored is None:
        raise _no_backend(NotImplementedError())
    _log.info("api_secret for app key %s stored in keyring backend %s", mask(api_key, 4), stored[0])
    return stored[0]


def _keyring_secret(api_key: str, allow_insecure_keyring: bool | None) -> str | None:
    found = _each_backend(
        allow_insecure_keyring,
        "get_password",
        lambda backend: backend.get_password(KEYRING_SERVICE, api_key),
    )
    if found is None:
        return None
    _log.debug(
        "api_secret for app key %s read from keyring backend %s", mask(api_key, 4), _name(found[1])
    )
    return found[0]


def get_api_secret(api_key: str, *, allow_insecure_keyring: bool | None = None) -> str:
    """The api_secret stored for ``api_key`` in the keyring (``allow_insecure_keyring`` and
    errors as for :func:`set_api_secret`; :class:`SecretNotFoundError` says how to store one)."""
    _check_app_key(api_key)
    secret = _keyring_secret(api_key, allow_insecure_keyring)
    if not secret:
        raise _not_stored(api_key, "no api_secret in the keyring")
    return secret


def delete_api_secret(api_key: str) -> bool:
    """Remove the stored secret, from any backend (removing exposes nothing); ``False`` if none."""
    _check_app_key(api_key)
    import keyring
    import keyring.errors

    try:
        keyring.delete_password(KEYRING_SERVICE, api_key)
    except keyring.errors.PasswordDeleteError:
        return False
    except _keyring_errors() as exc:
        raise _no_backend(exc) from None
    return True


def resolve_api_secret(
    api_key: str, api_secret: str | None = None, *, allow_insecure_keyring: bool | None = None
) -> str:
    """The explicit secret, else the keyring's, else ``$KOREA_INVESTMENT_API_SECRET``.

    A missing or refused keyring's error is raised only if the variable is unset too; a value of
    it that cannot go in an HTTP header is a ``ValueError``.
    """
    if api_secret:
        return api_secret
    _check_app_key(api_key)
    backend_error: SecretNotFoundError | None = None
    try:
        secret = _keyring_secret(api_key, allow_insecure_keyring)
    except SecretNotFoundError as exc:
        backend_error, secret = exc, None
    if secret:
        return secret
    from_env = os.environ.get(SECRET_ENV, "").strip()
    if from_env:
        if not header_safe(from_env):
            raise ValueError(
                f"{SECRET_ENV} must be printable ASCII without spaces or control characters "
                "(it is sent in an HTTP header)"
            )
        if backend_error is not None:
            _log.debug(
                "keyring not used (%s); api_secret from $%s",
                type(backend_error).__name__,
                SECRET_ENV,
            )
        return from_env
    if backend_error is not None:
        raise backend_error
    raise _not_stored(api_key, "no api_secret given and none in the keyring")
