"""KIS's realtime wire format, free of I/O: what the leader sends and what it decodes.

Text frames come in two kinds. Control messages are JSON: a registration's reply (with the AES
key and iv of an encrypted pair), an error (``OPSP8996`` for a second session of one app key)
and the ``PINGPONG`` heartbeat, which the client must echo back. Data frames are
``<encrypted 0|1>|<tr_id>|<record count>|<fields joined by ^>``: several records of one pair
in one frame, each the same number of fields; an encrypted frame's last part is base64 of
AES-256-CBC (PKCS#7) with the key and iv of that tr_id's registration.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SESSION_LIMIT",
    "FrameError",
    "RealtimeEvent",
    "Reply",
    "decode_frame",
    "encode_records",
    "is_pingpong",
    "parse_reply",
    "register_message",
]

#: Registrations (tr_id + tr_key pairs) KIS allows on one session.
SESSION_LIMIT = 41


class FrameError(ValueError):
    """A frame that is not KIS's format (the message names the part, never the payload)."""


@dataclass(frozen=True, slots=True)
class RealtimeEvent:
    """One record of a data frame: ``fields`` as KIS sent them, in order (for ``H0STCNT0``,
    ``fields[0]`` is the stock code, ``fields[1]`` the time, ``fields[2]`` the price);
    ``received_at`` is when the fleet's session received it (``time.time()``).

    A ``gap`` event has no fields: events of this pair may have been missed here (the session
    moved to another process or reconnected, or this subscriber fell behind)."""

    tr_id: str
    tr_key: str
    fields: tuple[str, ...]
    received_at: float
    gap: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """KIS's answer to a registration, or an error it sends on the session."""

    tr_id: str
    tr_key: str
    code: str  # msg_cd: OPSP0000 registered, OPSP0001 deregistered, OPSP8996 key in use, ...
    message: str
    ok: bool
    aes: tuple[bytes, bytes] | None = None  # (key, iv) of an encrypted pair


def register_message(approval_key: str, tr_id: str, tr_key: str, *, register: bool = True) -> str:
    """The JSON text that registers (``tr_type`` 1) or deregisters (2) one pair."""
    return json.dumps(
        {
            "header": {
                "approval_key": approval_key,
                "custtype": "P",
                "tr_type": "1" if register else "2",
                "content-type": "utf-8",
            },
            "body": {"input": {"tr_id": tr_id, "tr_key": tr_key}},
        },
        separators=(",", ":"),
    )


def is_pingpong(text: str) -> bool:
    """Whether ``text`` is KIS's heartbeat, which the client sends back unchanged."""
    if not text.startswith("{") or '"PINGPONG"' not in text:
        return False  # the cheap test first: data frames are most of the traffic
    return _header(text).get("tr_id") == "PINGPONG"


def parse_reply(text: str) -> Reply:
    """A control message (JSON) as a :class:`Reply`."""
    message = _json(text)
    header, body = message.get("header") or {}, message.get("body") or {}
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise FrameError("a control message without a header or body object")
    output = body.get("output") or {}
    aes = None
    if isinstance(output, dict) and output.get("key") and output.get("iv"):
        aes = (str(output["key"]).encode(), str(output["iv"]).encode())
    return Reply(
        tr_id=str(header.get("tr_id", "")),
        tr_key=str(header.get("tr_key", "")),
        code=str(body.get("msg_cd", "")),
        message=str(body.get("msg1", "")),
        ok=str(body.get("rt_cd", "")) == "0",
        aes=aes,
    )


def decode_frame(
    text: str, received_at: float, keys: dict[str, tuple[bytes, bytes]] | None = None
) -> list[RealtimeEvent]:
    """The records of a data frame; ``keys`` maps an encrypted tr_id to its (key, iv)."""
    parts = text.split("|", 3)
    if len(parts) != 4 or parts[0] not in ("0", "1"):
        raise FrameError("a data frame is 'encrypted|tr_id|count|data'")
    encrypted, tr_id, count_text, data = parts
    if encrypted == "1":
        aes = (keys or {}).get(tr_id)
        if aes is None:
            raise FrameError(f"an encrypted frame of {tr_id!r} before its registration's key")
        data = _decrypt(data, *aes)
    try:
        count = int(count_text)
    except ValueError:
        raise FrameError("a data frame's record count is not a number") from None
    fields = data.split("^")
    if count < 1 or len(fields) % count:
        raise FrameError(f"{len(fields)} fields do not split into {count} records")
    width = len(fields) // count
    return [
        RealtimeEvent(tr_id, fields[i], tuple(fields[i : i + width]), received_at)
        for i in range(0, len(fields), width)
    ]


def encode_records(
    tr_id: str, records: Iterable[Sequence[str]], aes: tuple[bytes, bytes] | None = None
) -> str:
    """A data frame of ``records`` (each the same width), plain or encrypted with ``aes``'s
    (key, iv) (the simulator's side, and the leader's to pass a decrypted frame on)."""
    rows = [list(record) for record in records]
    if not rows or len({len(row) for row in rows}) != 1:
        raise ValueError("a frame needs one or more records of the same number of fields")
    data = "^".join(field for row in rows for field in row)
    if aes is None:
        return f"0|{tr_id}|{len(rows):03d}|{data}"
    return f"1|{tr_id}|{len(rows):03d}|{_encrypt(data, *aes)}"


def _encrypt(data: str, key: bytes, iv: bytes) -> str:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    padder = padding.PKCS7(128).padder()
    padded = padder.update(data.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


def _decrypt(data: str, key: bytes, iv: bytes) -> str:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    try:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(base64.b64decode(data, validate=True)) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        return (unpadder.update(padded) + unpadder.finalize()).decode()
    except ValueError:  # bad base64, key size, block size or padding
        raise FrameError("an encrypted frame that does not decrypt with its key") from None


def _json(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except ValueError:
        raise FrameError("a control message that is not JSON") from None
    if not isinstance(message, dict):
        raise FrameError("a control message that is not a JSON object")
    return message


def _header(text: str) -> dict[str, Any]:
    try:
        header = _json(text).get("header")
    except FrameError:
        return {}
    return header if isinstance(header, dict) else {}
