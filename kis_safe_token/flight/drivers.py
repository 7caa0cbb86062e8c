"""The sync driver: the engine's steps performed with blocking calls; :func:`io_call` serves
the asyncio driver (:mod:`.aio`) too."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .._faults import fault_point
from ..token import Token
from .engine import (
    ATTEMPT,
    EXTEND,
    ISSUE,
    READ_FAILURE,
    RELEASE,
    Flight,
    Protocol,
    Read,
    RecordFailure,
    Save,
    Sleep,
    Step,
    Wait,
    noted,
)

__all__ = ["io_call", "run_sync"]


def io_call(flight: Flight, step: Step) -> Callable[[], Any]:
    """The call that performs an I/O step, the same for both drivers."""
    storage, key, secret, lock = flight.storage, flight.api_key, flight.api_secret, flight.lock
    if isinstance(step, Read):
        return partial(storage.read_token, key, secret, fresh=step.fresh)
    if step is ATTEMPT:
        return lock.attempt
    if step is READ_FAILURE:
        return partial(storage.read_failure, key, secret)
    if step is EXTEND:
        return lock.extend
    if step is RELEASE:
        return lock.release
    if isinstance(step, Save):
        return partial(_save, flight, step.token)
    if isinstance(step, RecordFailure):
        return partial(storage.write_failure, key, secret, step.failure)
    raise TypeError(f"not an I/O step: {step!r}")


def _save(flight: Flight, token: Token) -> None:
    storage = flight.storage
    flight.lock.save(partial(storage.write_token, flight.api_key, flight.api_secret), token)
    fault_point("storage.after_save")


def run_sync(flight: Flight, protocol: Protocol, issue: Callable[[], Token] | None = None) -> Any:
    """Perform ``protocol``'s steps with blocking calls; its result, or what it raised."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = protocol.send(reply) if error is None else protocol.throw(error)
        except StopIteration as done:
            return done.value
        reply, error = None, None
        try:
            if isinstance(step, Wait):
                reply = flight.lock.wait(step.busy, step.timeout_s)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            elif step is ISSUE:
                assert issue is not None
                flight.lock.issuing()
                reply = issue()
            else:
                reply = io_call(flight, step)()
        except BaseException as exc:  # noqa: BLE001 - thrown into the protocol, which decides
            error = noted(flight, exc)
