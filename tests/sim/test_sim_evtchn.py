"""Event channels on the simulated host, between real processes.

The guest's handle (gblk.sim.hypervisor.evtchn.SimEventChannel acting for a domU) lives in a
child process driven over a pipe; the backend's handle lives here and waits the
way the engine does, with gevent on the handle's fd. Semantics under test are
libxenevtchn's: a fired port is masked until unmasked, events on a masked port are
remembered once and re-delivered by unmask.
"""

from __future__ import annotations

import itertools
import os
import select
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import gevent
import gevent.select
import gevent.socket
import pytest

from gblk.errors import EventChannelError
from gblk.sim.hypervisor.evtchn import (
    ECS_FREE,
    ECS_INTERDOMAIN,
    ECS_UNBOUND,
    F_FIRED,
    F_MASKED,
    SimEventChannel,
    _evtchn_dir,
    _PortTable,
    close_domain_ports,
    read_port,
)

from ..integration.child_support import REPLY_DEADLINE, Child, child_fixture  # noqa: F401 - a fixture

#: a hang guard, not a performance assertion
WAIT_DEADLINE = 30.0
_domids = itertools.count(1)


# --- the guest's side, in a child process -------------------------------------------

class Agent:
    """What the child can be asked to do (one JSON request per line)."""

    def __init__(self) -> None:
        self.ch: Optional[SimEventChannel] = None

    def open(self, dir: str, domid: int) -> int:
        self.ch = SimEventChannel(dir, domid)
        return os.getpid()

    def call(self, method: str, *args: Any) -> Any:
        assert self.ch is not None
        return getattr(self.ch, method)(*args)

    def readable(self) -> bool:
        assert self.ch is not None
        return bool(select.select([self.ch.fileno()], [], [], 0)[0])

    def drain(self) -> List[int]:
        """Every port pending now (after the fd said so), unmasking none."""
        assert self.ch is not None
        out: List[int] = []
        port = self.ch.pending()
        while port is not None:
            out.append(port)
            port = self.ch.pending()
        return out

    def echo(self, port: int, rounds: int) -> int:
        """Wait for an event on ``port``, unmask, notify back; ``rounds`` times."""
        assert self.ch is not None
        for _ in range(rounds):
            got = None
            while got is None:
                ready, _, _ = select.select([self.ch.fileno()], [], [], WAIT_DEADLINE)
                assert ready, "echo: no event"
                got = self.ch.pending()
            assert got == port, got
            self.ch.unmask(port)
            self.ch.notify(port)
        return rounds

    def storm(self, port: int, count: int) -> int:
        assert self.ch is not None
        for _ in range(count):
            self.ch.notify(port)
        return self.ch.wakeups_sent

    def stats(self) -> Dict[str, int]:
        assert self.ch is not None
        return {"notifications_sent": self.ch.notifications_sent,
                "wakeups_sent": self.ch.wakeups_sent}


@pytest.fixture
def pair(tmp_path: Path, child: Child) -> Iterator[Dict[str, Any]]:
    """Guest domain d (handle in the child) with an unbound port for dom0, and the
    backend's handle here, bound to it, with the bind-time event consumed."""
    d = next(_domids)
    child.call("open", str(tmp_path), d)
    gport = child.call("call", "alloc_unbound", 0)
    back = SimEventChannel(str(tmp_path), 0)
    bport = back.bind_interdomain(d, gport)
    # Xen marks a freshly bound port pending (a notification may have been lost)
    assert _readable(back) and back.pending() == bport and back.pending() is None
    back.unmask(bport)
    yield {"dir": str(tmp_path), "d": d, "gport": gport, "back": back, "bport": bport,
           "guest": child}
    back.close()
    child.call("call", "close")


def _readable(ch: SimEventChannel) -> bool:
    return bool(select.select([ch.fileno()], [], [], 0)[0])


def _wait(ch: SimEventChannel) -> int:
    """What the engine does: sleep on the fd with gevent, then take the port."""
    while True:
        gevent.socket.wait_read(ch.fileno(), timeout=WAIT_DEADLINE)
        port = ch.pending()
        if port is not None:
            return port


# --- tests ---------------------------------------------------------------------------

def test_ping_pong_between_processes(pair):
    """Notifications flow both ways between two processes, each side waking on its
    handle's fd (gevent's wait_read here, select() in the guest), 200 round trips."""
    back, bport, g = pair["back"], pair["bport"], pair["guest"]
    rounds = 200
    g.send("echo", pair["gport"], rounds)
    for _ in range(rounds):
        back.notify(bport)
        assert _wait(back) == bport
        back.unmask(bport)
    assert g.reply("echo") == rounds
    assert back.pending() is None and not _readable(back)


def test_fd_works_with_gevent_select(pair):
    """The fd is an ordinary pollable fd: gevent.select.select sees it readable only
    while something is pending."""
    back, g = pair["back"], pair["guest"]
    assert gevent.select.select([back.fileno()], [], [], 0)[0] == []
    g.call("call", "notify", pair["gport"])
    assert gevent.select.select([back.fileno()], [], [], WAIT_DEADLINE)[0] == [back.fileno()]
    assert back.pending() == pair["bport"]
    assert gevent.select.select([back.fileno()], [], [], 0)[0] == []


def test_masked_port_remembers_one_event_and_unmask_redelivers(pair):
    """A port that fired stays masked until unmask; events meanwhile are remembered
    once (not lost, not duplicated) and delivered again by unmask."""
    back, bport, g, gport = pair["back"], pair["bport"], pair["guest"], pair["gport"]
    g.call("call", "notify", gport)
    assert back.pending() == bport
    assert read_port(pair["dir"], 0, bport).flags & F_MASKED
    g.call("call", "notify", gport)
    g.call("call", "notify", gport)
    assert back.pending() is None and not _readable(back)
    back.unmask(bport)
    assert _readable(back)
    assert back.pending() == bport
    assert back.pending() is None
    back.unmask(bport)
    assert back.pending() is None and not _readable(back)


def test_notify_storm_collapses_into_one_pending_event(pair):
    """XSA-332: 20000 notifications while the backend is busy cost it one wake-up
    and one pending event (plus one re-delivery on unmask), not 20000."""
    back, bport, g, gport = pair["back"], pair["bport"], pair["guest"], pair["gport"]
    wakeups = g.call("storm", gport, 20000)
    assert wakeups == 1
    assert back.pending() == bport
    assert back.pending() is None
    back.unmask(bport)
    assert back.pending() == bport
    back.unmask(bport)
    assert back.pending() is None and not _readable(back)


def test_several_ports_on_one_handle_each_delivered_once(tmp_path, child):
    """One handle with many ports (multi-queue): every port that fired is returned
    once, and the fd stays readable until the last one was taken."""
    d = next(_domids)
    child.call("open", str(tmp_path), d)
    back = SimEventChannel(str(tmp_path), 0)
    gports = [child.call("call", "alloc_unbound", 0) for _ in range(16)]
    bports = [back.bind_interdomain(d, p) for p in gports]
    got: List[int] = []
    while _readable(back):
        port = back.pending()
        if port is not None:
            got.append(port)
    assert sorted(got) == sorted(bports)  # the bind-time events
    for p in bports:
        back.unmask(p)
    for p in gports:
        child.call("call", "notify", p)
    got = []
    while _readable(back):
        port = back.pending()
        if port is not None:
            got.append(port)
    assert sorted(got) == sorted(bports)
    back.close()
    child.call("call", "close")


def test_backend_notifies_the_guest(pair):
    """The other direction: the guest's handle in the child receives the backend's
    event, masked until the guest unmasks."""
    back, g, gport = pair["back"], pair["guest"], pair["gport"]
    back.notify(pair["bport"])
    assert g.call("readable") is True
    assert g.call("drain") == [gport]
    back.notify(pair["bport"])
    assert g.call("drain") == []
    g.call("call", "unmask", gport)
    assert g.call("drain") == [gport]


def test_unbind_and_close_clean_up_and_allow_reconnect(pair):
    """unbind returns the guest's port to unbound (reserved for dom0) so the backend
    can bind it again (reconnect); the guest closing its handle frees its ports and
    leaves the backend's port unbound, where notifications are dropped quietly."""
    back, bport, g, gport, dir, d = (pair[k] for k in ("back", "bport", "guest", "gport",
                                                        "dir", "d"))
    back.unbind(bport)
    assert read_port(dir, 0, bport).state == ECS_FREE
    rec = read_port(dir, d, gport)
    assert (rec.state, rec.remote_domid, rec.remote_port) == (ECS_UNBOUND, 0, 0)
    with pytest.raises(EventChannelError):
        back.notify(bport)
    assert back.bound_ports() == []
    again = back.bind_interdomain(d, gport)
    assert read_port(dir, d, gport).state == ECS_INTERDOMAIN
    back.pending()
    back.unmask(again)
    g.call("call", "close")
    assert read_port(dir, d, gport).state == ECS_FREE
    rec = read_port(dir, 0, again)
    assert (rec.state, rec.remote_domid) == (ECS_UNBOUND, d)
    back.notify(again)  # dropped, as Xen drops notifications on an unbound port
    back.close()
    assert read_port(dir, 0, again).state == ECS_FREE
    back.close()  # idempotent
    with pytest.raises(EventChannelError):
        back.pending()


def test_binding_errors(tmp_path, child):
    """bind_interdomain refuses a port that is not unbound or is reserved for another
    domain, and a handle cannot notify, unmask or unbind ports it does not own."""
    d = next(_domids)
    child.call("open", str(tmp_path), d)
    back = SimEventChannel(str(tmp_path), 0)
    other = SimEventChannel(str(tmp_path), 0)
    try:
        with pytest.raises(EventChannelError, match="not unbound"):
            back.bind_interdomain(d, 5)  # never allocated
        with pytest.raises(EventChannelError, match="no such port"):
            back.bind_interdomain(d, 0)
        for_d7 = child.call("call", "alloc_unbound", 7)
        with pytest.raises(EventChannelError, match="reserved for d7"):
            back.bind_interdomain(d, for_d7)
        gport = child.call("call", "alloc_unbound", 0)
        bport = back.bind_interdomain(d, gport)
        with pytest.raises(EventChannelError, match="not unbound"):
            other.bind_interdomain(d, gport)  # already bound
        for op in (other.notify, other.unmask, other.unbind):
            with pytest.raises(EventChannelError, match="not bound by this handle"):
                op(bport)
        unbound = child.call("call", "alloc_unbound", 0)
        child.call("call", "notify", unbound)  # nobody bound yet: silently dropped
    finally:
        back.close()
        other.close()
        child.call("call", "close")


def test_destroyed_domain_ports_are_closed(tmp_path, child):
    """When a domain is destroyed its ports close and the backend's end goes back to
    unbound (what Xen does in domain_kill), so the backend sees a dead channel, not
    a crash."""
    d = next(_domids)
    child.call("open", str(tmp_path), d)
    gport = child.call("call", "alloc_unbound", 0)
    back = SimEventChannel(str(tmp_path), 0)
    bport = back.bind_interdomain(d, gport)
    close_domain_ports(str(tmp_path), d)
    assert read_port(str(tmp_path), d, gport).state == ECS_FREE
    assert read_port(str(tmp_path), 0, bport)[:3] == (ECS_UNBOUND, F_MASKED | F_FIRED, d)
    back.notify(bport)
    back.unbind(bport)
    back.close()
    child.call("call", "close")  # its ports are already gone: close is quiet


def test_dead_peer_process_does_not_break_notify(tmp_path):
    """A guest process that dies without closing leaves its ports bound to a handle
    whose socket is gone: the backend's notify is a no-op, never an exception."""
    d = next(_domids)
    c = Child(__name__)
    try:
        pid = c.call("open", str(tmp_path), d)
        gport = c.call("call", "alloc_unbound", 0)
        back = SimEventChannel(str(tmp_path), 0)
        bport = back.bind_interdomain(d, gport)
        os.kill(pid, 9)
        c.proc.wait(timeout=REPLY_DEADLINE)
    finally:
        c.close()
    back.notify(bport)
    back.notify(bport)
    back.close()


def test_binding_of_a_killed_backend_is_released_for_its_successor(tmp_path):
    """A backend process killed with SIGKILL never unbinds; as the kernel's evtchn
    driver closes a dead process's ports, a restarted backend can bind the guest's
    port again, and notifications flow between the guest and the new backend. A
    binding whose handle is alive is never taken away."""
    d = next(_domids)
    guest = SimEventChannel(str(tmp_path), d)
    gport = guest.alloc_unbound(0)
    dead = Child(__name__)
    try:
        pid = dead.call("open", str(tmp_path), 0)
        dead.call("call", "bind_interdomain", d, gport)
        live = SimEventChannel(str(tmp_path), 0)
        with pytest.raises(EventChannelError, match="not unbound"):
            live.bind_interdomain(d, gport)  # its owner still runs
        os.kill(pid, 9)
        dead.proc.wait(timeout=REPLY_DEADLINE)
    finally:
        dead.close()
    bport = live.bind_interdomain(d, gport)
    assert read_port(str(tmp_path), d, gport)[:4] == (ECS_INTERDOMAIN, 0, 0, bport)
    assert live.pending() == bport  # the bind-time event
    live.unmask(bport)
    guest.notify(gport)
    assert _wait(live) == bport
    live.close()
    guest.close()


def test_greenlets_wait_on_several_handles(tmp_path, child):
    """Two backend handles waited on by two greenlets in one hub: each wakes for its
    own port only."""
    d = next(_domids)
    child.call("open", str(tmp_path), d)
    gports = [child.call("call", "alloc_unbound", 0) for _ in range(2)]
    handles = [SimEventChannel(str(tmp_path), 0) for _ in range(2)]
    bports = [h.bind_interdomain(d, p) for h, p in zip(handles, gports)]
    for h, p in zip(handles, bports):
        assert h.pending() == p
        h.unmask(p)
    jobs = [gevent.spawn(_wait, h) for h in handles]
    gevent.sleep(0)
    child.call("call", "notify", gports[1])
    assert jobs[1].get(timeout=WAIT_DEADLINE) == bports[1]
    assert not jobs[0].ready()
    child.call("call", "notify", gports[0])
    assert jobs[0].get(timeout=WAIT_DEADLINE) == bports[0]
    for h in handles:
        h.close()
    child.call("call", "close")


def test_an_event_half_delivered_by_a_killed_backend_is_woken_by_its_successor(tmp_path):
    """Xen delivers an event in one hypercall; the simulated host in two steps (mark
    the guest's port fired, then send its handle a wake-up). A backend SIGKILLed
    between the two leaves the port fired with no wake-up, and every later notify
    sees "fired" and sends none: the guest would sleep on its responses for good
    (the 120-kill restart runs caught it). The successor's bind sends that wake-up."""
    d = next(_domids)
    guest = SimEventChannel(str(tmp_path), d)
    gport = guest.alloc_unbound(0)
    dead = Child(__name__)
    try:
        pid = dead.call("open", str(tmp_path), 0)
        dead.call("call", "bind_interdomain", d, gport)
        table = _PortTable(_evtchn_dir(str(tmp_path)), d)
        try:  # what the dead notifier's first step left: masked + fired
            with table.locked():
                table.put(gport, table.get(gport)._replace(flags=F_MASKED | F_FIRED))
        finally:
            table.close()
        os.kill(pid, 9)
        dead.proc.wait(timeout=REPLY_DEADLINE)
    finally:
        dead.close()
    assert guest.pending() is None  # no wake-up came: the guest does not look
    live = SimEventChannel(str(tmp_path), 0)
    bport = live.bind_interdomain(d, gport)
    live.notify(bport)  # the successor's takeover notify alone would not wake it
    assert _wait(guest) == gport
    guest.unmask(gport)
    live.close()
    guest.close()
