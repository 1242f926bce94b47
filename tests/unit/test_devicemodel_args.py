"""gblk-device-model's pure parts. Its command line: what libxl 4.17 passes to a PV
guest's device model (``libxl__build_device_model_args_new``) is understood, options it
has no use for are ignored, and a command line it cannot serve is refused with a reason
(not a hang in front of libxl's 60 s wait). Its QMP framing: messages as libxl and
libxenstat send them."""

from __future__ import annotations

from typing import List

import pytest

from gblk.devicemodel import Monitor, UsageError, parse_args, parse_opts, split_opts, take_message

#: libxl 4.17's argv for a PV guest "web" as domain 7 (qemu-xen, no dm_restrict)
LIBXL_PV = [
    "-xen-domid", "7", "-no-shutdown",
    "-chardev", "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-7,server=on,wait=off",
    "-mon", "chardev=libxl-cmd,mode=control",
    "-chardev", "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-7,server=on,wait=off",
    "-mon", "chardev=libxenstat-cmd,mode=control",
    "-nodefaults", "-no-user-config", "-xen-attach", "-name", "web",
    "-vnc", "none", "-display", "none", "-nographic", "-machine", "xenpv", "-m", "513",
]


def test_libxl_pv_command_line() -> None:
    """Both QMP monitors libxl asks for are served, by path; nothing else is needed."""
    opts = parse_args(LIBXL_PV)
    assert opts.domid == 7 and opts.name == "web" and not opts.paused
    assert opts.monitors == [Monitor("libxl-cmd", path="/var/run/xen/qmp-libxl-7"),
                             Monitor("libxenstat-cmd", path="/var/run/xen/qmp-libxenstat-7")]
    assert "-m 513" in opts.ignored and "-vnc none" in opts.ignored


def test_dm_restrict_preopened_socket() -> None:
    """With dm_restrict libxl passes its own listening socket as fd=N, and -S (libxl
    then asks query-status for "prelaunch"), plus options to drop privileges."""
    argv = ["-xen-domid", "3", "-no-shutdown",
            "-chardev", "socket,id=libxl-cmd,fd=9,server=on,wait=off", "-S",
            "-mon", "chardev=libxl-cmd,mode=control", "-xen-domid-restrict",
            "-chroot", "/var/empty", "-runas", "131075:131072",
            "-sandbox", "on,obsolete=deny,elevateprivileges=allow", "-machine", "xenpv"]
    opts = parse_args(argv)
    assert opts.paused and opts.monitors == [Monitor("libxl-cmd", fd=9)]
    assert "-runas 131075:131072" in opts.ignored


def test_old_spellings() -> None:
    """server,nowait, -M, -qmp unix:..., --double-dash and -name guest=... mean the same."""
    argv = ["--xen-domid", "12", "-M", "xenpv", "-name", "guest=db,debug-threads=on",
            "-chardev", "socket,id=m,path=/run/m.sock,server,nowait", "-mon", "chardev=m,mode=control",
            "-qmp", "unix:/run/q.sock,server,nowait"]
    opts = parse_args(argv)
    assert (opts.domid, opts.name) == (12, "db")
    assert opts.monitors == [Monitor("m", path="/run/m.sock"), Monitor("qmp0", path="/run/q.sock")]


def test_unknown_options_are_ignored() -> None:
    """Options libxl may add (device_model_args_pv=, newer releases) do not stop the
    device model; a flag without an argument does not swallow the next option."""
    argv = LIBXL_PV + ["-some-new-flag", "-xen-future", "x=1", "-device", "foo,id=bar", "stray"]
    opts = parse_args(argv)
    assert opts.domid == 7 and len(opts.monitors) == 2
    assert {"-some-new-flag", "-xen-future x=1", "-device foo,id=bar", "stray"} <= set(opts.ignored)


def test_option_lists() -> None:
    """QEMU's a,b=c lists: ",," is a literal comma, bare names are on, noNAME is off."""
    assert split_opts("a,,b,c") == ["a,b", "c"]
    assert parse_opts("socket,id=x,path=/p,,q,server,nowait", "backend") == {
        "backend": "socket", "id": "x", "path": "/p,q", "server": "on", "wait": "off"}


def _without(argv: List[str], opt: str) -> List[str]:
    i = argv.index(opt)
    return argv[:i] + argv[i + 2:]


BAD = [
    (_without(LIBXL_PV, "-xen-domid"), "-xen-domid DOMID is missing"),
    (["-xen-domid", "seven"] + LIBXL_PV[2:], "expected a guest's domain id"),
    (["-xen-domid", "0"] + LIBXL_PV[2:], "expected a guest's domain id"),
    (["-xen-domid", "32752"] + LIBXL_PV[2:], "expected a guest's domain id"),
    (LIBXL_PV[:-4] + ["-machine", "xenfv,suppress-vmdesc=on", "-m", "1"], "HVM guest needs QEMU"),
    (_without(LIBXL_PV, "-machine"), "-machine xenpv is missing"),
    (["-xen-domid", "7", "-machine", "xenpv"], "no QMP socket"),
    (["-xen-domid", "7", "-machine", "xenpv", "-mon", "chardev=nope,mode=control"],
     "no -chardev with id=nope"),
    (["-xen-domid", "7", "-machine", "xenpv", "-qmp", "tcp:localhost:4444,server,nowait"],
     "Unix sockets only"),
    (["-xen-domid", "7", "-machine", "xenpv", "-chardev", "socket,id=c,host=::1,port=4,server=on",
      "-mon", "chardev=c,mode=control"], "neither path= nor fd="),
    (["-xen-domid", "7", "-machine", "xenpv", "-chardev", "pty,id=c", "-mon", "chardev=c,mode=control"],
     "Unix sockets only"),
    (["-xen-domid", "7", "-machine", "xenpv", "-chardev", "socket,id=c,path=/p",
      "-mon", "chardev=c,mode=control"], "not a server socket"),
    (["-xen-domid", "7", "-machine", "xenpv", "-chardev", "socket,id=c,fd=x,server=on",
      "-mon", "chardev=c,mode=control"], "is not a number"),
    (["-xen-domid"], "needs an argument"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[b[1] for b in BAD])
def test_command_lines_that_cannot_be_served(argv: List[str], fragment: str) -> None:
    """Each is refused with a message naming what is wrong."""
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert fragment in str(info.value)


def test_qmp_messages_with_and_without_line_ends() -> None:
    """libxl ends each command with CRLF; libxenstat (xentop) writes a bare object and
    waits 10 ms for the answer, so a complete object is a message without a line end;
    braces and quotes inside strings do not end it early."""
    assert take_message(b'{"execute":"qmp_capabilities","id":1}\r\n{"exe') == (
        b'{"execute":"qmp_capabilities","id":1}', b'\r\n{"exe')
    assert take_message(b'  { "execute": "query-blockstats" }') == (
        b'{ "execute": "query-blockstats" }', b"")
    tricky = b'{"execute":"x","arguments":{"s":"}\\"{"}}'
    assert take_message(tricky + b"rest") == (tricky, b"rest")
    assert take_message(b'{"execute": "qu') == (None, b'{"execute": "qu')
    assert take_message(b"\r\n  ") == (None, b"")


def test_qmp_input_that_is_not_an_object() -> None:
    """Input that cannot start a JSON object is one message up to the line end (answered
    with a parse error), and waits for that line end."""
    assert take_message(b"garbage here\r\n{}") == (b"garbage here", b"{}")
    assert take_message(b"garbage") == (None, b"garbage")
