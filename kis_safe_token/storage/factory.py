"""``create_token_storage()``: the backend named by the seed's environment variables.

Sentinel and Cluster are ``KOREA_INVESTMENT_REDIS_MODE``, not storage types or URL schemes (why:
``docs/storages.md``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._checks import env_seconds
from .base import TokenStorage
from .file import FileTokenStorage
from .lease import MAX_LEASE_TTL_S
from .redis import DEFAULT_REDIS_URL, RETRY_TIMEOUT_S, LockedRedisTokenStorage, validate_redis_url
from .redis_ha import (
    DEFAULT_CLUSTER_PORT,
    DEFAULT_SENTINEL_PORT,
    check_host,
    cluster_client,
    parse_nodes,
    sentinel_client,
)

__all__ = [
    "BASE_URL_ENV",
    "FILE_ENV",
    "HA_RETRY_TIMEOUT_S",
    "REDIS_CLUSTER_NODES_ENV",
    "REDIS_MODES",
    "REDIS_MODE_ENV",
    "REDIS_PASSWORD_ENV",
    "REDIS_RETRY_TIMEOUT_ENV",
    "REDIS_SENTINELS_ENV",
    "REDIS_SENTINEL_PASSWORD_ENV",
    "REDIS_SENTINEL_SERVICE_ENV",
    "REDIS_TLS_CA_FILE_ENV",
    "REDIS_TLS_ENV",
    "REDIS_URL_ENV",
    "SEED_LEASE_ENV",
    "SEED_LEASE_TTL_ENV",
    "STORAGE_ENV",
    "STORAGE_TYPES",
    "base_url_from_environment",
    "check_base_url",
    "create_token_storage",
    "redis_client_from_env",
    "token_file_from_env",
]

STORAGE_ENV = "KOREA_INVESTMENT_TOKEN_STORAGE"
FILE_ENV = "KOREA_INVESTMENT_TOKEN_FILE"
REDIS_URL_ENV = "KOREA_INVESTMENT_REDIS_URL"
REDIS_PASSWORD_ENV = "KOREA_INVESTMENT_REDIS_PASSWORD"
REDIS_MODE_ENV = "KOREA_INVESTMENT_REDIS_MODE"
REDIS_SENTINELS_ENV = "KOREA_INVESTMENT_REDIS_SENTINELS"
REDIS_SENTINEL_SERVICE_ENV = "KOREA_INVESTMENT_REDIS_SENTINEL_SERVICE"
REDIS_SENTINEL_PASSWORD_ENV = "KOREA_INVESTMENT_REDIS_SENTINEL_PASSWORD"
REDIS_CLUSTER_NODES_ENV = "KOREA_INVESTMENT_REDIS_CLUSTER_NODES"
REDIS_TLS_ENV = "KOREA_INVESTMENT_REDIS_TLS"
REDIS_TLS_CA_FILE_ENV = "KOREA_INVESTMENT_REDIS_TLS_CA_FILE"
REDIS_RETRY_TIMEOUT_ENV = "KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT"
BASE_URL_ENV = "KOREA_INVESTMENT_BASE_URL"
STORAGE_TYPES = ("file", "redis")
SEED_LEASE_ENV = "KOREA_INVESTMENT_SEED_LEASE"
SEED_LEASE_TTL_ENV = "KOREA_INVESTMENT_SEED_LEASE_TTL"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")
REDIS_MODES = ("standalone", "sentinel", "cluster")
DEFAULT_SENTINEL_SERVICE = "mymaster"
#: The default ``retry_timeout_s`` of a Sentinel or Cluster deployment: longer than a failover
#: with the servers' own defaults (Sentinel ``down-after-milliseconds`` 30 s plus an election;
#: Cluster ``cluster-node-timeout`` 15 s, twice).
HA_RETRY_TIMEOUT_S = 40.0


def _flag(env: Mapping[str, str], name: str) -> bool:
    """A switch variable (unset or empty: off); ``ValueError`` naming it and the allowed values."""
    value = (env.get(name) or "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"{name}={value[:20]!r} is not a flag; allowed values: true, false "
        f"(also {', '.join(_ON[:1] + _ON[2:])} / {', '.join(_OFF[1:2] + _OFF[3:])})"
    )


def redis_client_from_env(environ: Mapping[str, str] | None = None) -> tuple[Any, float]:
    """The Redis client a Sentinel or Cluster environment describes, with its retry budget
    (``None`` for ``standalone``: the storage builds its client from the URL). ``ValueError``
    naming the variable on bad input."""
    env = os.environ if environ is None else environ
    mode = (env.get(REDIS_MODE_ENV) or "standalone").strip().lower()
    if mode not in REDIS_MODES:
        raise ValueError(
            f"{REDIS_MODE_ENV}={mode[:40]!r} is not a Redis mode; allowed values: "
            + ", ".join(REDIS_MODES)
        )
    tls = _flag(env, REDIS_TLS_ENV)
    ca_file = (env.get(REDIS_TLS_CA_FILE_ENV) or "").strip() or None
    if mode == "standalone":
        for name in (REDIS_SENTINELS_ENV, REDIS_CLUSTER_NODES_ENV, REDIS_TLS_CA_FILE_ENV):
            if (env.get(name) or "").strip():
                raise ValueError(f"{name} needs {REDIS_MODE_ENV}=sentinel or cluster")
        if tls:
            raise ValueError(
                f"{REDIS_TLS_ENV} is for {REDIS_MODE_ENV}=sentinel or cluster; "
                f"a standalone server takes a rediss:// URL in {REDIS_URL_ENV}"
            )
        return None, env_seconds(env, REDIS_RETRY_TIMEOUT_ENV, RETRY_TIMEOUT_S)
    if (env.get(REDIS_URL_ENV) or "").strip():
        raise ValueError(
            f"{REDIS_URL_ENV} is for {REDIS_MODE_ENV}=standalone; {mode} takes "
            + (REDIS_SENTINELS_ENV if mode == "sentinel" else REDIS_CLUSTER_NODES_ENV)
        )
    if ca_file and not tls:
        raise ValueError(f"{REDIS_TLS_CA_FILE_ENV} needs {REDIS_TLS_ENV}=true")
    if ca_file and not os.path.isfile(ca_file):
        raise ValueError(f"{REDIS_TLS_CA_FILE_ENV} names no readable file")
    retry_timeout = env_seconds(env, REDIS_RETRY_TIMEOUT_ENV, HA_RETRY_TIMEOUT_S)
    password = env.get(REDIS_PASSWORD_ENV) or None
    if mode == "sentinel":
        if (env.get(REDIS_CLUSTER_NODES_ENV) or "").strip():
            raise ValueError(f"{REDIS_CLUSTER_NODES_ENV} needs {REDIS_MODE_ENV}=cluster")
        sentinels = parse_nodes(
            env.get(REDIS_SENTINELS_ENV) or "", REDIS_SENTINELS_ENV, DEFAULT_SENTINEL_PORT
        )
        service = (env.get(REDIS_SENTINEL_SERVICE_ENV) or DEFAULT_SENTINEL_SERVICE).strip()
        if not service or any(c.isspace() for c in service):
            raise ValueError(f"{REDIS_SENTINEL_SERVICE_ENV} must be the sentinels' master name")
        client = sentinel_client(
            sentinels,
            service,
            password=password,
            sentinel_password=env.get(REDIS_SENTINEL_PASSWORD_ENV) or None,
            tls=tls,
            tls_ca_file=ca_file,
        )
        return client, retry_timeout
    for name in (REDIS_SENTINELS_ENV, REDIS_SENTINEL_PASSWORD_ENV):
        if (env.get(name) or "").strip():
            raise ValueError(f"{name} needs {REDIS_MODE_ENV}=sentinel")
    nodes = parse_nodes(
        env.get(REDIS_CLUSTER_NODES_ENV) or "", REDIS_CLUSTER_NODES_ENV, DEFAULT_CLUSTER_PORT
    )
    try:
        client = cluster_client(nodes, password=password, tls=tls, tls_ca_file=ca_file)
    except Exception as exc:  # noqa: BLE001 - redis-py's errors, re-raised with the variable
        from ..errors import TokenStorageError

        raise TokenStorageError(
            f"no Redis Cluster node of {REDIS_CLUSTER_NODES_ENV} answered: {type(exc).__name__}"
        ) from exc
    return client, retry_timeout


def create_token_storage(environ: Mapping[str, str] | None = None) -> TokenStorage:
    """The storage the environment (default ``os.environ``) asks for: see
    ``docs/configuration.md`` for the variables (``KOREA_INVESTMENT_TOKEN_STORAGE``: ``file``,
    the default, or ``redis``). A bad value raises ``ValueError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    lease: dict[str, Any] = {"seed_lease": _flag(env, SEED_LEASE_ENV)}
    if (env.get(SEED_LEASE_TTL_ENV) or "").strip():
        lease["lease_ttl"] = env_seconds(env, SEED_LEASE_TTL_ENV, 0.0, high=MAX_LEASE_TTL_S)
    kind = (env.get(STORAGE_ENV) or "file").strip().lower()
    if kind == "file":
        return FileTokenStorage(token_file_from_env(env), **lease)
    if kind == "redis":
        client, retry_timeout = redis_client_from_env(env)
        if client is not None:
            return LockedRedisTokenStorage(client=client, retry_timeout_s=retry_timeout, **lease)
        url = validate_redis_url(env.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL, REDIS_URL_ENV)
        password = env.get(REDIS_PASSWORD_ENV) or None
        try:
            return LockedRedisTokenStorage(
                url, password=password, retry_timeout_s=retry_timeout, **lease
            )
        except (ValueError, TypeError) as exc:
            # redis-py's own message may quote the URL, password included: name the variable.
            raise ValueError(
                f"{REDIS_URL_ENV} is not a usable Redis URL ({type(exc).__name__}); "
                "expected redis://[user:password@]host[:port][/db], rediss://… or unix:///path"
            ) from None
    raise ValueError(
        f"{STORAGE_ENV}={kind[:40]!r} is not a storage type; allowed values: "
        + ", ".join(STORAGE_TYPES)
    )


def token_file_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """``KOREA_INVESTMENT_TOKEN_FILE`` as an absolute path (``~`` expanded), ``None`` if unset;
    ``ValueError`` for a relative path, an unknown ``~user`` or a NUL character."""
    env = os.environ if environ is None else environ
    raw = (env.get(FILE_ENV) or "").strip()
    if not raw:
        return None
    if "\0" in raw:
        raise ValueError(f"{FILE_ENV} holds a NUL character; give the token file's absolute path")
    expanded = os.path.expanduser(raw)
    if expanded.startswith("~"):
        raise ValueError(
            f"{FILE_ENV} starts with '~' but names no home folder this process knows (an "
            "unknown ~user, or no $HOME); give the token file's absolute path"
        )
    if not os.path.isabs(expanded):
        raise ValueError(
            f"{FILE_ENV} must be an absolute path: a relative one names a different file in "
            "each working folder, so processes started in different folders would not share "
            "one token"
        )
    return Path(expanded)


# -- the KIS host ------------------------------------------------------------------------------
def check_base_url(value: str, source: str = "base_url") -> str:
    """``value`` without a trailing ``/`` if it is ``http(s)://host[:port]``; else a
    ``ValueError`` naming ``source`` (quoting nothing but a scheme: it may hold a password)."""
    expected = "expected http(s)://host[:port], e.g. https://openapi.koreainvestment.com:9443"
    text = value.strip() if isinstance(value, str) else ""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{source} is not a usable URL; {expected}") from None
    written = parts.scheme and text.lower().startswith(f"{parts.scheme}://")
    if parts.scheme not in ("http", "https") or not written:
        shown = f" {parts.scheme[:20]!r}" if written else ""
        raise ValueError(f"{source} has an unsupported scheme{shown}; {expected}")
    if "@" in text:
        raise ValueError(f"{source} holds user info ('@'); {expected}")
    if not parts.hostname:
        raise ValueError(f"{source} names no host; {expected}")
    check_host(parts.hostname, source)
    if port == 0:
        raise ValueError(f"{source} has port 0; {expected}")
    if parts.path.strip("/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"{source} has a path, query or fragment; {expected}")
    return text.rstrip("/")


def base_url_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """``KOREA_INVESTMENT_BASE_URL`` checked by :func:`check_base_url` (``ValueError`` naming
    the variable), or ``None`` if it is unset or empty."""
    env = os.environ if environ is None else environ
    raw = (env.get(BASE_URL_ENV) or "").strip()
    return check_base_url(raw, BASE_URL_ENV) if raw else None
