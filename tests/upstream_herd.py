"""A herd of forked processes driving a third-party KIS client (korea-investment-stock, mojito2,
python-kis, kis-trader) against the simulator, for the integration tests and the benchmark:
``run_upstream_herd("upstream_clients.mojito_scenario:integrated", 16, spec, sim.base_url,
folder=tmp_path, sim=sim, between_rounds=lambda _: sim.expire_tokens())``.

Test machinery, not part of the installed package (imported as ``upstream_herd``: pytest puts
``tests/`` on ``sys.path``, the benchmark puts it there itself).

How a herd runs, and why:

- The parent imports the scenario module (``"module:function"``), so the heavy third-party import
  (pandas for two of the four clients, ~1.5 s) is paid once; children are ``fork``-ed from it and
  start with everything imported. Import jitter would otherwise serialize the herd and hide the
  race.
- Each child gets its own ``HOME`` (and ``XDG_CACHE_HOME``/``XDG_CONFIG_HOME`` under it) and its
  own working directory, under the ``folder`` the caller gives, so the clients' own token caches
  (``~/.cache/kis/token.key``, ``./token.dat``, ``~/.pykis/cache``,
  ``~/.cache/kis-trader/tokens``) land where :meth:`UpstreamHerdResult.cache_files` finds them;
  ``KOREA_INVESTMENT_*`` variables of the caller's shell are dropped.
- The storage of a spec (``herd.build_storage``) is built and warmed in each child before the
  barrier (key derivation and connection set-up are not what a herd measures).
- Children wait on a barrier (the parent is a party). Round 0: the scenario builds the client
  and fetches a price through the client's own request path. The parent then runs
  ``between_rounds(round_no)`` (say, ``sim.expire_tokens()``) and releases round 1, in which
  every process calls the client's own request path again.
- Every child reports, per round, ok or the error (exception type and message) and the id of the
  token it used (``herd.token_id``: a hash, never the token). A process whose client could not
  be built in round 0 reports later rounds as skipped.

Credentials: every scenario uses :data:`UPSTREAM_APP_KEY` (36 characters) and
:data:`UPSTREAM_SECRET` (180), because python-kis refuses keys of any other length; the simulator
from :func:`upstream_simulator` accepts that pair.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from herd import build_storage, reap, token_id

from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator

__all__ = [
    "UPSTREAM_ACCOUNT",
    "UPSTREAM_APP_KEY",
    "UPSTREAM_CLIENTS",
    "UPSTREAM_SECRET",
    "ScenarioClient",
    "ScenarioContext",
    "UpstreamHerdResult",
    "require_client",
    "require_upstream",
    "with_host",
    "run_shipped_herd",
    "run_upstream_herd",
    "upstream_simulator",
]

UPSTREAM_APP_KEY = "PSupstreamHerdKey".ljust(36, "0")
UPSTREAM_SECRET = "upstream-herd-secret-".ljust(180, "u")
UPSTREAM_ACCOUNT = "50000000-01"
SYMBOL = "005930"

#: The clients with an integration: name (of ``upstream_clients.<name>_scenario`` and of
#: ``kis_safe_token.integrations.<name>``) -> (the module to import, the Python it needs).
UPSTREAM_CLIENTS: dict[str, tuple[str, tuple[int, int]]] = {
    "korea_investment_stock": ("korea_investment_stock", (3, 11)),
    "mojito": ("mojito", (3, 10)),
    "pykis": ("pykis", (3, 10)),
    "kis_trader": ("kis_trader", (3, 11)),
}


def require_client(module: str, min_python: tuple[int, int] = (3, 10)) -> ModuleType:
    """Import a third-party client for a test module: skipped if it is missing, except in CI
    (``CI=true``), where ``[dev]`` installs all four and a missing one must fail; skipped
    everywhere on a Python older than ``min_python`` (the extra's marker leaves it out there)."""
    import pytest

    if sys.version_info < min_python:
        pytest.skip(
            f"{module} needs Python >= {min_python[0]}.{min_python[1]}", allow_module_level=True
        )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"{module} is not installed ({exc})", allow_module_level=True)


def require_upstream(name: str) -> ModuleType:
    """:func:`require_client` for the client of :data:`UPSTREAM_CLIENTS` named ``name``, from
    inside a test (imported in the parent, before any fork)."""
    module, min_python = UPSTREAM_CLIENTS[name]
    return require_client(module, min_python=min_python)


def with_host(cls: type[Any], base_url: str) -> type[Any]:
    """``cls`` with its host pinned to ``base_url`` (test only). korea-investment-stock assigns
    its hard-coded host in ``__init__`` (0.19.0, ``korea_investment_stock.py:127``) and builds
    its TokenManager from it (``:145``): a class-level property whose setter ignores that
    assignment outranks it."""

    class Pinned(cls):  # type: ignore[misc, valid-type]
        @property
        def base_url(self) -> str:
            return base_url

        @base_url.setter
        def base_url(self, value: str) -> None:
            pass

    Pinned.__name__ = Pinned.__qualname__ = cls.__name__
    return Pinned


def run_shipped_herd(
    scenario: str, folder: Path, *, rounds: int = 2, expire_between: bool = True
) -> UpstreamHerdResult:
    """The baseline of an integration's herd test: 4 processes of the client as shipped
    (``<scenario module>:shipped``: its own token cache, no storage of ours) against a fresh
    :func:`upstream_simulator`, for ``rounds`` rounds, every token expired server-side between
    them if ``expire_between``."""
    with upstream_simulator() as sim:
        return run_upstream_herd(
            f"{scenario}:shipped",
            4,
            None,
            sim.base_url,
            folder=folder,
            sim=sim,
            rounds=rounds,
            between_rounds=(lambda _: sim.expire_tokens()) if expire_between else None,
        )


def upstream_simulator(**kwargs: Any) -> KisSimulator:
    """A simulator accepting the herd's credentials. Its issue window stays on (KIS: one token
    per app key per minute), so a client that issues twice crashes the way it would at KIS."""
    kwargs.setdefault("apps", {UPSTREAM_APP_KEY: UPSTREAM_SECRET})
    kwargs.setdefault("issue_latency_s", 0.05)
    return KisSimulator(**kwargs)


@dataclass
class ScenarioContext:
    """What a scenario gets in its process: its index, the simulator's host, the credentials,
    its own home and working directory, and the storage of the spec (``None`` without one)."""

    index: int
    base_url: str
    home: Path
    cwd: Path
    storage: TokenStorage | None = None
    app_key: str = UPSTREAM_APP_KEY
    app_secret: str = UPSTREAM_SECRET
    account: str = UPSTREAM_ACCOUNT
    symbol: str = SYMBOL

    def token_storage(self) -> TokenStorage:
        """The spec's storage (a scenario using our integration needs one)."""
        if self.storage is None:
            raise ValueError("this scenario needs a storage spec")
        return self.storage


class ScenarioClient(Protocol):
    """What a scenario returns: ``round(n)`` makes the round's call through the client's own
    request path and returns the access token it used (with or without ``Bearer``); it raises
    if the call did not get a price (an error answer counts as a failure)."""

    def round(self, round_no: int) -> str: ...


Scenario = Callable[[ScenarioContext], ScenarioClient]


def load_scenario(name: str) -> Scenario:
    """``"module:function"`` -> the function (the module is imported here, in the caller)."""
    module_name, sep, function = name.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"scenario must be 'module:function', not {name!r}")
    found: Scenario = getattr(importlib.import_module(module_name), function)
    return found


@dataclass
class UpstreamHerdResult:
    """What the herd saw: one row per (process, round), the simulator's counts per round, and
    the harness's own troubles (a process that died, a round that never finished).
    ``issued``: tokens the simulator issued per round; ``issue_requests``: ``tokenP`` calls it
    got (issued or refused); ``rate_limited``: its ``EGW00133`` answers."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    issued: list[int] = field(default_factory=list)
    issue_requests: list[int] = field(default_factory=list)
    rate_limited: list[int] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    dirs: list[tuple[Path, Path]] = field(default_factory=list)

    def round_rows(self, round_no: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows if round_no is None or r["round"] == round_no]

    def errors(self, round_no: int | None = None) -> list[str]:
        """``process N round R: Type: message`` for every failed call (skips excluded)."""
        return [
            f"process {r['process']} round {r['round']}: {r['error']}"
            for r in self.round_rows(round_no)
            if r["error"] and not r["skipped"]
        ]

    def crashed(self, round_no: int | None = None) -> int:
        """Processes with a failed call (in ``round_no``, or in any round), plus dead ones; a
        process skipped because its client was never built is not counted again."""
        failed = {
            r["process"] for r in self.round_rows(round_no) if r["error"] and not r["skipped"]
        }
        return len(failed | set(self.dead))

    def tokens(self, round_no: int | None = None) -> set[str]:
        """Ids of the tokens the processes used."""
        return {r["token"] for r in self.round_rows(round_no) if r["token"]}

    def cache_files(self) -> list[str]:
        """Every file under the children's homes and working directories (the clients' own
        token caches, if they wrote any), as ``home|cwd:<relative path>``."""
        found = []
        for home, cwd in self.dirs:
            for label, root in (("home", home), ("cwd", cwd)):
                for path in sorted(root.rglob("*")):
                    if path.is_file():
                        found.append(f"{label}:{path.relative_to(root)}")
        return found

    def summary(self) -> str:
        """One line for an assertion message (ids and error texts only, no token)."""
        return (
            f"issued={self.issued} rate_limited={self.rate_limited} "
            f"errors={self.errors()[:5]} harness={self.harness_errors[:3]} "
            f"tokens={sorted(self.tokens())}"
        )


def _child(
    scenario_name: str,
    index: int,
    spec: dict[str, Any] | None,
    base_url: str,
    home: Path,
    cwd: Path,
    env: dict[str, str],
    rounds: int,
    barrier: Any,
    results: Any,
) -> None:
    for name in list(os.environ):
        if name.startswith("KOREA_INVESTMENT_"):
            del os.environ[name]
    os.environ.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        **env,
    )
    os.chdir(cwd)
    ctx = ScenarioContext(index=index, base_url=base_url, home=home, cwd=cwd)
    try:
        scenario = load_scenario(scenario_name)  # already imported by the parent: a dict lookup
        if spec is not None:
            ctx.storage = build_storage(spec)
            ctx.storage.load_token(ctx.app_key, ctx.app_secret)  # connect / derive keys now
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(("fatal", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, None))
    client: ScenarioClient | None = None
    for round_no in range(rounds):
        try:
            barrier.wait(120)
        except threading.BrokenBarrierError:  # the parent gave up on the herd
            return
        row: dict[str, Any] = {
            "process": index,
            "round": round_no,
            "pid": os.getpid(),
            "token": "",
            "error": "",
            "skipped": False,
        }
        try:
            if round_no == 0:
                client = scenario(ctx)
            if client is None:
                row.update(error="skipped: the client was not built in round 0", skipped=True)
            else:
                row["token"] = token_id(client.round(round_no).removeprefix("Bearer "))
        except BaseException as exc:  # noqa: BLE001 - the crash is what the herd measures
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results.put(("row", index, row))


def run_upstream_herd(
    scenario: str,
    processes: int,
    spec: dict[str, Any] | None,
    base_url: str,
    *,
    folder: Path,
    sim: KisSimulator | None = None,
    rounds: int = 2,
    between_rounds: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> UpstreamHerdResult:
    """Fork ``processes`` children running ``scenario`` for ``rounds`` rounds (see the module
    docstring). ``spec``: the storage for the scenario (``None`` for an as-shipped client).
    ``folder``: where the children's homes and working directories go (``p<i>/home``,
    ``p<i>/cwd``). ``sim``: the simulator, whose issuances and ``EGW00133`` answers are counted
    per round. ``env``: extra environment variables for the children."""
    load_scenario(scenario)  # the heavy import, once, before forking
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    out = UpstreamHerdResult()
    for i in range(processes):
        home, cwd = folder / f"p{i}" / "home", folder / f"p{i}" / "cwd"
        home.mkdir(parents=True)
        cwd.mkdir(parents=True)
        out.dirs.append((home, cwd))
    procs = [
        ctx.Process(
            target=_child,
            args=(scenario, i, spec, base_url, *out.dirs[i], env or {}, rounds, barrier, results),
            daemon=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s

    def next_message() -> tuple[str, int, Any]:
        while True:
            try:
                message: tuple[str, int, Any] = results.get(timeout=0.5)
                return message
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    out.dead[:] = dead
                    raise ChildProcessError(
                        f"process(es) {dead} died (exit codes {[procs[i].exitcode for i in dead]})"
                    ) from None

    try:
        ready = 0
        while ready < processes:
            kind, index, payload = next_message()
            if kind == "fatal":
                out.harness_errors.append(f"process {index} could not start: {payload}")
                return out
            ready += 1
        for round_no in range(rounds):
            if round_no and between_rounds is not None:
                between_rounds(round_no)
            issued, limited = (sim.issued, sim.rate_limited) if sim else (0, 0)
            requests = sim.counts["issue_requests"] if sim else 0
            barrier.wait(120)
            for _ in range(processes):
                out.rows.append(next_message()[2])
            if sim is not None:
                out.issued.append(sim.issued - issued)
                out.issue_requests.append(sim.counts["issue_requests"] - requests)
                out.rate_limited.append(sim.rate_limited - limited)
    except queue.Empty:
        out.harness_errors.append(f"herd did not finish within {timeout_s:.0f} s")
    except ChildProcessError as exc:
        out.harness_errors.append(str(exc))
    except threading.BrokenBarrierError:
        out.harness_errors.append("the barrier broke (a process died or hung)")
    finally:
        if out.harness_errors:
            barrier.abort()  # children waiting for the next round leave now
        reap(procs, deadline)
    return out
