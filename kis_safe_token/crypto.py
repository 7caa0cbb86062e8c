"""Keys, fingerprints and sealing of cache entries.

The Fernet key is HKDF-SHA256 of the api_secret, salt and info binding the app key and a format
version; a credential fingerprint (HMAC-SHA256 keyed by the secret over the app key) tells whose
an entry is without storing the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TypeVar

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .failure import IssueFailure
from .token import Token

__all__ = ["Sealer", "channel_key", "derive_key", "fingerprint", "key_id", "utf8"]

FORMAT_VERSION = b"kis_safe_token/v1"

_Record = TypeVar("_Record", Token, IssueFailure)


def utf8(value: str, name: str) -> bytes:
    """``value`` as UTF-8; else a ``ValueError`` naming ``name`` (never echoing the value)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{name} contains characters UTF-8 cannot encode") from None


def key_id(api_key: str) -> str:
    """Short public name of an app key for file entries and Redis keys (not the key itself)."""
    return hashlib.sha256(utf8(api_key, "api_key")).hexdigest()[:12]


@lru_cache(maxsize=64)
def derive_key(api_key: str, api_secret: str) -> bytes:
    """The url-safe base64 Fernet key for these credentials (HKDF-SHA256)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=FORMAT_VERSION + b"|salt|" + api_key.encode(),
        info=FORMAT_VERSION + b"|fernet|" + api_key.encode(),
    )
    return base64.urlsafe_b64encode(hkdf.derive(api_secret.encode()))


@lru_cache(maxsize=64)
def state_key(api_key: str, api_secret: str) -> bytes:
    """The key (HMAC-SHA256 of the secret) that authenticates the fleet's shared state in Redis
    (the rate limiter's keys): a value written without the secret is ignored and replaced."""
    return hmac.new(
        api_secret.encode(), FORMAT_VERSION + b"|state|" + api_key.encode(), "sha256"
    ).digest()


def channel_key(api_key: str, api_secret: str) -> bytes:
    """The Fernet key (HMAC-SHA256 of the secret, url-safe base64) of what the realtime leader
    publishes in Redis that KIS itself sends encrypted (execution notices)."""
    mac = hmac.new(api_secret.encode(), FORMAT_VERSION + b"|realtime|" + api_key.encode(), "sha256")
    return base64.urlsafe_b64encode(mac.digest())


@lru_cache(maxsize=64)
def fingerprint(api_key: str, api_secret: str) -> str:
    """HMAC-SHA256 keyed by the secret over the app key: whose entry this is, secret not stored."""
    mac = hmac.new(api_secret.encode(), FORMAT_VERSION + b"|fp|" + api_key.encode(), "sha256")
    return mac.hexdigest()


class Sealer:
    """Seals tokens for one set of credentials; opens them or says they are not ours.

    ``keys``: explicit Fernet keys (the first encrypts; all decrypt, for rotation); the key
    derived from the secret always decrypts too, so older entries stay readable.
    """

    __slots__ = ("_fernet", "_fingerprint")

    def __init__(self, api_key: str, api_secret: str, keys: Sequence[bytes | str] = ()) -> None:
        utf8(api_key, "api_key")
        utf8(api_secret, "api_secret")
        fernets = [Fernet(k) for k in keys]
        fernets.append(Fernet(derive_key(api_key, api_secret)))
        self._fernet = MultiFernet(fernets)
        self._fingerprint = fingerprint(api_key, api_secret)

    def __repr__(self) -> str:
        return "Sealer(<keys hidden>)"

    def seal(self, token: Token) -> bytes:
        return self._fernet.encrypt(token.to_payload(self._fingerprint))

    def open(self, sealed: bytes | str | None) -> Token | None:
        """The token in ``sealed``, or ``None`` if it is unreadable or not these credentials'."""
        return self._open(sealed, Token.from_payload)

    def seal_failure(self, failure: IssueFailure) -> bytes:
        return self._fernet.encrypt(failure.to_payload(self._fingerprint))

    def open_failure(self, sealed: bytes | str | None) -> IssueFailure | None:
        """The failure record in ``sealed``, or ``None`` (unreadable, or not ours)."""
        return self._open(sealed, IssueFailure.from_payload)

    def _open(
        self, sealed: bytes | str | None, parse: Callable[[bytes], tuple[_Record, str]]
    ) -> _Record | None:
        if not sealed:
            return None
        try:
            record, fp = parse(self._fernet.decrypt(sealed))
        except (InvalidToken, ValueError, TypeError):
            return None
        if not hmac.compare_digest(fp, self._fingerprint):
            return None
        return record
