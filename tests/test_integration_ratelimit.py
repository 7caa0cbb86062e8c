"""The four client integrations keep to the fleet-wide call-rate limit: every KIS REST
call they route through upstream code takes a slot of the same limiter ``KoreaInvestment`` and
``KisAuth`` use (the file beside the token file here), and an ``EGW00201`` answer is penalized
and re-sent, bounded. Real upstream packages, forked processes, the simulator metering 20
calls/s per app key as KIS does."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HERD_CALLS_PER_SECOND
from upstream_herd import (
    UPSTREAM_APP_KEY,
    UPSTREAM_CLIENTS,
    UPSTREAM_SECRET,
    ScenarioClient,
    ScenarioContext,
    require_upstream,
    run_upstream_herd,
    upstream_simulator,
)

from kis_safe_token import KoreaInvestment as OurKoreaInvestment
from kis_safe_token.auth import RETRY_ATTEMPTS
from kis_safe_token.ratelimit import CALLS_PER_SECOND_ENV, MemoryRateLimiter
from kis_safe_token.shared import SharedToken
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.simulator import REAL_CALLS_PER_SECOND

CLIENTS = UPSTREAM_CLIENTS
PROCESSES, CALLS = 4, 15
DEFAULT_RATE = 20.0  # KIS's 20/s for a real account


def _require(name: str) -> None:
    """The client (imported here, in the parent, before any fork), or a skip outside CI."""
    require_upstream(name)


def build(name: str, ctx: ScenarioContext, **rate: Any) -> tuple[ScenarioClient, SharedToken]:
    """The integration of client ``name`` on ``ctx``'s storage and host, with the rate keywords
    ``rate``: the scenario client (``round()`` = one price call through the package's own
    request path, raising unless priced) and the :class:`SharedToken` holding its limiter."""
    scenario = importlib.import_module(f"upstream_clients.{name}_scenario")
    storage = ctx.token_storage()
    if name == "korea_investment_stock":
        from kis_safe_token.integrations.korea_investment_stock import KoreaInvestment

        broker = KoreaInvestment(
            ctx.app_key, ctx.app_secret, ctx.account,
            token_storage=storage, base_url=ctx.base_url, **rate,
        )  # fmt: skip
        return scenario._Client(broker, ctx.symbol), broker._kst_shared(
            broker.api_key, broker.api_secret
        )
    if name == "mojito":
        from kis_safe_token.integrations.mojito import KoreaInvestment as Mojito

        broker = Mojito(
            ctx.app_key, ctx.app_secret, ctx.account,
            token_storage=storage, base_url=ctx.base_url, **rate,
        )  # fmt: skip
        return scenario._Client(broker, ctx.symbol), broker._kst_shared()
    if name == "pykis":
        from kis_safe_token.integrations.pykis import PyKis

        scenario._point_pykis_at(ctx.base_url)
        kis = PyKis(
            id="herd", account=ctx.account, appkey=ctx.app_key, secretkey=ctx.app_secret,
            use_websocket=False, token_storage=storage, **rate,
        )  # fmt: skip
        return scenario._Client(kis, ctx.symbol), kis._kst_tokens["real"]
    import kis_trader
    from kis_trader._internal import _endpoints

    from kis_safe_token.integrations.kis_trader import RequestsTransport, TokenManager

    _endpoints._BASE_URL_BY_ENVIRONMENT["real"] = ctx.base_url
    tokens = TokenManager(
        app_key=ctx.app_key, app_secret=ctx.app_secret, environment="real",
        token_storage=storage, **rate,
    )  # fmt: skip
    client = kis_trader.KISClient(
        app_key=ctx.app_key, app_secret=ctx.app_secret, environment="real",
        transport=RequestsTransport(token_manager=tokens),
    )  # fmt: skip
    return scenario._Client(client, ctx.symbol), tokens._kst_token


class _Burst:
    """``CALLS`` price calls in a row in one herd round."""

    def __init__(self, client: ScenarioClient) -> None:
        self.client = client

    def round(self, round_no: int) -> str:
        token = ""
        for _ in range(CALLS):
            token = self.client.round(round_no)
        return token


# The herd's scenarios ("module:function"): the integration with the default limit, or whatever
# $KOREA_INVESTMENT_CALLS_PER_SECOND the herd's environment says.
def burst_korea_investment_stock(ctx: ScenarioContext) -> _Burst:
    return _Burst(build("korea_investment_stock", ctx)[0])


def burst_mojito(ctx: ScenarioContext) -> _Burst:
    return _Burst(build("mojito", ctx)[0])


def burst_pykis(ctx: ScenarioContext) -> _Burst:
    return _Burst(build("pykis", ctx)[0])


def burst_kis_trader(ctx: ScenarioContext) -> _Burst:
    return _Burst(build("kis_trader", ctx)[0])


@pytest.fixture
def metered_sim() -> Iterator[KisSimulator]:
    with upstream_simulator(calls_per_second=REAL_CALLS_PER_SECOND, issue_latency_s=0) as sim:
        yield sim


@pytest.fixture
def ctx(
    metered_sim: KisSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ScenarioContext:
    """An in-process context on a file storage; the upstream hosts the builders point at the
    simulator (module globals of pykis and kis-trader) are restored after the test."""
    monkeypatch.delenv(CALLS_PER_SECOND_ENV, raising=False)
    for name, (module, _) in CLIENTS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        if name == "pykis":
            pykis_kis = importlib.import_module("pykis.kis")
            monkeypatch.setattr(pykis_kis, "REAL_DOMAIN", pykis_kis.REAL_DOMAIN)
            monkeypatch.setattr(pykis_kis, "VIRTUAL_DOMAIN", pykis_kis.VIRTUAL_DOMAIN)
        if name == "kis_trader":
            table = importlib.import_module("kis_trader._internal._endpoints")
            monkeypatch.setitem(
                table._BASE_URL_BY_ENVIRONMENT, "real", table._BASE_URL_BY_ENVIRONMENT["real"]
            )
    return ScenarioContext(
        index=0,
        base_url=metered_sim.base_url,
        home=tmp_path,
        cwd=tmp_path,
        storage=FileTokenStorage(tmp_path / "shared" / "tokens.json"),
    )


def _herd(
    name: str, sim: KisSimulator, folder: Path, env: dict[str, str] | None = None
) -> list[str]:
    importlib.import_module(f"upstream_clients.{name}_scenario")  # the heavy import, once
    out = run_upstream_herd(
        f"test_integration_ratelimit:burst_{name}",
        PROCESSES,
        {"kind": "file", "path": str(folder / "shared" / "tokens.json")},
        sim.base_url,
        folder=folder,
        sim=sim,
        rounds=1,
        env=env,
        timeout_s=90,
    )
    assert out.harness_errors == [], out.summary()
    return out.errors()


# -- the fleet keeps to the limit --------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLIENTS))
def test_a_herd_of_each_integration_gets_no_egw00201(
    name: str, metered_sim: KisSimulator, tmp_path: Path
) -> None:
    _require(name)
    errors = _herd(
        name, metered_sim, tmp_path, env={CALLS_PER_SECOND_ENV: str(HERD_CALLS_PER_SECOND)}
    )
    assert errors == []
    assert metered_sim.too_many_calls == 0
    assert metered_sim.counts["uapi_calls"] == PROCESSES * CALLS  # every call answered, once
    assert metered_sim.peak_calls_per_second[UPSTREAM_APP_KEY] <= REAL_CALLS_PER_SECOND


@pytest.mark.parametrize("name", list(CLIENTS))
def test_without_the_limit_the_same_herd_gets_egw00201(
    name: str, metered_sim: KisSimulator, tmp_path: Path
) -> None:
    """The negative control: ``$KOREA_INVESTMENT_CALLS_PER_SECOND=0`` turns the limiter off,
    and the same herd goes over KIS's 20/s."""
    _require(name)
    _herd(name, metered_sim, tmp_path, env={CALLS_PER_SECOND_ENV: "0"})
    assert metered_sim.too_many_calls > 0
    assert metered_sim.peak_calls_per_second[UPSTREAM_APP_KEY] == REAL_CALLS_PER_SECOND


@pytest.mark.parametrize("name", list(CLIENTS))
def test_a_process_mixing_our_client_and_an_integration_counts_once(
    name: str, ctx: ScenarioContext, metered_sim: KisSimulator
) -> None:
    """Two threads at full demand, one on ``kis_safe_token.KoreaInvestment``, one on the
    integration, same storage: one limiter (the file beside the token file) spaces both, so
    the pair keeps to its rate together (two limiters would let twice that through, over the
    simulator's 20/s). The rate is the herds' 15/s: at KIS's own 20/s a starved CI host's late
    arrivals were once counted as 21 in a second (conftest.HERD_CALLS_PER_SECOND)."""
    _require(name)
    client, shared = build(name, ctx, calls_per_second=HERD_CALLS_PER_SECOND)
    ours = OurKoreaInvestment(
        UPSTREAM_APP_KEY,
        UPSTREAM_SECRET,
        token_storage=ctx.storage,
        base_url=ctx.base_url,
        calls_per_second=HERD_CALLS_PER_SECOND,
    )
    assert shared.rate_limiter is not None and ours.shared_token.rate_limiter is not None
    assert shared.rate_limiter.where == ours.shared_token.rate_limiter.where
    per_thread = 30
    calls: list[Callable[[], object]] = [
        lambda: ours.fetch_price(ctx.symbol),
        lambda: client.round(0),
    ]
    barrier = threading.Barrier(len(calls))
    failures: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait(10)
        try:
            for _ in range(per_thread):
                call()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    assert failures == []
    assert metered_sim.too_many_calls == 0
    assert metered_sim.counts["uapi_calls"] == 2 * per_thread
    assert metered_sim.peak_calls_per_second[UPSTREAM_APP_KEY] <= REAL_CALLS_PER_SECOND
    # Slots 1/15 s apart (or a little more) for both threads: 60 calls take 59 intervals.
    assert elapsed >= 0.95 * (2 * per_thread - 1) / HERD_CALLS_PER_SECOND


class _CountingLimiter(MemoryRateLimiter):
    """A fast limiter that counts the slots taken."""

    def __init__(self) -> None:
        super().__init__("integration-slots", 1000)
        self.slots = 0

    def acquire(self, timeout_s: float = 30.0) -> float:
        self.slots += 1
        return super().acquire(timeout_s)


@pytest.mark.parametrize("name", list(CLIENTS))
def test_one_slot_per_send_the_refresh_resend_included(
    name: str, ctx: ScenarioContext, metered_sim: KisSimulator
) -> None:
    """A slot per HTTP send, not per call or per wrapper level: after an expiry the call is
    sent twice (rejected, then with the fleet's next token) and takes two."""
    _require(name)
    limiter = _CountingLimiter()
    client, _ = build(name, ctx, rate_limiter=limiter)
    client.round(0)
    assert (limiter.slots, metered_sim.counts["price_requests"]) == (1, 1)
    metered_sim.expire_tokens()
    client.round(1)
    assert (limiter.slots, metered_sim.counts["price_requests"]) == (3, 3)


class _IssuanceRecorder(MemoryRateLimiter):
    """A fast limiter that records, at each slot taken, how many tokens the simulator had
    issued by then."""

    def __init__(self, sim: KisSimulator) -> None:
        super().__init__("integration-order", 1000)
        self.sim = sim
        self.issued_at_slot: list[int] = []

    def acquire(self, timeout_s: float = 30.0) -> float:
        self.issued_at_slot.append(self.sim.issued)
        return super().acquire(timeout_s)


@pytest.mark.parametrize("name", list(CLIENTS))
def test_the_slot_is_taken_once_the_token_is_in_hand(
    name: str, ctx: ScenarioContext, metered_sim: KisSimulator
) -> None:
    """A call that must wait for a token issuance takes its slot after the token is in hand,
    as ``KisAuth`` does: a slot taken first would pass unused during the wait, and the calls
    queued behind the issuance would then all go at once when the token lands."""
    _require(name)
    limiter = _IssuanceRecorder(metered_sim)
    client, shared = build(name, ctx, rate_limiter=limiter)
    client.round(0)
    issued = metered_sim.issued
    metered_sim.issue_window_s = 0  # KIS's one-a-minute window is not what this is about
    shared.invalidate(shared.token.access_token)  # neither memory nor store: the next issues
    client.round(1)
    assert metered_sim.issued == issued + 1
    assert limiter.issued_at_slot[-1] == issued + 1


@pytest.mark.parametrize("name", ["korea_investment_stock", "mojito"])
def test_the_hashkey_call_takes_a_slot_too(
    name: str, ctx: ScenarioContext, metered_sim: KisSimulator
) -> None:
    """``POST /uapi/hashkey`` (the order methods make it) reads no token: it takes its slot
    itself."""
    _require(name)
    limiter = _CountingLimiter()
    client, _ = build(name, ctx, rate_limiter=limiter)
    with pytest.raises(Exception):  # noqa: B017,PT011 - the simulator has no hashkey endpoint
        client.broker.issue_hashkey({"ORD_QTY": "1"})  # type: ignore[attr-defined]
    assert limiter.slots == 1
    assert metered_sim.counts["uapi_calls"] == 1  # KIS meters it


# -- EGW00201 anyway (a program outside the fleet) ---------------------------------------------
@pytest.mark.parametrize("name", list(CLIENTS))
def test_egw00201_from_outside_is_penalized_and_resent(
    name: str, ctx: ScenarioContext, metered_sim: KisSimulator
) -> None:
    _require(name)
    client, shared = build(name, ctx)
    metered_sim.refuse_calls(2)
    client.round(0)
    assert metered_sim.too_many_calls == 2
    assert metered_sim.counts["uapi_calls"] == 1
    assert shared.rate_limiter is not None
    assert shared.rate_limiter.slowdown_left_s() > 0  # the fleet slowed down


#: Sends of one call that KIS refuses for ever: 1 + RETRY_ATTEMPTS, and kis-trader's transport
#: repeats a refused GET itself (``max_attempts=3``), each attempt through our bounded sender.
BOUNDED_SENDS = {
    "korea_investment_stock": 1 + RETRY_ATTEMPTS,
    "mojito": 1 + RETRY_ATTEMPTS,
    "pykis": 1 + RETRY_ATTEMPTS,  # pykis alone re-sends every 0.1 s for ever
    "kis_trader": 3 * (1 + RETRY_ATTEMPTS),
}


@pytest.mark.parametrize("name", list(CLIENTS))
def test_egw00201_resends_are_bounded_then_the_call_fails(
    name: str, ctx: ScenarioContext, metered_sim: KisSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require(name)
    from kis_safe_token.integrations import _client_token

    monkeypatch.setattr(_client_token, "backoff_s", lambda attempt: 0.001)
    client, shared = build(name, ctx)
    metered_sim.refuse_calls(1000)
    with pytest.raises(Exception):  # noqa: B017,PT011 - each client fails its own way
        client.round(0)
    assert metered_sim.too_many_calls == BOUNDED_SENDS[name]
    assert metered_sim.counts["uapi_calls"] == 0


# -- the keywords --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLIENTS))
def test_rate_keywords_reach_the_shared_token(name: str, ctx: ScenarioContext) -> None:
    _require(name)
    assert build(name, ctx)[1].rate_limiter.rate == DEFAULT_RATE  # type: ignore[union-attr]
    assert build(name, ctx, calls_per_second=5)[1].rate_limiter.rate == 5  # type: ignore[union-attr]
    assert build(name, ctx, calls_per_second=0)[1].rate_limiter is None
    mine = MemoryRateLimiter("integration-test", 3)
    assert build(name, ctx, rate_limiter=mine)[1].rate_limiter is mine


def test_pykis_rate_keywords_set_the_traded_domain(ctx: ScenarioContext) -> None:
    """In virtual mode the keywords set the virtual app key's limit (KIS's virtual default
    2/s otherwise); the real domain (quotes) keeps 20/s unless the limit is turned off."""
    _require("pykis")
    from kis_safe_token.integrations.pykis import PyKis

    def limits(**rate: Any) -> tuple[float | None, float | None]:
        kis = PyKis(
            id="herd", account=ctx.account, appkey=ctx.app_key, secretkey=ctx.app_secret,
            virtual_id="herd", virtual_appkey="PSvirtualRateKey".ljust(36, "0"),
            virtual_secretkey="virtual-rate-".ljust(180, "v"),
            use_websocket=False, token_storage=ctx.storage, **rate,
        )  # fmt: skip
        real, virtual = (kis._kst_tokens[d].rate_limiter for d in ("real", "virtual"))
        return (real and real.rate, virtual and virtual.rate)

    assert limits() == (DEFAULT_RATE, 2.0)
    assert limits(calls_per_second=5) == (DEFAULT_RATE, 5)
    assert limits(calls_per_second=0) == (None, None)
