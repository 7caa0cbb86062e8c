"""``kis-token``: the secret, the shared token, the offline simulator and the demo (docs/cli.md)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from logging.handlers import BufferingHandler
from types import FrameType
from typing import Any, NoReturn

from . import __version__
from .client import BASE_URL_ENV, KoreaInvestment
from .errors import KisTokenError, SecretNotFoundError, TokenStorageError
from .keyring_secrets import (
    ALLOW_INSECURE_KEYRING_ENV,
    delete_api_secret,
    resolve_api_secret,
    set_api_secret,
)
from .kis import ISSUE_WINDOW_ENV, ISSUE_WINDOW_S, resolve_issue_window_s
from .oauth import revoke_token
from .ratelimit import (
    CALLS_PER_SECOND_ENV,
    KIS_CALLS_PER_SECOND_REAL,
    KIS_CALLS_PER_SECOND_VIRTUAL,
    resolve_calls_per_second,
)
from .shared import SharedToken
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

DESCRIPTION = """Store the api_secret in the OS keyring; inspect, issue, revoke and clear the token
the fleet shares; run the offline KIS simulator and the demo. status, revoke and clear never
issue a token: with none stored they say so and exit 0. Exit codes: 0 ok, 1 failure (one line
on stderr), 2 usage."""

SIMULATOR_HELP = """Run the offline KIS simulator in the foreground (Ctrl-C or SIGTERM stops it and
prints what it counted). GET /_simulator/stats answers JSON: tokens issued, EGW00133 refusals,
/uapi/ calls and EGW00201 refusals, in all and per app key (masked)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 0 to 65535 (0: any free port)")
    return port


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--storage", choices=STORAGE_TYPES, help=f"token store (default: ${STORAGE_ENV} or file)"
    )
    common.add_argument(
        "--redis-url",
        help=f"Redis URL (default: ${REDIS_URL_ENV} or redis://localhost:6379/0; passwords "
        "only from the environment: a command line shows in ps)",
    )
    common.add_argument(
        "--redis-mode",
        choices=REDIS_MODES,
        help=f"how Redis runs (default: ${REDIS_MODE_ENV} or standalone)",
    )
    common.add_argument(
        "--redis-sentinels",
        metavar="HOST:PORT,...",
        help=f"sentinel addresses (default: ${REDIS_SENTINELS_ENV})",
    )
    common.add_argument(
        "--redis-sentinel-service",
        metavar="NAME",
        help=f"the sentinels' master name (default: ${REDIS_SENTINEL_SERVICE_ENV} or mymaster)",
    )
    common.add_argument(
        "--redis-cluster-nodes",
        metavar="HOST:PORT,...",
        help=f"seed nodes (default: ${REDIS_CLUSTER_NODES_ENV})",
    )
    common.add_argument(
        "--base-url", help=f"KIS host (default: ${BASE_URL_ENV} or KIS's real-account host)"
    )
    insecure = _Parser(add_help=False)
    insecure.add_argument(
        "--allow-insecure-keyring",
        action="store_true",
        help="use a keyring backend that does not protect the secret, such as a plaintext file "
        f"(default: off, unless {ALLOW_INSECURE_KEYRING_ENV}=1)",
    )
    keyed = _Parser(add_help=False, parents=[common, insecure])
    keyed.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the app key (default: ${API_KEY_ENV})",
    )

    parser = _Parser(prog="kis-token", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    secret = sub.add_parser("secret", help="store or delete the api_secret in the OS keyring")
    secret_sub = secret.add_subparsers(dest="action", required=True)
    secret_set = secret_sub.add_parser(
        "set",
        parents=[insecure],
        help="store it (typed at a prompt, or one line on stdin when that is not a terminal)",
    )
    secret_set.add_argument("app_key")
    secret_sub.add_parser("delete", help="delete it").add_argument("app_key")

    status = sub.add_parser(
        "status", parents=[keyed], help="show the stored token (masked); never issues one"
    )
    status.add_argument("--json", action="store_true", help="machine-readable (default: text)")
    status.add_argument(
        "--fleet",
        action="store_true",
        help="every app key in the store: tokens, locks, leases, rate limits; --api-key may "
        "name several, comma-separated, to unseal theirs (default: off)",
    )
    issue = sub.add_parser("issue", parents=[keyed], help="get a token (single flight)")
    issue.add_argument(
        "--force", action="store_true", help="drop the stored token first (default: off)"
    )
    issue.add_argument(
        "--issue-window",
        type=float,
        metavar="SECONDS",
        help="how long to sit out KIS's EGW00133 before asking again "
        f"(default: ${ISSUE_WINDOW_ENV} or {ISSUE_WINDOW_S:g})",
    )
    sub.add_parser(
        "revoke",
        parents=[keyed],
        help="revoke the stored token at KIS and drop it; never issues one",
    )
    sub.add_parser("clear", parents=[keyed], help="drop the stored token; never issues one")

    sim = sub.add_parser(
        "simulator", help="run the offline KIS simulator", description=SIMULATOR_HELP
    )
    sim.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    sim.add_argument(
        "--port", type=_port, default=0, help="port to listen on (default: 0, any free port)"
    )
    sim.add_argument(
        "--issue-window",
        type=float,
        default=60.0,
        help="seconds between two token issues per app key (default: %(default)s, as KIS)",
    )
    sim.add_argument(
        "--calls-per-second",
        type=int,
        default=None,
        help="meter /uapi/ calls per app key like KIS (real 20, virtual 2) (default: unmetered)",
    )

    demo = sub.add_parser("demo", help="N processes share one token against the simulator")
    demo.add_argument(
        "--workers", type=int, default=8, help="processes, 1 to 256 (default: %(default)s)"
    )
    demo.add_argument(
        "--issue-window",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the simulator's one-issue window, which the workers sit out after EGW00133 "
        f"(they get it as ${ISSUE_WINDOW_ENV}) (default: %(default)s, as KIS)",
    )
    demo.add_argument(
        "--storage",
        choices=STORAGE_TYPES,
        default="file",
        help="token store; redis starts a private redis-server (default: %(default)s)",
    )
    return parser


def _storage(args: argparse.Namespace) -> TokenStorage:
    flags = {
        STORAGE_ENV: args.storage,
        REDIS_URL_ENV: args.redis_url,
        REDIS_MODE_ENV: args.redis_mode,
        REDIS_SENTINELS_ENV: args.redis_sentinels,
        REDIS_SENTINEL_SERVICE_ENV: args.redis_sentinel_service,
        REDIS_CLUSTER_NODES_ENV: args.redis_cluster_nodes,
    }
    return create_token_storage({**os.environ, **{k: v for k, v in flags.items() if v}})


def _app(args: argparse.Namespace) -> tuple[str, str, TokenStorage]:
    """The app key, its secret and the token store the flags and the environment name."""
    if not args.api_key:
        raise _Usage(f"--api-key is required (or set {API_KEY_ENV})")
    return str(args.api_key), _secret(args, args.api_key), _storage(args)


def _secret(args: argparse.Namespace, api_key: str) -> str:
    # Without the flag ``None``, not ``False``: the environment decides.
    return resolve_api_secret(api_key, allow_insecure_keyring=args.allow_insecure_keyring or None)


class _Usage(Exception):
    pass


def _cmd_secret(args: argparse.Namespace) -> int:
    if args.action == "delete":
        existed = delete_api_secret(args.app_key)
        print("secret deleted" if existed else "no secret was stored")
        return 0
    prompt = f"api_secret for {mask(args.app_key, 4)}: "
    secret = getpass.getpass(prompt) if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not secret:
        raise _Usage("no secret given (type it at the prompt, or pipe one line on stdin)")
    insecure = args.allow_insecure_keyring or None
    backend = set_api_secret(args.app_key, secret, allow_insecure_keyring=insecure)
    print(f"secret stored in the keyring for app key {mask(args.app_key, 4)} (backend: {backend})")
    return 0


def _describe(token: Token | None, storage: TokenStorage) -> dict[str, Any]:
    info: dict[str, Any] = {"storage": repr(storage), "token": None}
    if token is not None:
        left = token.expires_at - time.time()
        local = datetime.fromtimestamp(token.expires_at).astimezone()
        info.update(
            token=mask(token.access_token),
            expires_kst=token.expired_kst,
            expires_local=local.isoformat(" ", "seconds"),
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


@contextmanager
def _store_failure() -> Iterator[None]:
    """:class:`TokenStorageError` (the store's logged words) if the store failed in the block: the
    seed's methods answer ``None``/``False`` then, a "none stored" that would hide a Redis down."""
    handler = BufferingHandler(capacity=1_000)
    handler.setLevel(logging.ERROR)
    log = logging.getLogger("kis_safe_token")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
    if handler.buffer:
        message = " ".join(handler.buffer[0].getMessage().split())
        raise TokenStorageError(f"the token store failed: {message}")


def _load(storage: TokenStorage, api_key: str, secret: str) -> Token | None:
    """The valid stored token, or ``None``; never issues one."""
    with _store_failure():
        data = storage.load_token(api_key, secret)
    return Token.from_token_data(data) if data else None


def _cmd_status(args: argparse.Namespace) -> int:
    if args.fleet:
        return _fleet_status(args)
    api_key, secret, storage = _app(args)
    info = _describe(_load(storage, api_key, secret), storage)
    info["rate_limit"] = _rate_info(storage, api_key, secret)
    _print_info(info, args.json)
    return 0


def _fleet_status(args: argparse.Namespace) -> int:
    from .fleet import fleet_report, format_fleet

    credentials: dict[str, str | None] = {}
    for api_key in filter(None, (k.strip() for k in (args.api_key or "").split(","))):
        try:
            credentials[api_key] = _secret(args, api_key)
        except SecretNotFoundError:
            credentials[api_key] = None  # named, not unsealed
    try:
        report = fleet_report(_storage(args), credentials)
    except NotImplementedError as exc:
        raise _Usage(str(exc)) from None
    print(json.dumps(report, ensure_ascii=False) if args.json else format_fleet(report))
    return 0


def _rate_info(storage: TokenStorage, api_key: str, api_secret: str) -> dict[str, Any]:
    """The call-rate limit this app key's clients use here, where it is shared, and a slowdown."""
    real = resolve_calls_per_second(None, mock=False)
    virtual = resolve_calls_per_second(None, mock=True)
    info: dict[str, Any] = {
        "calls_per_second": real or 0,
        "virtual_calls_per_second": virtual or 0,
        "kis_limit": KIS_CALLS_PER_SECOND_REAL,
        "kis_limit_virtual": KIS_CALLS_PER_SECOND_VIRTUAL,
    }
    if real is None or virtual is None:
        return {**info, "text": f"off ({CALLS_PER_SECOND_ENV}=0)"}
    limiter = storage.rate_limiter(api_key, real, api_secret=api_secret)
    left = limiter.slowdown_left_s()
    info.update(shared_by=limiter.where, slowdown_left_s=round(left, 1))
    info["text"] = (
        f"{real:g} calls/s per app key, virtual {virtual:g}/s (KIS: "
        f"{KIS_CALLS_PER_SECOND_REAL:g}/s, {KIS_CALLS_PER_SECOND_VIRTUAL:g}/s), shared by "
        f"{limiter.where}"
        + (f"; slowed to half after EGW00201 for {left:.0f} s more" if left > 0 else "")
    )
    return info


@contextmanager
def _story_on_stderr() -> Iterator[None]:
    """The library's INFO lines (an issuance, an ``EGW00133`` sit-out, a takeover) on stderr while
    a command that may wait a minute runs, so the user sees why."""
    log = logging.getLogger("kis_safe_token")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO)
    level = log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _cmd_issue(args: argparse.Namespace) -> int:
    api_key, secret, storage = _app(args)
    given = args.issue_window  # None: the environment's or KIS's
    window = None if given is None else resolve_issue_window_s(given, name="--issue-window")
    with _story_on_stderr():
        client = KoreaInvestment(
            api_key, secret, token_storage=storage, base_url=args.base_url, rate_limit_wait_s=window
        )
        with client:
            token = client.issue_access_token(force=args.force)
    _print_info(_describe(token, client.token_storage), False)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    api_key, secret, storage = _app(args)
    token = _load(storage, api_key, secret)
    if token is None:  # a client would issue one here, only for us to revoke it
        print(f"no valid token stored in {storage!r}: nothing to revoke")
        return 0
    with SharedToken(api_key, secret, storage, base_url=args.base_url) as shared:
        revoke_token(
            shared.session,
            shared.base_url,
            api_key=api_key,
            api_secret=secret,
            access_token=token.access_token,
            timeout=shared.timeout,
        )
    with _store_failure():
        storage.invalidate_token(api_key, secret, token.access_token)
    print("token revoked and dropped from the store")
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    api_key, secret, storage = _app(args)
    token = _load(storage, api_key, secret)
    with _store_failure():
        deleted = storage.delete_token(api_key, secret)
    if not deleted:
        raise KisTokenError(f"could not clear the token in {storage!r} (see the log)")
    if token is None:
        print(f"no valid token stored in {storage!r}: nothing to clear")
    else:
        print(f"token cleared from {storage!r}")
    return 0


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the simulator as Ctrl-C does: with its counts


def _cmd_simulator(args: argparse.Namespace) -> int:
    from .testing import KisSimulator
    from .testing.simulator import STATS_PATH

    with KisSimulator(
        host=args.host,
        port=args.port,
        issue_window_s=args.issue_window,
        calls_per_second=args.calls_per_second,
    ) as sim:
        # Ctrl-C stops it even started in a script's background, which leaves SIGINT ignored (no
        # KeyboardInterrupt). Before the URL is printed: whoever reads it may signal at once.
        previous = signal.signal(signal.SIGTERM, _stop)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            print(f"KIS simulator listening on {sim.base_url}  (Ctrl-C to stop)", flush=True)
            print(f"  export {BASE_URL_ENV}={sim.base_url}", flush=True)
            print(f"  what it counted: GET {sim.base_url}{STATS_PATH}", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        print(sim.summary(), flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not 1 <= args.workers <= 256:
        raise _Usage("--workers must be between 1 and 256")
    window = resolve_issue_window_s(args.issue_window, name="--issue-window")  # has a default
    return run_demo(args.workers, args.storage, window)


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
