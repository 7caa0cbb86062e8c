"""``KisRealtime``: the processes sharing a token file share one KIS realtime session.

Against the simulator's websocket (KIS's one-session-per-app-key rule on) and real processes:
one session for a mixed fleet, the union of wants registered, every event to every process
that wants it, failover after SIGKILL with a gap event and no second session, the 42nd pair a
clear error, a dead process's wants dropped, bounded buffers, and the socket left alone when
it is not ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import APP_KEY, SECRET
from herd import build_storage
from realtime_fleet import Fleet, Member

from kis_safe_token import (
    AsyncKisRealtime,
    FileTokenStorage,
    KisRealtime,
    RealtimeError,
    RealtimeLimitError,
)
from kis_safe_token.realtime.frames import SESSION_LIMIT
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.realtime_sim import RealtimeSimulator, sequence_of

TRADES, QUOTES = "H0STCNT0", "H0STASP0"
BACKENDS = pytest.mark.parametrize("backend", ["file", "redis"])


@pytest.fixture
def rts(sim: KisSimulator) -> Iterator[RealtimeSimulator]:
    with RealtimeSimulator(sim) as rts:
        yield rts


def realtime(
    sim: KisSimulator, rts: RealtimeSimulator, where: Path | dict[str, Any], **kw: object
) -> KisRealtime:
    """A KisRealtime on the token file ``where``, or the storage spec ``where``."""
    storage = FileTokenStorage(where) if isinstance(where, Path) else build_storage(where)
    return KisRealtime(
        APP_KEY,
        SECRET,
        storage,
        base_url=sim.base_url,
        ws_url=rts.ws_url,
        **kw,  # type: ignore[arg-type]
    )


def seqs(sub: object, n: int) -> list[int]:
    got = [sub.get(10) for _ in range(n)]  # type: ignore[attr-defined]
    assert None not in got, f"only {got.index(None)} of {n} events"
    return [0 if e.gap else sequence_of(e.fields) for e in got]


def test_one_process_gets_the_events_of_its_pairs_and_a_closed_pair_is_deregistered(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    with realtime(sim, rts, token_path) as rt:
        trades = rt.subscribe(TRADES, "005930")
        quotes = rt.subscribe(QUOTES, "005930")
        assert rt.role == "leader" and rts.registered() == {(TRADES, "005930"), (QUOTES, "005930")}
        rts.push(TRADES, "005930", frames=2, records=3)
        rts.push(QUOTES, "005930", frames=1)
        assert seqs(trades, 6) == [1, 2, 3, 4, 5, 6]
        assert seqs(quotes, 1) == [1]
        quotes.close()
        assert rts.wait_for(lambda s: s.registered() == {(TRADES, "005930")})
        assert quotes.get(0) is None  # closed: nothing more, even of what came after
    assert trades.get(0) is None  # closing the KisRealtime ends its subscriptions
    assert rts.stats()["sessions_opened"] == 1


def test_a_second_realtime_in_one_process_follows_the_first_and_shares_its_registration(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    with realtime(sim, rts, token_path) as a, realtime(sim, rts, token_path) as b:
        sa, sb = a.subscribe(TRADES, "005930"), b.subscribe(TRADES, "005930")
        assert {a.role, b.role} == {"leader", "follower"}
        rts.push(TRADES, "005930", frames=3)
        assert seqs(sa, 3) == seqs(sb, 3) == [1, 2, 3]
        assert rts.stats()["registered_total"] == 1  # two wants of one pair: one registration
        mode = os.stat(a._hub.socket_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


@BACKENDS
def test_the_42nd_pair_is_a_clear_error_to_the_process_that_asked(
    sim: KisSimulator,
    rts: RealtimeSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
) -> None:
    codes = [f"{n:06d}" for n in range(SESSION_LIMIT + 1)]
    spec = spec_of(backend)
    with realtime(sim, rts, spec) as leader, realtime(sim, rts, spec) as follower:
        for code in codes[:-2]:
            leader.subscribe(TRADES, code)
        follower.subscribe(TRADES, codes[-2])  # the 41st, from the other side of the socket
        with pytest.raises(RealtimeLimitError, match="41"):
            follower.subscribe(TRADES, codes[-1])
        with pytest.raises(RealtimeLimitError):
            leader.subscribe(QUOTES, codes[0])
        again = follower.subscribe(TRADES, codes[0])  # a pair already held costs nothing
        assert rts.stats()["registrations"] == SESSION_LIMIT
        rts.push(TRADES, codes[0])
        assert seqs(again, 1) == [1]


def test_a_slow_subscriber_drops_its_oldest_events_and_stalls_nobody(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    with realtime(sim, rts, token_path, buffer=5) as slow, realtime(sim, rts, token_path) as fast:
        lagging, keeping_up = slow.subscribe(TRADES, "005930"), fast.subscribe(TRADES, "005930")
        rts.push(TRADES, "005930", frames=20)
        assert seqs(keeping_up, 20) == list(range(1, 21))
        assert rts.wait_for(lambda s: lagging.dropped == 15, 10)
        assert seqs(lagging, 6) == [0, *range(16, 21)]  # a gap where the 15 oldest were
        assert slow.stats()["dropped"] == 15


def test_no_answer_names_what_stands_in_the_way_and_the_path_is_left_alone(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    with realtime(sim, rts, token_path) as probe:
        socket_path = probe._hub.socket_path
    socket_path.write_text("not a socket")  # something of the user's own where the socket goes
    with realtime(sim, rts, token_path) as rt:
        with pytest.raises(RealtimeError, match="not a socket"):
            rt.subscribe(TRADES, "005930", timeout=2)
    assert socket_path.read_text() == "not a socket"
    assert rts.stats()["sessions_opened"] == 0


def test_settings_are_checked_by_name(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOREA_INVESTMENT_WS_URL", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_WS_URL"):
        KisRealtime(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    monkeypatch.setenv("KOREA_INVESTMENT_WS_URL", rts.ws_url)
    with pytest.raises(ValueError, match="buffer"):
        realtime(sim, rts, token_path, buffer=0)
    with KisRealtime(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url) as rt:
        assert rt.ws_url == rts.ws_url
        with pytest.raises(ValueError, match="tr_key"):
            rt.subscribe(TRADES, "")
        assert SECRET not in repr(rt) and APP_KEY not in repr(rt)


def test_async_realtime_iterates_events(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    async def main() -> list[int]:
        storage = FileTokenStorage(token_path)
        kw = {"base_url": sim.base_url, "ws_url": rts.ws_url}
        async with AsyncKisRealtime(APP_KEY, SECRET, storage, **kw) as rt:
            sub = await rt.subscribe(TRADES, "005930")
            await asyncio.to_thread(rts.push, TRADES, "005930", 3)
            got = []
            async for event in sub:
                got.append(sequence_of(event.fields))
                if len(got) == 3:
                    break
            assert await sub.get(0.05) is None  # nothing more within the timeout
            await sub.aclose()
            return got

    assert asyncio.run(main()) == [1, 2, 3]


def fleet(
    sim: KisSimulator, rts: RealtimeSimulator, spec: dict[str, Any], members: list[Member]
) -> Fleet:
    return Fleet(spec, sim.base_url, rts.ws_url, members)


def by_process(reports: list[tuple[object, ...]]) -> dict[int, dict[tuple[str, str], list[int]]]:
    seen: dict[int, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(list))
    for _, index, tr_id, tr_key, seq, _ in (r for r in reports if r[0] == "event"):
        seen[index][tr_id, tr_key].append(seq)  # type: ignore[index]
    return seen


PAIRS = [(TRADES, "005930"), (QUOTES, "005930"), (TRADES, "000660"), (QUOTES, "035720")]


@pytest.mark.stress
@BACKENDS
def test_eight_processes_sync_and_asyncio_share_one_session_and_every_event(
    sim: KisSimulator,
    rts: RealtimeSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
) -> None:
    members = [
        Member("sync" if i % 2 else "async", [PAIRS[i % 4], PAIRS[(i + 1) % 4]]) for i in range(8)
    ]
    with fleet(sim, rts, spec_of(backend), members) as f:
        f.collect("ready", 8, timeout=60)
        assert rts.registered() == set(PAIRS)
        for pair in PAIRS:
            rts.push(*pair, frames=10, records=2)
        want = {i: {p: list(range(1, 21)) for p in m.pairs} for i, m in enumerate(members)}
        f.until(lambda seen: by_process(seen) == want, timeout=30)
        stats = rts.stats()  # before the fleet stops: as each leader leaves, another takes over
    assert (stats["sessions_opened"], stats["sessions_peak"], stats["sessions_refused"]) == (
        1,
        1,
        0,
    )
    assert stats["registered_total"] == len(PAIRS)  # the union, each pair once


@pytest.mark.stress
@BACKENDS
def test_the_leader_sigkilled_moves_the_session_and_every_survivor_resumes_after_a_gap(
    sim: KisSimulator,
    rts: RealtimeSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
) -> None:
    members = [Member("sync" if i % 2 else "async", [PAIRS[0], PAIRS[1 + i % 3]]) for i in range(6)]
    with fleet(sim, rts, spec_of(backend), members) as f:
        ready = f.collect("ready", 6, timeout=60)
        leader = next(r for r in ready if r[3] == "leader")
        rts.push(*PAIRS[0], frames=3)
        f.until(lambda seen: all(by_process(seen)[i][PAIRS[0]] == [1, 2, 3] for i in range(6)))
        survivors = [i for i in range(6) if i != leader[1]]

        def resumed(seen: list[tuple[object, ...]]) -> bool:
            got = by_process(seen)
            return all(0 in got[i][PAIRS[0]] and got[i][PAIRS[0]][-1] > 3 for i in survivors)

        os.kill(leader[2], signal.SIGKILL)
        killed, pushed = time.monotonic(), 3
        while not resumed(f.seen):  # a frame every 50 ms until each survivor has one again
            assert time.monotonic() - killed < 15, (ready, dict(by_process(f.seen)))
            pushed += 1
            rts.push(*PAIRS[0])
            with contextlib.suppress(AssertionError):
                f.until(resumed, timeout=0.05)
        resumed_after_s = time.monotonic() - killed
        rts.push(*PAIRS[0], frames=3)
        last = pushed + 3
        f.until(lambda seen: all(by_process(seen)[i][PAIRS[0]][-1] == last for i in survivors))
        got = by_process(f.seen)
        assert {p for i in survivors for p in members[i].pairs} == rts.registered()
        stats = rts.stats()
    print(f"resumed {resumed_after_s * 1000:.0f} ms after the SIGKILL")
    for i in survivors:
        after = got[i][PAIRS[0]][got[i][PAIRS[0]].index(0) + 1 :]
        assert got[i][PAIRS[0]][:4] == [1, 2, 3, 0] and 0 not in after  # one gap, then in order
        assert after == list(range(after[0], after[0] + len(after)))
    assert (stats["sessions_opened"], stats["sessions_peak"], stats["sessions_refused"]) == (
        2,
        1,
        0,
    )


@pytest.mark.stress
@BACKENDS
def test_a_dead_follower_s_wants_end_with_it(
    sim: KisSimulator,
    rts: RealtimeSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
) -> None:
    spec = spec_of(backend)  # Redis: the dead process's heartbeat lapses (5 s)
    with realtime(sim, rts, spec) as rt:
        rt.subscribe(*PAIRS[0])
        assert rts.wait_for(lambda _: rt.role == "leader")  # this process leads
        with fleet(sim, rts, spec, [Member("sync", [PAIRS[1]])]) as f:
            (ready,) = f.collect("ready", 1, timeout=60)
            assert ready[3] == "follower" and rts.registered() == {PAIRS[0], PAIRS[1]}
            os.kill(ready[2], signal.SIGKILL)
            assert rts.wait_for(lambda s: s.registered() == {PAIRS[0]})


@pytest.mark.stress
def test_a_paused_redis_leader_is_replaced_never_beside_a_second_session_and_never_heard_again(
    sim: KisSimulator, rts: RealtimeSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    members = [Member("sync" if i % 2 else "async", [PAIRS[0]]) for i in range(3)]
    with fleet(sim, rts, spec_of("redis"), members) as f:
        ready = f.collect("ready", 3, timeout=60)
        leader = next(r for r in ready if r[3] == "leader")
        others = [i for i in range(3) if i != leader[1]]
        rts.push(*PAIRS[0], frames=2)
        f.until(lambda seen: all(by_process(seen)[i][PAIRS[0]] == [1, 2] for i in range(3)))
        os.kill(leader[2], signal.SIGSTOP)
        try:
            # Its lease lapses; the next leader's session is refused while the paused one's is
            # open, and backs off. What KIS sends meanwhile waits in the paused leader's socket.
            assert rts.wait_for(lambda s: s.stats()["sessions_refused"] >= 1, timeout=20)
            rts.push(*PAIRS[0], frames=3)  # 3, 4, 5: to the paused session only
        finally:
            os.kill(leader[2], signal.SIGCONT)
        # Woken, it finds its lease gone and closes its session; the retry then opens one.
        assert rts.wait_for(lambda s: s.stats()["sessions_opened"] == 2, timeout=20)
        pushed = 5
        deadline = time.monotonic() + 15
        while not all(by_process(f.seen)[i][PAIRS[0]][-1] > 5 for i in others):
            assert time.monotonic() < deadline, by_process(f.seen)
            pushed += 1
            rts.push(*PAIRS[0])
            with contextlib.suppress(AssertionError):
                f.until(lambda seen: False, timeout=0.05)
        stats = rts.stats()
    assert stats["sessions_peak"] == 1  # never two sessions at once
    for i in others:
        got = by_process(f.seen)[i][PAIRS[0]]
        assert got[:2] == [1, 2] and not {3, 4, 5} & set(got)  # the deposed leader not heard
        after = got[got.index(0) + 1 :]
        assert 0 not in after and after == list(range(after[0], after[0] + len(after)))


def test_after_the_redis_channel_is_lost_a_held_pair_is_subscribed_again_at_once(
    sim: KisSimulator, rts: RealtimeSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    import redis

    spec = spec_of("redis")
    with realtime(sim, rts, spec) as rt:
        first = rt.subscribe(TRADES, "005930")
        rts.push(TRADES, "005930")
        assert seqs(first, 1) == [1]
        redis.from_url(spec["url"]).client_kill_filter(_type="pubsub")  # every subscriber's
        assert seqs(first, 1) == [0]  # the channel was lost: a gap
        second = rt.subscribe(TRADES, "005930", timeout=5)  # registered all along: at once
        deadline = time.monotonic() + 10
        while (event := second.get(0.05)) is None:
            assert time.monotonic() < deadline, "no event after the channel came back"
            rts.push(TRADES, "005930")
        assert not event.gap and sequence_of(event.fields) > 1


@BACKENDS
def test_an_encrypted_pair_reaches_every_process_decrypted(
    sim: KisSimulator,
    rts: RealtimeSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
) -> None:
    notices = ("H0STCNI0", "user01")  # execution notices: KIS encrypts them
    spec = spec_of(backend)
    with realtime(sim, rts, spec) as a, realtime(sim, rts, spec) as b:
        subs = [a.subscribe(*notices), b.subscribe(*notices)]
        if backend == "redis":  # a listener of the channel that is not the fleet's
            import redis

            spy = redis.from_url(spec["url"]).pubsub(ignore_subscribe_messages=True)
            spy.subscribe(a._hub.channel)  # type: ignore[union-attr]
            assert spy.get_message(timeout=5) is None  # subscribed (a confirmation, ignored)
        rts.push(*notices, frames=2, records=2)
        for sub in subs:
            assert seqs(sub, 4) == [1, 2, 3, 4]
        if backend == "redis":
            heard = [m["data"] for m in iter(lambda: spy.get_message(timeout=1), None)]
            frames = [d for d in heard if b"\tS\t" in d]
            assert len(frames) >= 2 and not any(b"user01" in d for d in heard)
            wants = redis.from_url(spec["url"]).hgetall(a._hub.wants_key)  # type: ignore[union-attr]
            assert wants and not any(b"user01" in v for v in wants.values())


def test_an_async_reader_cancelled_in_a_loop_now_closed_stops_nobody_s_events(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    from kis_safe_token.realtime.aio import AsyncSubscription

    with realtime(sim, rts, token_path) as rt:
        sub, other = rt.subscribe(TRADES, "005930"), rt.subscribe(TRADES, "005930")

        async def give_up() -> None:  # a cancellation, not get()'s own timeout
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(AsyncSubscription(sub).get(), 0.05)

        asyncio.run(give_up())  # and its loop is closed
        rts.push(TRADES, "005930", frames=3)
        assert seqs(other, 3) == [1, 2, 3]  # the session still delivers
        assert seqs(sub, 3) == [1, 2, 3]


def test_on_redis_a_pair_closed_and_subscribed_again_is_answered_at_once(
    sim: KisSimulator, rts: RealtimeSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    spec = spec_of("redis")
    with realtime(sim, rts, spec) as rt:
        for _ in range(3):  # the leader may read the wants only after both changes
            rt.subscribe(TRADES, "005930", timeout=5).close()
        again = rt.subscribe(TRADES, "005930", timeout=5)
        rts.push(TRADES, "005930")
        assert seqs(again, 1) != []


class _StallingProxy:
    """A TCP proxy to the simulator's websocket that holds each connection until released."""

    def __init__(self, target: str) -> None:
        import socket
        import threading

        host, port = target.removeprefix("ws://").split(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.accepted = threading.Event()
        self.released = threading.Event()
        self.finished = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        import socket
        import threading

        client, _ = self.server.accept()
        self.accepted.set()
        self.released.wait(30)
        upstream = socket.create_connection(self.target)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

        there = threading.Thread(target=pipe, args=(client, upstream))
        there.start()
        pipe(upstream, client)
        there.join(10)
        client.close()
        upstream.close()
        self.finished.set()


def test_a_leader_closed_while_its_session_is_still_connecting_never_registers(
    sim: KisSimulator, rts: RealtimeSimulator, token_path: Path
) -> None:
    import threading

    proxy = _StallingProxy(rts.ws_url)
    storage = FileTokenStorage(token_path)
    rt = KisRealtime(APP_KEY, SECRET, storage, base_url=sim.base_url, ws_url=proxy.url)

    def ask() -> None:
        with contextlib.suppress(RealtimeError):  # no answer: the session never opens
            rt.subscribe(TRADES, "005930", timeout=30)

    asking = threading.Thread(target=ask)
    asking.start()
    assert proxy.accepted.wait(10)
    rt.close()  # the session thread is in connect(), its handshake held by the proxy
    proxy.released.set()  # now the handshake completes, after the lock was given up
    assert proxy.finished.wait(20)  # the connection came and went
    asking.join(10)
    assert rts.stats()["sessions_opened"] == 0  # it registered nothing: no orphan session
