"""The backend's XenBus state machine (gblk.device.state.decide), row by row from the
table of docs/protocol.md §5, plus the property the device's loop relies on: applying the
answers one after the other always settles (NONE or REMOVE) within a few steps.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest

from gblk.blkif.const import XenbusState as S
from gblk.device.state import Action, decide

A = Action
ON, OFF = True, False

# (backend, frontend, online, attached) -> action; each id names the §5 row
ROWS = [
    # backend dir appears
    pytest.param(S.INITIALISING, S.INITIALISING, ON, False, A.INIT_WAIT,
                 id="new-device-goes-initwait"),
    pytest.param(S.INIT_WAIT, S.INITIALISING, ON, False, A.NONE,
                 id="initwait-waits-for-frontend"),
    # frontend Initialised or Connected, backend not Connected
    pytest.param(S.INIT_WAIT, S.INITIALISED, ON, False, A.CONNECT,
                 id="frontend-initialised-connect"),
    pytest.param(S.INIT_WAIT, S.CONNECTED, ON, False, A.CONNECT,
                 id="frontend-connected-early-connect"),
    pytest.param(S.INITIALISING, S.INITIALISED, ON, False, A.INIT_WAIT,
                 id="frontend-skipped-initwait-first-step-initwait"),
    # frontend Connected while backend Connected
    pytest.param(S.CONNECTED, S.CONNECTED, ON, True, A.NONE,
                 id="connected-coalesced-watch-nothing"),
    pytest.param(S.CONNECTED, S.INITIALISED, ON, True, A.NONE,
                 id="connected-frontend-still-initialised-nothing"),
    # takeover after a daemon restart
    pytest.param(S.CONNECTED, S.CONNECTED, ON, False, A.CONNECT,
                 id="takeover-backend-connected-frontend-connected-not-attached"),
    pytest.param(S.CONNECTED, S.INITIALISED, ON, False, A.CONNECT,
                 id="takeover-frontend-initialised"),
    # frontend Closing
    pytest.param(S.CONNECTED, S.CLOSING, ON, True, A.CLOSING,
                 id="frontend-closing-backend-closing-keeps-serving"),
    pytest.param(S.CLOSING, S.CLOSING, ON, True, A.NONE, id="both-closing-wait"),
    pytest.param(S.INIT_WAIT, S.CLOSING, ON, False, A.CLOSING,
                 id="frontend-closing-before-connect"),
    # frontend Closed, missing or Unknown
    pytest.param(S.CLOSING, S.CLOSED, ON, True, A.CLOSE, id="frontend-closed-close"),
    pytest.param(S.CONNECTED, S.CLOSED, ON, True, A.CLOSE,
                 id="frontend-closed-without-closing-close"),
    pytest.param(S.CONNECTED, S.UNKNOWN, ON, True, A.CLOSE, id="frontend-unknown-close"),
    pytest.param(S.CONNECTED, None, ON, True, A.CLOSE, id="vanished-frontend-close"),
    pytest.param(S.CLOSED, None, ON, False, A.NONE, id="vanished-frontend-closed-online-wait"),
    pytest.param(S.CLOSED, None, OFF, False, A.REMOVE, id="vanished-frontend-closed-offline-remove"),
    pytest.param(S.CLOSED, S.CLOSED, ON, False, A.NONE, id="both-closed-online-wait"),
    pytest.param(S.CLOSED, S.CLOSED, OFF, False, A.REMOVE, id="both-closed-offline-remove"),
    # frontend back to Initialising while backend Closed and online: reconnect
    pytest.param(S.CLOSED, S.INITIALISING, ON, False, A.RECONNECT,
                 id="reconnect-after-guest-reboot"),
    pytest.param(S.CONNECTED, S.INITIALISING, ON, True, A.RECONNECT,
                 id="reconnect-frontend-reset-while-attached"),
    pytest.param(S.CLOSED, S.CONNECTED, ON, False, A.NONE,
                 id="closed-waits-for-frontend-to-notice"),
    # toolstack unplug: online=0 + backend state=5
    pytest.param(S.CLOSING, S.CONNECTED, OFF, True, A.NONE,
                 id="unplug-active-frontend-keeps-serving"),
    pytest.param(S.CLOSING, S.CLOSING, OFF, True, A.NONE,
                 id="unplug-active-frontend-closing-wait"),
    pytest.param(S.CLOSING, S.CLOSED, OFF, True, A.CLOSE, id="unplug-active-frontend-closed-close"),
    pytest.param(S.CLOSED, S.CLOSED, OFF, False, A.REMOVE, id="unplug-after-close-remove"),
    pytest.param(S.CLOSING, S.INITIALISING, OFF, False, A.CLOSE,
                 id="unplug-inactive-frontend-straight-to-closed"),
    pytest.param(S.CLOSED, S.INITIALISING, OFF, False, A.REMOVE,
                 id="unplug-inactive-frontend-closed-remove"),
    pytest.param(S.INITIALISING, S.INITIALISING, OFF, False, A.CLOSE,
                 id="unplug-before-initwait-close"),
    pytest.param(S.CLOSING, S.CONNECTED, OFF, False, A.CLOSE,
                 id="unplug-not-attached-frontend-connected-close"),
    # backend dir removed
    pytest.param(None, S.CONNECTED, ON, True, A.REMOVE, id="backend-dir-removed-attached"),
    pytest.param(None, None, OFF, False, A.REMOVE, id="backend-dir-removed-everything-gone"),
    pytest.param(None, S.INITIALISING, ON, False, A.REMOVE, id="backend-dir-removed-idle"),
]


@pytest.mark.parametrize("backend, frontend, online, attached, expected", ROWS)
def test_decide_table(backend: Optional[int], frontend: Optional[int], online: bool,
                      attached: bool, expected: Action) -> None:
    """One row of docs/protocol.md §5 (the test id names it): decide() returns the step the
    backend must take for the current values."""
    assert decide(backend, frontend, online, attached) is expected


def apply(action: Action, backend: Optional[int], attached: bool) -> Tuple[Optional[int], bool]:
    """What the device does for each action (gblk.device.device._apply)."""
    if action is A.INIT_WAIT:
        return S.INIT_WAIT, attached
    if action is A.CONNECT:
        return S.CONNECTED, True
    if action is A.CLOSING:
        return S.CLOSING, attached
    if action is A.CLOSE:
        return S.CLOSED, False
    if action is A.RECONNECT:
        return S.INIT_WAIT, False
    raise AssertionError(action)


def run(backend: Optional[int], frontend: Optional[int], online: bool, attached: bool,
        steps: int = 8) -> List[Action]:
    """Apply decide() until NONE/REMOVE, as the device's evaluation loop does (it gives
    up after 8 steps)."""
    seen: List[Action] = []
    for _ in range(steps):
        action = decide(backend, frontend, online, attached)
        seen.append(action)
        if action in (A.NONE, A.REMOVE):
            return seen
        backend, attached = apply(action, backend, attached)
    raise AssertionError(f"no fixed point after {steps} steps: {[a.value for a in seen]}")


STATES: List[Optional[int]] = [None] + [int(s) for s in S]


@pytest.mark.parametrize("online", [ON, OFF], ids=["online", "offline"])
def test_every_combination_settles(online: bool) -> None:
    """For every backend/frontend state (or missing node) and attachment, applying the
    answers settles on NONE or REMOVE within a few steps. A pair of values that keeps
    answering CLOSE rewrites state=6 forever: each write fires the device's own watch,
    so the device spins on XenStore until the toolstack removes the directory."""
    for b in STATES:
        for f in STATES:
            for attached in (False, True):
                run(b, f, online, attached)


def test_unplug_of_an_inactive_frontend_settles() -> None:
    """online=0 with the frontend still Initialising (the guest never started its
    driver): straight to Closed, then the device is removed, in two steps."""
    assert run(S.CLOSING, S.INITIALISING, OFF, False) == [A.CLOSE, A.REMOVE]
    assert run(S.INITIALISING, S.INITIALISING, OFF, False) == [A.CLOSE, A.REMOVE]


def test_frontend_skipping_initwait_connects_in_two_steps() -> None:
    """A frontend that goes Initialised before we reached InitWait is tolerated."""
    assert run(S.INITIALISING, S.INITIALISED, ON, False) == [A.INIT_WAIT, A.CONNECT, A.NONE]


def test_guest_reboot_cycle() -> None:
    """Connected -> frontend Closing -> Closed -> Initialising -> Initialised: the
    backend follows to Closing, Closed, InitWait and Connected again."""
    b: Optional[int] = S.CONNECTED
    att = True
    trail = []
    for f in (S.CLOSING, S.CLOSED, S.INITIALISING, S.INITIALISED, S.CONNECTED):
        for action in run(b, f, ON, att):
            if action not in (A.NONE, A.REMOVE):
                b, att = apply(action, b, att)
                trail.append(action)
    assert trail == [A.CLOSING, A.CLOSE, A.RECONNECT, A.CONNECT]
    assert (b, att) == (S.CONNECTED, True)


def test_coalesced_watch_events_are_idempotent() -> None:
    """Watches coalesce and fire with no change: asking again with the same values
    after applying the answer gives NONE (no second connect, no double close)."""
    for b, f, att in ((S.INIT_WAIT, S.INITIALISED, False), (S.CONNECTED, S.CLOSED, True)):
        seq = run(b, f, ON, att)
        assert seq[-1] is A.NONE
        assert seq.count(A.CONNECT) <= 1 and seq.count(A.CLOSE) <= 1
