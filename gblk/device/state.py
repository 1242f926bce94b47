"""The backend's XenBus state machine as a pure function (docs/protocol.md §5).

``decide`` looks only at the *current* values (watches coalesce and can fire with
no change) and returns the one next step; the device applies it and asks again
until the answer is NONE.
"""

from __future__ import annotations

import enum
from typing import Optional

from ..blkif.const import XenbusState as S


class Action(enum.Enum):
    NONE = "none"
    INIT_WAIT = "init-wait"  # open storage, write the early nodes, go InitWait
    CONNECT = "connect"  # map rings, bind channels, write connect nodes, go Connected
    CLOSING = "closing"  # go Closing, keep serving
    CLOSE = "close"  # stop rings (answer in-flight IO), unmap, unbind, go Closed
    RECONNECT = "reconnect"  # (close if attached, then) go InitWait again
    REMOVE = "remove"  # release everything; the device object ends


def decide(
    backend: Optional[int],
    frontend: Optional[int],
    online: bool,
    attached: bool,
) -> Action:
    """backend/frontend: the ``state`` nodes (None: node or directory missing);
    attached: whether this process serves rings for the device right now."""
    if backend is None:
        return Action.REMOVE  # backend directory removed: tear down at once
    if frontend is None or frontend in (S.UNKNOWN, S.CLOSED):
        if attached or backend not in (S.CLOSED,):
            if backend == S.INITIALISING and frontend is not None and frontend == S.CLOSED and online:
                return Action.INIT_WAIT  # a fresh device whose frontend has not started
            return Action.CLOSE
        return Action.NONE if online else Action.REMOVE
    if backend == S.INITIALISING:
        return Action.INIT_WAIT if online else Action.CLOSE
    if not online and frontend == S.INITIALISING:
        # unplug of an inactive frontend: straight to Closed, then remove
        return Action.CLOSE if attached or backend != S.CLOSED else Action.REMOVE
    if frontend == S.INITIALISING:
        # guest reboot, driver reload, kexec; also a guest that reset while no gblk
        # ran (backend still Connected in XenStore, nothing attached here)
        if attached or backend in (S.CLOSED, S.CONNECTED, S.CLOSING):
            return Action.RECONNECT
        return Action.NONE
    if frontend in (S.INITIALISED, S.CONNECTED):
        if attached:
            return Action.NONE
        if not online and backend in (S.CLOSING, S.CLOSED):
            return Action.CLOSE if backend != S.CLOSED else Action.NONE
        if backend in (S.INIT_WAIT, S.INITIALISED, S.CONNECTED):
            return Action.CONNECT  # also a takeover after a daemon restart
        return Action.NONE  # we closed; wait for the frontend to notice
    if frontend == S.CLOSING:
        if backend in (S.CLOSING, S.CLOSED):
            return Action.NONE
        return Action.CLOSING
    return Action.NONE
