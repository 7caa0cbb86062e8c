"""KIS's realtime wire format: registration, heartbeat, replies and data frames (plain and
AES-encrypted), decoded without a socket."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kis_safe_token.realtime.frames import (
    FrameError,
    RealtimeEvent,
    decode_frame,
    encode_records,
    is_pingpong,
    parse_reply,
    register_message,
)

TRADE = ("005930", "093354", "71900", "2", "-100")  # code, time, price, sign, change


def _encrypt(plain: str, key: bytes, iv: bytes) -> str:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


def test_register_and_deregister_messages_carry_the_approval_key_and_the_pair() -> None:
    on = json.loads(register_message("approval-1", "H0STCNT0", "005930"))
    off = json.loads(register_message("approval-1", "H0STCNT0", "005930", register=False))
    assert on["header"] == {
        "approval_key": "approval-1",
        "custtype": "P",
        "tr_type": "1",
        "content-type": "utf-8",
    }
    assert on["body"] == {"input": {"tr_id": "H0STCNT0", "tr_key": "005930"}}
    assert off["header"]["tr_type"] == "2"


def test_pingpong_is_told_from_replies_and_data() -> None:
    ping = '{"header":{"tr_id":"PINGPONG","datetime":"20261204093000"}}'
    assert is_pingpong(ping)
    assert not is_pingpong('{"header":{"tr_id":"H0STCNT0","tr_key":"PINGPONG"}}')
    assert not is_pingpong("0|H0STCNT0|001|PINGPONG^1")
    assert not is_pingpong('{"PINGPONG"')  # not JSON: not a heartbeat either


def test_a_registration_reply_gives_the_pair_and_its_aes_key() -> None:
    reply = parse_reply(
        json.dumps(
            {
                "header": {"tr_id": "H0STCNI0", "tr_key": "user1", "encrypt": "Y"},
                "body": {
                    "rt_cd": "0",
                    "msg_cd": "OPSP0000",
                    "msg1": "SUBSCRIBE SUCCESS",
                    "output": {"iv": "0123456789abcdef", "key": "k" * 32},
                },
            }
        )
    )
    assert (reply.tr_id, reply.tr_key, reply.code, reply.ok) == (
        "H0STCNI0",
        "user1",
        "OPSP0000",
        True,
    )
    assert reply.aes == (b"k" * 32, b"0123456789abcdef")


def test_a_second_session_is_an_error_reply_with_its_code() -> None:
    reply = parse_reply(
        '{"header":{"tr_id":"H0STCNT0","tr_key":"005930"},'
        '"body":{"rt_cd":"1","msg_cd":"OPSP8996","msg1":"ALREADY IN USE appkey"}}'
    )
    assert (reply.ok, reply.code, reply.message, reply.aes) == (
        False,
        "OPSP8996",
        "ALREADY IN USE appkey",
        None,
    )


def test_a_frame_of_several_records_gives_one_event_each() -> None:
    later = ("000660", "093355", "120500", "5", "-500")
    frame = encode_records("H0STCNT0", [TRADE, later])
    assert frame.startswith("0|H0STCNT0|002|005930^")
    assert decode_frame(frame, 12.5) == [
        RealtimeEvent("H0STCNT0", "005930", TRADE, 12.5),
        RealtimeEvent("H0STCNT0", "000660", later, 12.5),
    ]


def test_an_encrypted_frame_decodes_with_its_registrations_key() -> None:
    key, iv = os.urandom(32), os.urandom(16)
    frame = "1|H0STCNI0|001|" + _encrypt("^".join(TRADE), key, iv)
    [event] = decode_frame(frame, 1.0, {"H0STCNI0": (key, iv)})
    assert event.fields == TRADE
    with pytest.raises(FrameError, match="before its registration's key"):
        decode_frame(frame, 1.0)
    with pytest.raises(FrameError, match="does not decrypt") as wrong:
        decode_frame(frame, 1.0, {"H0STCNI0": (os.urandom(32), iv)})
    assert frame.split("|")[3] not in str(wrong.value)


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ("2|H0STCNT0|001|a^b", "encrypted|tr_id|count|data"),
        ("0|H0STCNT0|001", "encrypted|tr_id|count|data"),
        ("0|H0STCNT0|two|a^b", "not a number"),
        ("0|H0STCNT0|002|a^b^c", "3 fields do not split into 2 records"),
        ("0|H0STCNT0|000|a", "1 fields do not split into 0 records"),
    ],
)
def test_a_malformed_frame_is_a_frame_error(frame: str, says: str) -> None:
    with pytest.raises(FrameError, match=says.replace("|", r"\|")):
        decode_frame(frame, 0.0)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"header": 3}'])
def test_a_malformed_control_message_is_a_frame_error(text: str) -> None:
    with pytest.raises(FrameError):
        parse_reply(text)


def test_records_of_different_widths_make_no_frame() -> None:
    with pytest.raises(ValueError, match="same number of fields"):
        encode_records("H0STCNT0", [TRADE, TRADE[:3]])
    with pytest.raises(ValueError, match="same number of fields"):
        encode_records("H0STCNT0", [])
