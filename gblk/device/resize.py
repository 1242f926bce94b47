"""Noticing that a disk's image changed size, without looking at it while idle.

One ``ResizeWatcher`` per daemon tells each connected disk when its image may have
changed size, so the device re-reads the size then and only then (issue 16: a timed
check per idle disk cost 1.5% of a core at 64 disks):

- an image file: inotify (one instance, one fd for the daemon). ``truncate`` and
  ``fallocate`` raise IN_MODIFY, as do writes (the guests' own included), so the
  events of one image are coalesced: at most one call per ``COALESCE`` seconds, the
  last one after the last event;
- a block device (LVM ``lvextend``, a SAN LUN rescan): the kernel's uevents (a
  netlink socket, one for the daemon, opened with the first such disk): a "change"
  event of the device's major:minor (the kernel adds RESIZE=1 when its capacity
  changed).

``watch(path, rdev, callback)`` returns a token for ``unwatch`` or None when the image
cannot be watched (inotify or netlink unavailable, the watch limit reached): the
device then falls back to checking on a timer. Runs on the hub.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import struct
from typing import Callable, Dict, List, Optional, Set, Tuple

import gevent
import gevent.os
import gevent.socket

log = logging.getLogger("gblk.resize")

#: seconds: one call per image at most this often while its file keeps changing
COALESCE = 0.2
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)
_NETLINK_KOBJECT_UEVENT = 15

Callback = Callable[[], None]


def parse_uevent(data: bytes) -> Dict[str, str]:
    """The KEY=VALUE fields of one kernel uevent (after its "action@devpath" line)."""
    fields: Dict[str, str] = {}
    for part in data.split(b"\0")[1:]:
        key, sep, value = part.partition(b"=")
        if sep:
            fields[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return fields


class _Inotify:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = int(fd)

    def add(self, path: str) -> int:
        wd = self._add(self.fd, os.fsencode(path), _IN_MODIFY | _IN_ATTRIB)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(wd)

    def remove(self, wd: int) -> None:
        self._rm(self.fd, wd)  # EINVAL when the file went: nothing to do

    def read(self) -> List[int]:
        data = gevent.os.nb_read(self.fd, 64 * 1024)
        wds: List[int] = []
        pos = 0
        while pos + _IN_EVENT.size <= len(data):
            wd, _mask, _cookie, length = _IN_EVENT.unpack_from(data, pos)
            wds.append(wd)
            pos += _IN_EVENT.size + length
        return wds

    def close(self) -> None:
        os.close(self.fd)


class ResizeWatcher:
    """The daemon's resize notifications (see the module docstring)."""

    def __init__(self) -> None:
        self._inotify: Optional[_Inotify] = None
        self._reader: Optional[gevent.Greenlet] = None
        self._by_wd: Dict[int, Set[int]] = {}
        self._uevents: Optional[socket.socket] = None
        self._uevent_reader: Optional[gevent.Greenlet] = None
        self._by_rdev: Dict[Tuple[int, int], Set[int]] = {}
        self._callbacks: Dict[int, Tuple[Callback, str, object]] = {}
        self._timers: Dict[int, gevent.Greenlet] = {}
        self._next = 1
        self.unavailable: Optional[str] = None

    @property
    def watched(self) -> int:
        return len(self._callbacks)

    def watch(self, path: str, callback: Callback) -> Optional[int]:
        """Call ``callback()`` (in a greenlet) when ``path`` may have changed size."""
        try:
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode):
                key: object = (os.major(st.st_rdev), os.minor(st.st_rdev))
                self._ensure_uevents()
                token = self._register(callback, "rdev", key)
                self._by_rdev.setdefault(key, set()).add(token)  # type: ignore[arg-type]
                return token
            if not stat.S_ISREG(st.st_mode):
                return None
            self._ensure_inotify()
            assert self._inotify is not None
            wd = self._inotify.add(path)  # the same wd for every disk on this inode
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EMFILE, errno.ENOSYS, errno.EPERM,
                           errno.EACCES, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT,
                           errno.ENOENT):
                log.warning("cannot watch %s for resizes (%s): checking it on a timer",
                            path, e.strerror or e)
                return None
            raise
        token = self._register(callback, "wd", wd)
        self._by_wd.setdefault(wd, set()).add(token)
        return token

    def unwatch(self, token: Optional[int]) -> None:
        """Idempotent."""
        if token is None:
            return
        entry = self._callbacks.pop(token, None)
        timer = self._timers.pop(token, None)
        if timer is not None:
            timer.kill(block=False)
        if entry is None:
            return
        _cb, kind, key = entry
        if kind == "wd":
            users = self._by_wd.get(key, set())  # type: ignore[call-overload]
            users.discard(token)
            if not users:
                self._by_wd.pop(key, None)  # type: ignore[call-overload]
                if self._inotify is not None:
                    self._inotify.remove(key)  # type: ignore[arg-type]
        else:
            users = self._by_rdev.get(key, set())  # type: ignore[call-overload]
            users.discard(token)
            if not users:
                self._by_rdev.pop(key, None)  # type: ignore[call-overload]
        self._close_unused()

    def close(self) -> None:
        for token in list(self._callbacks):
            self.unwatch(token)
        self._close_unused()

    # -- internals -----------------------------------------------------------------
    def _register(self, callback: Callback, kind: str, key: object) -> int:
        token = self._next
        self._next += 1
        self._callbacks[token] = (callback, kind, key)
        return token

    def _ensure_inotify(self) -> None:
        if self._inotify is None:
            self._inotify = _Inotify()
            self._reader = gevent.spawn(self._read_inotify)

    def _ensure_uevents(self) -> None:
        if self._uevents is None:
            sock = gevent.socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                        _NETLINK_KOBJECT_UEVENT)
            try:
                sock.bind((0, 1))  # group 1: the kernel's own events
            except OSError:
                sock.close()
                raise
            self._uevents = sock
            self._uevent_reader = gevent.spawn(self._read_uevents)

    def _close_unused(self) -> None:
        if not self._by_wd and self._inotify is not None:
            if self._reader is not None:
                self._reader.kill(block=False)
                self._reader = None
            self._inotify.close()
            self._inotify = None
        if not self._by_rdev and self._uevents is not None:
            if self._uevent_reader is not None:
                self._uevent_reader.kill(block=False)
                self._uevent_reader = None
            self._uevents.close()
            self._uevents = None

    def _read_inotify(self) -> None:
        inotify = self._inotify
        assert inotify is not None
        while True:
            try:
                wds = inotify.read()
            except OSError as e:
                log.error("inotify: %s; resizes of image files are no longer noticed", e)
                return
            for wd in set(wds):
                for token in list(self._by_wd.get(wd, ())):
                    self._soon(token)

    def _read_uevents(self) -> None:
        sock = self._uevents
        assert sock is not None
        while True:
            try:
                data = sock.recv(64 * 1024)
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # events were dropped: check every device
                    for tokens in list(self._by_rdev.values()):
                        for token in list(tokens):
                            self._soon(token)
                    continue
                log.error("uevents: %s; resizes of block devices are no longer noticed", e)
                return
            fields = parse_uevent(data)
            if fields.get("ACTION") != "change" or fields.get("SUBSYSTEM") != "block":
                continue
            try:
                key = (int(fields["MAJOR"]), int(fields["MINOR"]))
            except (KeyError, ValueError):
                continue
            for token in list(self._by_rdev.get(key, ())):
                self._soon(token)

    def _soon(self, token: int) -> None:
        """Coalesce: one call per COALESCE seconds, after the events of that time."""
        if token in self._timers or token not in self._callbacks:
            return
        self._timers[token] = gevent.spawn_later(COALESCE, self._fire, token)

    def _fire(self, token: int) -> None:
        self._timers.pop(token, None)
        entry = self._callbacks.get(token)
        if entry is not None:
            try:
                entry[0]()
            except Exception:  # a device's failure must not stop the watcher
                log.exception("resize callback failed")
