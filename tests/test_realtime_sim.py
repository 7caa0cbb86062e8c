"""The simulator's websocket half speaks KIS's realtime rules: one session per app key,
41 registrations, PINGPONG, numbered frames, and counters of what it saw."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from kis_safe_token.realtime.frames import (
    SESSION_LIMIT,
    decode_frame,
    is_pingpong,
    parse_reply,
    register_message,
)
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.realtime_sim import (
    PARSE_ERROR,
    RealtimeSimulator,
    sent_at,
    sequence_of,
)


@pytest.fixture
def sim() -> KisSimulator:
    with KisSimulator(issue_latency_s=0) as sim:
        yield sim


def _approval(sim: KisSimulator, app_key: str = "app-A") -> str:
    body = {"grant_type": "client_credentials", "appkey": app_key, "secretkey": "s"}
    answer = requests.post(f"{sim.base_url}/oauth2/Approval", json=body, timeout=10)
    return str(answer.json()["approval_key"])


def _register(ws: ClientConnection, key: str, tr_id: str, tr_key: str, on: bool = True) -> str:
    ws.send(register_message(key, tr_id, tr_key, register=on))
    text = ws.recv(timeout=10)
    assert isinstance(text, str)
    return text


def test_a_registered_pair_gets_numbered_frames_and_a_deregistered_one_none(
    sim: KisSimulator,
) -> None:
    key = _approval(sim)
    with RealtimeSimulator(sim) as rt, connect(rt.ws_url) as ws:
        assert parse_reply(_register(ws, key, "H0STCNT0", "005930")).code == "OPSP0000"
        assert parse_reply(_register(ws, key, "H0STASP0", "005930")).ok
        assert rt.push("H0STCNT0", "005930", frames=2, records=3) == 2
        events = [e for _ in range(2) for e in decode_frame(str(ws.recv(timeout=10)), 0.0)]
        assert [(e.tr_id, e.tr_key, sequence_of(e.fields)) for e in events] == [
            ("H0STCNT0", "005930", n) for n in range(1, 7)
        ]
        assert 0 < time.time() - sent_at(events[0].fields) < 10
        off = parse_reply(_register(ws, key, "H0STCNT0", "005930", on=False))
        assert (off.code, off.ok) == ("OPSP0001", True)
        assert rt.push("H0STCNT0", "005930") == 0
        assert rt.registered() == {("H0STASP0", "005930")}
        assert rt.stats()["registered_total"] == 2


def test_a_second_session_of_one_app_key_is_refused_until_the_first_closes(
    sim: KisSimulator,
) -> None:
    key, other = _approval(sim), _approval(sim, "app-B")
    with RealtimeSimulator(sim) as rt, ExitStack() as stack:
        first = stack.enter_context(connect(rt.ws_url))
        assert parse_reply(_register(first, key, "H0STCNT0", "005930")).ok
        with connect(rt.ws_url) as second:  # the same app key, a second approval key
            refused = parse_reply(_register(second, _approval(sim), "H0STCNT0", "000660"))
            assert (refused.code, refused.message) == ("OPSP8996", "ALREADY IN USE appkey")
        with connect(rt.ws_url) as third:  # another app key is its own session
            assert parse_reply(_register(third, other, "H0STCNT0", "005930")).ok
            first.close()
            assert rt.wait_for(lambda r: r.stats()["registrations"] == 1)
            with connect(rt.ws_url) as fourth:
                assert parse_reply(_register(fourth, key, "H0STCNT0", "005930")).ok
        stats = rt.stats()
        assert (stats["sessions_opened"], stats["sessions_refused"], stats["sessions_peak"]) == (
            3,
            1,
            2,
        )


def test_the_one_session_rule_can_be_turned_off_for_a_baseline(sim: KisSimulator) -> None:
    with RealtimeSimulator(sim, one_session=False) as rt:
        with connect(rt.ws_url) as a, connect(rt.ws_url) as b:
            assert parse_reply(_register(a, _approval(sim), "H0STCNT0", "005930")).ok
            assert parse_reply(_register(b, _approval(sim), "H0STCNT0", "005930")).ok
            assert rt.push("H0STCNT0", "005930") == 2
        assert rt.stats()["sessions_peak"] == 2


def test_the_42nd_registration_of_a_session_is_refused(sim: KisSimulator) -> None:
    key = _approval(sim)
    with RealtimeSimulator(sim) as rt, connect(rt.ws_url) as ws:
        codes = [
            parse_reply(_register(ws, key, "H0STCNT0", f"{n:06d}")).code
            for n in range(SESSION_LIMIT + 1)
        ]
        assert codes == ["OPSP0000"] * SESSION_LIMIT + ["OPSP0008"]
        assert parse_reply(_register(ws, key, "H0STCNT0", "000000")).code == "OPSP0002"
        assert rt.stats()["registrations"] == SESSION_LIMIT


def test_an_unknown_approval_key_registers_nothing(sim: KisSimulator) -> None:
    with RealtimeSimulator(sim) as rt, connect(rt.ws_url) as ws:
        assert parse_reply(_register(ws, "not-issued", "H0STCNT0", "005930")).code == "OPSP0011"
        assert rt.registered() == set() and rt.stats()["sessions_opened"] == 0


def test_a_message_that_is_not_json_is_answered_with_the_simulator_s_own_code(
    sim: KisSimulator,
) -> None:
    with RealtimeSimulator(sim) as rt, connect(rt.ws_url) as ws:
        ws.send("{not json")
        answer = parse_reply(str(ws.recv(timeout=10)))
        assert (answer.code, answer.ok) == (PARSE_ERROR, False)
        assert parse_reply(_register(ws, _approval(sim), "H0STCNT0", "005930")).ok  # still open
        assert rt.registered() == {("H0STCNT0", "005930")}


def test_pingpong_arrives_and_the_echo_is_counted(sim: KisSimulator) -> None:
    with RealtimeSimulator(sim, ping_interval_s=0.05) as rt, connect(rt.ws_url) as ws:
        ping = str(ws.recv(timeout=10))
        assert is_pingpong(ping) and json.loads(ping)["header"]["datetime"]
        ws.send(ping)
        assert rt.wait_for(lambda r: r.stats()["pongs"] >= 1)


def test_a_rate_pushes_frames_to_every_registered_pair(sim: KisSimulator) -> None:
    key = _approval(sim)
    with RealtimeSimulator(sim, rate=200) as rt, connect(rt.ws_url) as ws:
        assert parse_reply(_register(ws, key, "H0STCNT0", "005930")).ok
        seqs = [
            sequence_of(decode_frame(str(ws.recv(timeout=10)), 0.0)[0].fields) for _ in range(20)
        ]
        assert seqs == list(range(seqs[0], seqs[0] + 20))  # numbered, in order, none lost


def test_stopping_the_simulator_closes_the_sessions_still_open(sim: KisSimulator) -> None:
    key = _approval(sim)
    with ExitStack() as stack:
        rt = stack.enter_context(RealtimeSimulator(sim))
        ws = stack.enter_context(connect(rt.ws_url))
        assert parse_reply(_register(ws, key, "H0STCNT0", "005930")).ok
        rt.__exit__(None, None, None)
        stack.pop_all()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert rt.registered() == set()


def test_an_encrypted_tr_id_gets_a_key_at_registration_and_encrypted_frames(
    sim: KisSimulator,
) -> None:
    with RealtimeSimulator(sim) as rt, connect(rt.ws_url) as ws:
        reply = parse_reply(_register(ws, _approval(sim), "H0STCNI0", "user01"))
        assert reply.ok and reply.aes is not None and len(reply.aes[0]) == 32
        rt.push("H0STCNI0", "user01", records=2)
        frame = str(ws.recv(timeout=10))
        assert frame.startswith("1|H0STCNI0|002|") and "user01" not in frame
        events = decode_frame(frame, 0.0, {"H0STCNI0": reply.aes})
        assert [sequence_of(e.fields) for e in events] == [1, 2]
