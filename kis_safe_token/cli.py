"""``kis-token``: store the secret, inspect, issue, revoke and clear the shared token; run the
offline simulator and the demo. Exit codes: 0 ok, 1 failure (one line on stderr), 2 usage."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .client import BASE_URL_ENV, KoreaInvestment
from .errors import KisTokenError
from .keyring_secrets import (
    ALLOW_INSECURE_KEYRING_ENV,
    delete_api_secret,
    resolve_api_secret,
    set_api_secret,
)
from .ratelimit import (
    CALLS_PER_SECOND_ENV,
    KIS_CALLS_PER_SECOND_REAL,
    KIS_CALLS_PER_SECOND_VIRTUAL,
    resolve_calls_per_second,
)
from .storage.base import TokenStorage
from .storage.factory import (
    REDIS_CLUSTER_NODES_ENV,
    REDIS_MODE_ENV,
    REDIS_MODES,
    REDIS_SENTINEL_SERVICE_ENV,
    REDIS_SENTINELS_ENV,
    REDIS_URL_ENV,
    STORAGE_ENV,
    STORAGE_TYPES,
    create_token_storage,
)
from .token import Token, mask

API_KEY_ENV = "KOREA_INVESTMENT_API_KEY"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage", choices=STORAGE_TYPES, help=f"default: ${STORAGE_ENV} or file")
    common.add_argument("--redis-url", help=f"default: ${REDIS_URL_ENV}")
    # Passwords only from the environment: a command line is visible to every user in `ps`.
    common.add_argument(
        "--redis-mode", choices=REDIS_MODES, help=f"default: ${REDIS_MODE_ENV} or standalone"
    )
    common.add_argument(
        "--redis-sentinels", metavar="HOST:PORT,...", help=f"default: ${REDIS_SENTINELS_ENV}"
    )
    common.add_argument(
        "--redis-sentinel-service",
        metavar="NAME",
        help=f"the sentinels' master name; default: ${REDIS_SENTINEL_SERVICE_ENV} or mymaster",
    )
    common.add_argument(
        "--redis-cluster-nodes",
        metavar="HOST:PORT,...",
        help=f"seed nodes; default: ${REDIS_CLUSTER_NODES_ENV}",
    )
    common.add_argument("--base-url", help=f"KIS host; default: ${BASE_URL_ENV} or the real host")
    insecure = argparse.ArgumentParser(add_help=False)
    insecure.add_argument(
        "--allow-insecure-keyring",
        action="store_true",
        help="use a keyring backend that does not protect the secret, such as a plaintext file "
        f"(also: {ALLOW_INSECURE_KEYRING_ENV}=1)",
    )
    keyed = argparse.ArgumentParser(add_help=False, parents=[common, insecure])
    keyed.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the app key (default: ${API_KEY_ENV})",
    )

    parser = argparse.ArgumentParser(prog="kis-token", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    secret = sub.add_parser("secret", help="store or delete the api_secret in the OS keyring")
    secret_sub = secret.add_subparsers(dest="action", required=True)
    secret_sub.add_parser("set", parents=[insecure]).add_argument("app_key")
    secret_sub.add_parser("delete").add_argument("app_key")

    status = sub.add_parser("status", parents=[keyed], help="show the stored token (masked)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    issue = sub.add_parser("issue", parents=[keyed], help="get a token (single flight)")
    issue.add_argument("--force", action="store_true", help="drop the stored token first")
    sub.add_parser("revoke", parents=[keyed], help="revoke the token at KIS and drop it")
    sub.add_parser("clear", parents=[keyed], help="drop the stored token")

    sim = sub.add_parser("simulator", help="run the offline KIS simulator in the foreground")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=0)
    sim.add_argument("--issue-window", type=float, default=60.0, help="seconds (KIS: 60)")
    sim.add_argument(
        "--calls-per-second",
        type=int,
        default=None,
        help="meter /uapi/ calls per app key like KIS (real 20, virtual 2); default: unmetered",
    )

    demo = sub.add_parser("demo", help="N processes share one token against the simulator")
    demo.add_argument("--workers", type=int, default=8)
    demo.add_argument("--storage", choices=STORAGE_TYPES, default="file")
    return parser


def _storage(args: argparse.Namespace) -> TokenStorage:
    env = dict(os.environ)
    if args.storage:
        env[STORAGE_ENV] = args.storage
    flags = (
        (args.redis_url, REDIS_URL_ENV),
        (args.redis_mode, REDIS_MODE_ENV),
        (args.redis_sentinels, REDIS_SENTINELS_ENV),
        (args.redis_sentinel_service, REDIS_SENTINEL_SERVICE_ENV),
        (args.redis_cluster_nodes, REDIS_CLUSTER_NODES_ENV),
    )
    for value, name in flags:
        if value:
            env[name] = value
    return create_token_storage(env)


def _api_key(args: argparse.Namespace) -> str:
    if not args.api_key:
        raise _Usage(f"--api-key is required (or set {API_KEY_ENV})")
    return str(args.api_key)


def _allow_insecure(args: argparse.Namespace) -> bool | None:
    """``True`` with the flag; else ``None``: the environment decides."""
    return True if args.allow_insecure_keyring else None


def _secret(args: argparse.Namespace, api_key: str) -> str:
    return resolve_api_secret(api_key, allow_insecure_keyring=_allow_insecure(args))


class _Usage(Exception):
    pass


def _cmd_secret(args: argparse.Namespace) -> int:
    if args.action == "delete":
        existed = delete_api_secret(args.app_key)
        print("secret deleted" if existed else "no secret was stored")
        return 0
    if sys.stdin.isatty():
        secret = getpass.getpass(f"api_secret for {mask(args.app_key, 4)}: ")
    else:
        secret = sys.stdin.readline().strip()
    if not secret:
        raise _Usage("no secret given (type it at the prompt, or pipe one line on stdin)")
    backend = set_api_secret(args.app_key, secret, allow_insecure_keyring=_allow_insecure(args))
    print(f"secret stored in the keyring for app key {mask(args.app_key, 4)} (backend: {backend})")
    return 0


def _describe(token: Token | None, storage: TokenStorage) -> dict[str, Any]:
    info: dict[str, Any] = {"storage": repr(storage), "token": None}
    if token is not None:
        left = token.expires_at - time.time()
        info.update(
            token=mask(token.access_token),
            expires_kst=token.expired_kst,
            expires_local=datetime.fromtimestamp(token.expires_at)
            .astimezone()
            .isoformat(" ", "seconds"),
            seconds_left=int(left),
            valid=left > 0,
        )
    return info


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return
    print(f"storage:  {info['storage']}")
    if "rate_limit" in info:
        print(f"rate:     {info['rate_limit']['text']}")
    if info["token"] is None:
        print("token:    none stored")
        return
    hours, rest = divmod(max(0, info["seconds_left"]), 3600)
    print(f"token:    {info['token']}")
    print(f"expires:  {info['expires_kst']} KST ({info['expires_local']} local)")
    print(f"left:     {hours}h {rest // 60:02d}m" + ("" if info["valid"] else " (expired)"))


def _cmd_status(args: argparse.Namespace) -> int:
    api_key = _api_key(args)
    secret = _secret(args, api_key)
    storage = _storage(args)
    data = storage.load_token(api_key, secret)
    token = Token.from_token_data(data) if data else None
    info = _describe(token, storage)
    info["rate_limit"] = _rate_info(storage, api_key)
    _print_info(info, args.json)
    return 0


def _rate_info(storage: TokenStorage, api_key: str) -> dict[str, Any]:
    """The call-rate limit clients of this app key use here (``$KOREA_INVESTMENT_CALLS_PER_SECOND``
    or the default), where it is shared, and a learned slowdown in force."""
    real = resolve_calls_per_second(None, mock=False)
    virtual = resolve_calls_per_second(None, mock=True)
    info: dict[str, Any] = {
        "calls_per_second": real or 0,
        "virtual_calls_per_second": virtual or 0,
        "kis_limit": KIS_CALLS_PER_SECOND_REAL,
        "kis_limit_virtual": KIS_CALLS_PER_SECOND_VIRTUAL,
    }
    if real is None or virtual is None:
        info["text"] = f"off ({CALLS_PER_SECOND_ENV}=0)"
        return info
    limiter = storage.rate_limiter(api_key, real)
    left = limiter.slowdown_left_s()
    info.update(shared_by=limiter.where, slowdown_left_s=round(left, 1))
    info["text"] = (
        f"{real:g} calls/s per app key, virtual {virtual:g}/s (KIS: "
        f"{KIS_CALLS_PER_SECOND_REAL:g}/s, {KIS_CALLS_PER_SECOND_VIRTUAL:g}/s), shared by "
        f"{limiter.where}"
        + (f"; slowed to half after EGW00201 for {left:.0f} s more" if left > 0 else "")
    )
    return info


def _client(args: argparse.Namespace) -> KoreaInvestment:
    api_key = _api_key(args)
    return KoreaInvestment(
        api_key, _secret(args, api_key), token_storage=_storage(args), base_url=args.base_url
    )


def _cmd_issue(args: argparse.Namespace) -> int:
    with _client(args) as client:
        token = client.issue_access_token(force=args.force)
        _print_info(_describe(token, client.token_storage), False)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.revoke_access_token()
    print("token revoked and dropped from the store")
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    api_key = _api_key(args)
    storage = _storage(args)
    if not storage.delete_token(api_key, _secret(args, api_key)):
        raise KisTokenError(f"could not clear the token in {storage!r} (see the log)")
    print(f"token cleared from {storage!r}")
    return 0


def _cmd_simulator(args: argparse.Namespace) -> int:
    from .testing import KisSimulator

    with KisSimulator(
        host=args.host,
        port=args.port,
        issue_window_s=args.issue_window,
        calls_per_second=args.calls_per_second,
    ) as sim:
        print(f"KIS simulator listening on {sim.base_url}  (Ctrl-C to stop)", flush=True)
        print(f"  export {BASE_URL_ENV}={sim.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not 1 <= args.workers <= 256:
        raise _Usage("--workers must be between 1 and 256")
    return run_demo(args.workers, args.storage)


COMMANDS = {
    "secret": _cmd_secret,
    "status": _cmd_status,
    "issue": _cmd_issue,
    "revoke": _cmd_revoke,
    "clear": _cmd_clear,
    "simulator": _cmd_simulator,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kis-token``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _Usage as exc:
        parser.error(str(exc))
    except (KisTokenError, ValueError, ImportError, OSError) as exc:
        print(f"kis-token: error: {exc}", file=sys.stderr)
        return 1
    return 1
