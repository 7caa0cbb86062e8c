"""Clients for highly available Redis: a Sentinel-managed primary, or a Redis Cluster.

Built with short timeouts and none of redis-py's own retries, so each attempt of
:func:`.redis_retry.redis_retry` re-resolves the primary (Sentinel) or the slot owner (Cluster).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import ipaddress
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .redis_retry import require_redis

__all__ = [
    "DEFAULT_CLUSTER_PORT",
    "DEFAULT_SENTINEL_PORT",
    "MAX_NODES_CHARS",
    "async_builder_of",
    "check_host",
    "cluster_client",
    "parse_nodes",
    "sentinel_client",
]

DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0
#: The longest node list :func:`parse_nodes` reads (some 60 ``host:port`` entries).
MAX_NODES_CHARS = 2048
#: A DNS name: at most 253 characters, labels of 1-63 letters, digits, ``-`` or ``_``.
_MAX_HOST_CHARS = 253
_MAX_LABEL_CHARS = 63

#: The attribute a client built here carries: a builder of its ``redis.asyncio`` twin.
_ASYNC_BUILDER = "_kis_safe_token_async_builder"


def async_builder_of(client: Any) -> Callable[[], Any] | None:
    """The ``redis.asyncio`` twin builder of a client :func:`sentinel_client` or
    :func:`cluster_client` made (``None`` for any other client)."""
    builder = getattr(client, _ASYNC_BUILDER, None)
    return builder if callable(builder) else None


def check_host(host: str, source: str) -> str:
    """``host`` if it is an IP address or a DNS name; else a ``ValueError`` naming ``source``
    (never ``host``: a password with a raw ``/`` or ``@`` may have ended up in it)."""
    error = ValueError(f"{source} has a host that is neither an IP address nor a DNS name")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return host
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise error from None
    labels = ascii_name.rstrip(".").split(".")
    if len(ascii_name) > _MAX_HOST_CHARS or not all(
        0 < len(label) <= _MAX_LABEL_CHARS and label.replace("-", "").replace("_", "").isalnum()
        for label in labels
    ):
        raise error
    return host


def parse_nodes(value: str, source: str, default_port: int) -> list[tuple[str, int]]:
    """``"host[:port],host[:port]"`` (``[v6addr]:port`` too) as ``(host, port)`` pairs; else a
    ``ValueError`` naming ``source`` and the entry's position (never the entry: it may hold a
    password)."""
    expected = f"expected host[:port][,host[:port]…], e.g. 10.0.0.1:{default_port},10.0.0.2"
    if len(value or "") > MAX_NODES_CHARS:
        raise ValueError(f"{source} is longer than {MAX_NODES_CHARS} characters; {expected}")
    nodes: list[tuple[str, int]] = []
    for position, item in enumerate((value or "").split(","), start=1):
        item = item.strip()
        entry = f"{source} entry {position}"
        if not item:
            continue
        if "://" in item:
            raise ValueError(f"{entry} is a URL, not an address; {expected}")
        if item.startswith("["):  # [::1]:26379
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else rest
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host, port_text = item, ""
        if not host or "/" in host or "@" in host or any(c.isspace() for c in host):
            raise ValueError(f"{entry} is not a host name or address; {expected}")
        check_host(host, entry)
        if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise ValueError(f"{entry} has no valid port (1-65535); {expected}")
        nodes.append((host, int(port_text) if port_text else default_port))
    if not nodes:
        raise ValueError(f"{source} names no node; {expected}")
    return nodes


def _options(
    connect_timeout_s: float, socket_timeout_s: float, password: str | None, **tls: Any
) -> dict[str, Any]:
    """redis-py connection keywords: timeouts, the password if any, TLS options."""
    options = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": socket_timeout_s}
    return {**options, **({"password": password} if password else {}), **tls}


def _tls_options(tls: bool, tls_ca_file: str | None) -> dict[str, Any]:
    if not tls:
        if tls_ca_file:
            raise ValueError("tls_ca_file is given but TLS is off")
        return {}
    options: dict[str, Any] = {"ssl": True}
    if tls_ca_file:
        if not Path(tls_ca_file).is_file():
            raise ValueError(f"tls_ca_file {tls_ca_file[:200]!r} is not a readable file")
        options["ssl_ca_certs"] = tls_ca_file
    return options


def no_retries(asyncio: bool = False) -> Any:
    """A redis-py ``Retry`` (``asyncio``: redis.asyncio's) of no attempts: every attempt is
    ours, bounded by a deadline."""
    from redis.backoff import NoBackoff

    retry = importlib.import_module("redis.asyncio.retry" if asyncio else "redis.retry")
    return retry.Retry(NoBackoff(), 0)


def sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    password: str | None = None,
    sentinel_password: str | None = None,
    tls: bool = False,
    tls_ca_file: str | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
) -> Any:
    """The primary of ``service_name`` as the sentinels know it, re-asked on every reconnect.

    ``password`` is the data nodes' (``requirepass``), ``sentinel_password`` the sentinels' own;
    ``tls`` applies to both. ``ImportError`` naming the ``[redis]`` extra without redis-py."""
    require_redis()
    if not sentinels:
        raise ValueError("sentinels must name at least one sentinel")
    if not service_name or not isinstance(service_name, str):
        raise ValueError("service_name must be a non-empty string (the sentinels' master name)")
    timeouts, tls_options = (connect_timeout_s, socket_timeout_s), _tls_options(tls, tls_ca_file)
    build = partial(
        _sentinel_master,
        list(sentinels),
        service_name,
        _options(*timeouts, sentinel_password, **tls_options),
        _options(*timeouts, password, **tls_options),
    )
    client = build()
    setattr(client, _ASYNC_BUILDER, partial(build, asyncio=True))
    return client


def _sentinel_master(
    sentinels: list[tuple[str, int]],
    service_name: str,
    sentinel_kwargs: dict[str, Any],
    data_kwargs: dict[str, Any],
    asyncio: bool = False,
) -> Any:
    """``master_for(service_name)`` of a redis-py (``asyncio``: redis.asyncio) ``Sentinel``."""
    module = importlib.import_module("redis.asyncio.sentinel" if asyncio else "redis.sentinel")
    # No retries of redis-py's for the sentinels' connections either (they made one attempt of
    # ours take 4 s per dead sentinel): one of ours asks the sentinels again.
    retry = {"retry": no_retries(asyncio)}
    manager = module.Sentinel(
        sentinels, sentinel_kwargs={**sentinel_kwargs, **retry}, **data_kwargs
    )
    return manager.master_for(service_name, **retry)


def cluster_client(
    nodes: Sequence[tuple[str, int]],
    *,
    password: str | None = None,
    tls: bool = False,
    tls_ca_file: str | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
) -> Any:
    """A ``RedisCluster`` that learns the slot table from the first seed of ``nodes`` it reaches.

    Connects at once (``RedisClusterException`` or ``ConnectionError`` when no seed answers),
    with redis-py's cluster-level retries off. ``ImportError`` naming the ``[redis]`` extra
    without redis-py."""
    require_redis()
    if not nodes:
        raise ValueError("nodes must name at least one cluster node")
    options = _options(
        connect_timeout_s, socket_timeout_s, password, **_tls_options(tls, tls_ca_file)
    )
    client = _cluster(list(nodes), options)
    setattr(client, _ASYNC_BUILDER, partial(_cluster, list(nodes), options, asyncio=True))
    return client


def _cluster(nodes: list[tuple[str, int]], options: dict[str, Any], asyncio: bool = False) -> Any:
    """A redis-py (``asyncio``: redis.asyncio) ``RedisCluster`` with its cluster-level retries off:
    a ``retry`` of 0 (redis-py 6+) or ``cluster_error_retry_attempts=0`` (redis-py 5)."""
    import redis

    module = importlib.import_module("redis.asyncio.cluster" if asyncio else "redis.cluster")
    parameters = inspect.signature(module.RedisCluster.__init__).parameters
    retries: dict[str, Any] = {}
    if "retry" in parameters:
        retries["retry"] = no_retries(asyncio)
    if int(redis.__version__.split(".")[0]) < 6 or "retry" not in parameters:
        retries["cluster_error_retry_attempts"] = 0  # pragma: no cover - redis-py 5
    seeds = [module.ClusterNode(host, port) for host, port in nodes]
    return module.RedisCluster(startup_nodes=seeds, **options, **retries)
